"""A trained detector as a thing to use: what it needs (`DetectorSpec`, the `config.json` of an exported
folder) and the loaded detector (`Detector`: the MLP, its threshold and calibration, its OOD reference).

A detector comes from a run in a store (`from_run`) or from an exported folder that needs no store
(`from_folder`, Hugging Face Hub layout: `config.json`, `model.safetensors`, `ood.safetensors`,
`README.md`; `export` writes one). Both give the same `Detector`, and `features` + `score` compute
the same numbers from the same vectors: a score is σ(MLP(x)) exactly as `train` and `score` compute
it (the same model, the same autocast), on vectors rounded to the store's dtype as the cache holds
them, so an image scores the same whether its vector was cached or just computed, in a store or not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.encoding.clip import ModelSpec
from pipeline.encoding.units import EncodeSpec
from pipeline.errors import PipelineError
from pipeline.evaluation.calibration import Calibration, calibration_of
from pipeline.features.ood import CentroidSketch, IndexReference, OodSpec
from pipeline.features.view import FeatureTable
from pipeline.runs.record import load_run
from pipeline.store.layout import Store
from trainer.fit import FitConfig, build_model, predict

FORMAT = "clipdetect-detector"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SKETCH = "ood.safetensors"


@dataclass(frozen=True)
class DetectorSpec:
    """Everything a detector needs besides its weights: plain data, as `config.json` holds it."""

    clip: dict[str, Any]  # model.json of the CLIP model: model_key, architecture, pretrained, weights, preprocess, dim…
    vector_dtype: str  # the vectors it was trained on were stored as this (features are rounded to it)
    features: str  # image | text | image+text
    input_norm: str  # l2 | raw
    in_dim: int
    hidden: int | None
    depth: int
    dropout: float
    precision: str  # the MLP's products when the run scored (fp32 | bf16, as trained; so does predict)
    threshold: float  # score > threshold: generated (chosen on val for balanced accuracy)
    threshold_source: str
    calibration: Calibration
    ood: OodSpec | None
    run: dict[str, Any] = field(default_factory=dict)  # where it came from: run id, config hash, data, …

    @property
    def model_key(self) -> str:
        return str(self.clip["model_key"])

    @property
    def needs_text(self) -> bool:
        return self.features != "image"

    @property
    def fit(self) -> FitConfig:
        return FitConfig(hidden=self.hidden, depth=self.depth, dropout=self.dropout,
                         precision=self.precision)  # type: ignore[arg-type]

    def encode_spec(self, device: str, precision: str, max_pixels: int, max_bytes: int) -> EncodeSpec:
        info = self.clip
        if not info.get("architecture"):
            raise PipelineError(f"The vectors of {self.model_key} were imported: the CLIP model that made them is "
                                "unknown, so new images cannot be encoded for this detector.")
        model = ModelSpec(str(info["architecture"]), info.get("pretrained"), int(info.get("seed") or 0))
        return EncodeSpec.from_info(model, info, self.vector_dtype, max_pixels, max_bytes, device, precision)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "detector": "mlp",
            "mlp": {"in_dim": self.in_dim, "hidden": self.hidden, "depth": self.depth, "dropout": self.dropout,
                    "precision": self.precision, "output": "logit s; score = sigmoid(s)"},
            "features": self.features, "input_norm": self.input_norm, "vector_dtype": self.vector_dtype,
            "clip": self.clip, "threshold": self.threshold, "threshold_source": self.threshold_source,
            "calibration": self.calibration.to_json(), "ood": None if self.ood is None else self.ood.to_json(),
            "run": self.run,
        }

    @staticmethod
    def from_json(data: dict[str, Any], where: str) -> DetectorSpec:
        if data.get("format") != FORMAT:
            raise PipelineError(f"{where} is not a detector exported by this pipeline (no format {FORMAT!r}).")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise PipelineError(f"{where} has detector format {data.get('format_version')}; this pipeline reads "
                                f"{FORMAT_VERSION}: use a newer release.")
        mlp = data["mlp"]
        return DetectorSpec(
            clip=dict(data["clip"]), vector_dtype=str(data["vector_dtype"]), features=str(data["features"]),
            input_norm=str(data["input_norm"]), in_dim=int(mlp["in_dim"]), hidden=mlp.get("hidden"),
            depth=int(mlp["depth"]), dropout=float(mlp["dropout"]), precision=str(mlp.get("precision", "fp32")),
            threshold=float(data["threshold"]), threshold_source=str(data.get("threshold_source", "")),
            calibration=Calibration.from_json(data["calibration"]),
            ood=None if not data.get("ood") else OodSpec.from_json(data["ood"]), run=dict(data.get("run") or {}))


@dataclass
class Detector:
    """A loaded detector. `ood` is the store's index (from a run) or the shipped sketch (from a folder)."""

    spec: DetectorSpec
    model: torch.nn.Module
    ood: IndexReference | CentroidSketch | None = None
    store: Store | None = None  # the run's store (a folder detector has none)
    run_id: str | None = None
    source: str = ""  # the run id or the folder, for messages
    view: FeatureTable | None = None  # the run's training view (rows → samples, for --explain; its parts pinned)

    def features(self, images: np.ndarray | None, texts: np.ndarray | None) -> torch.Tensor:
        """The MLP's input from image and text features (each already as `input_norm` makes them)."""
        wanted = [p for p, used in ((images, self.spec.features != "text"), (texts, self.spec.needs_text)) if used]
        parts = [p for p in wanted if p is not None]
        if len(parts) < len(wanted):
            raise PipelineError(f"Detector {self.source} needs {self.spec.features} features.")
        x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return torch.from_numpy(np.ascontiguousarray(x, np.float32))

    def score(self, x: torch.Tensor) -> np.ndarray:
        """σ(s) per row, as `train` and `score` compute it."""
        if not len(x):
            return np.zeros(0, np.float32)
        return predict(self.model, [x], self.spec.fit).astype(np.float32)

    def similarity(self, unit_images: np.ndarray) -> np.ndarray:
        """The OOD statistic of each image (NaN without a reference)."""
        if self.ood is None or not len(unit_images):
            return np.full(len(unit_images), np.nan, np.float32)
        return self.ood.similarity(unit_images)


def from_run(store: Store, run_id: str, *, ood: bool = True, wait: bool = True, reporter: Any = None) -> Detector:
    """The run's detector, with the store's index as its OOD reference (built under the writer lock if
    there is none yet) and its calibration (fitted now from its val scores if it was trained before)."""
    from pipeline.features.ood import index_reference
    from pipeline.features.vectors import open_matrix
    from pipeline.features.view import feature_table

    config, model, metrics = load_run(store, run_id)
    info = store.model_info(metrics.model_key)
    if not info:
        raise PipelineError(f"Run {run_id} was trained on {metrics.model_key}, which this store no longer records.")
    threshold, source = _threshold(metrics)
    spec = DetectorSpec(
        clip=_clip_info(info), vector_dtype=str(info.get("dtype") or "float16"), features=config.features,
        input_norm=config.input_norm, in_dim=_in_dim(model), hidden=config.fit.hidden, depth=config.fit.depth,
        dropout=config.fit.dropout, precision=config.fit.precision, threshold=threshold, threshold_source=source,
        calibration=calibration_of(store, run_id, metrics.calibration), ood=None,
        run={"run_id": run_id, "name": config.name, "model_key": metrics.model_key, "pairing": config.pairing,
             "train_generators": config.train_generators, "random_weights": metrics.random_weights})
    reference, view = None, None
    if ood:
        table = feature_table(store, metrics.model_key, config.pairing, reporter=reporter)
        matrix = open_matrix(store, metrics.model_key, "image")
        reference = index_reference(store, metrics.model_key, run_id, matrix, table.parts_sql,
                                    config.train_generators, reporter, wait)
        spec, view = _with_ood(spec, reference.spec), table
    return Detector(spec, model, reference, store, run_id, f"run {run_id}", view)


def from_folder(folder: Path) -> Detector:
    """An exported detector (see `export`); needs no store."""
    from safetensors.torch import load_file

    config = folder / CONFIG
    if not folder.is_dir() or not config.is_file():
        raise PipelineError(f"--detector {folder} is not an exported detector folder (no {CONFIG}).")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{config} is not readable JSON ({exc}).") from exc
    spec = DetectorSpec.from_json(data, str(config))
    model = build_model(spec.in_dim, spec.fit)
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    model.eval()
    sketch = None
    if spec.ood is not None and (folder / SKETCH).is_file():
        sketch = CentroidSketch(load_file(str(folder / SKETCH))["centroids"].float().numpy(), spec.ood)
    return Detector(spec, model, sketch, None, None, str(folder))


def export(detector: Detector, sketch: CentroidSketch, folder: Path, card: str) -> list[Path]:
    """Write the folder a detector travels in: config.json (with the sketch's OOD rule), the MLP's weights,
    the sketch's centroids and the model card; each file atomically."""
    from safetensors.torch import save_file

    from pipeline.store.atomic import atomic_write, write_text

    spec = _with_ood(detector.spec, sketch.spec)
    state = {k: v.detach().contiguous() for k, v in detector.model.state_dict().items()}
    meta = {"format": FORMAT, "run_id": str(detector.run_id or "")}
    centroids = torch.from_numpy(sketch.centroids.astype(np.float16))
    files = [
        atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=meta)),
        atomic_write(folder / SKETCH, lambda tmp: save_file({"centroids": centroids}, str(tmp), metadata=meta)),
        write_text(folder / CONFIG, json.dumps(spec.to_json(), indent=2, default=str)),
        write_text(folder / "README.md", card),
    ]
    for path in files:  # made to be shared: readable by all (temp files are created private)
        path.chmod(0o644)
    return files


# --- private -------------------------------------------------------------------------------


def _threshold(metrics: Any) -> tuple[float, str]:
    chosen = metrics.test.at_val_threshold
    if chosen is not None and math.isfinite(chosen.threshold):
        return float(chosen.threshold), "val: the threshold of best balanced accuracy"
    return 0.5, "0.5 (the run chose none on val)"


def _clip_info(info: dict[str, Any]) -> dict[str, Any]:
    keep = ("model_key", "architecture", "pretrained", "weights", "random_weights", "seed", "preprocess", "dim",
            "open_clip_version")
    out = {k: info.get(k) for k in keep}
    out["preprocess_digest"] = str(info.get("model_key", "")).rpartition("__pp")[2] or None
    return out


def _in_dim(model: torch.nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    return int(first.in_features)


def _with_ood(spec: DetectorSpec, ood: OodSpec) -> DetectorSpec:
    return replace(spec, ood=ood)

