"""Stage `train`: fit the detector on cached features and record a run, its checkpoint and scores.

A run is: its config (and hash, which includes the fingerprint of the data it saw), per-epoch
metrics, the weights of the best validation epoch (safetensors), test metrics, and one score per
sample of every split. It lands in `runs/<run_id>/` and `scores/`, visible in the views.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from pipeline import catalog
from pipeline.atomic import atomic_write, write_parquet, write_text
from pipeline.errors import PipelineError
from pipeline.features import FeatureTable, feature_table, resolve_model_key
from pipeline.loader import FeatureLoader, LoaderConfig
from pipeline.store import Store
from schemas import RUNS, SCORES
from trainer.fit import FitConfig, build_model, fit, predict
from trainer.metrics import summary

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. `name` is a label only; every other field enters the hash."""

    model_key: str | None = None
    features: str = "image+text"
    pairing: str = "as-ingested"
    batch_size: int = 2048
    shuffle_buffer: int = 65536
    seed: int = 0
    fit: FitConfig = field(default_factory=FitConfig)
    name: str | None = None

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TrainConfig:
        """Flat keys (as in TOML): TrainConfig fields and FitConfig fields side by side."""
        own = {f.name for f in dataclasses.fields(TrainConfig)} - {"fit"}
        fit_fields = {f.name for f in dataclasses.fields(FitConfig)}
        unknown = sorted(set(data) - own - fit_fields)
        if unknown:
            raise PipelineError(f"Unknown training option(s): {', '.join(unknown)}.")
        fit_kwargs: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fit_fields
        }
        return TrainConfig(fit=FitConfig(**fit_kwargs), **{k: v for k, v in data.items() if k in own})

    @staticmethod
    def from_toml(path: Path) -> TrainConfig:
        try:
            return TrainConfig.from_dict(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PipelineError(f"Cannot read {path}: {exc}") from exc

    def flat(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "fit"}
        out.update(dataclasses.asdict(self.fit))
        return out


@dataclass
class TrainResult:
    run_id: str
    config_hash: str
    model_key: str
    random_weights: bool | None
    metrics: dict[str, Any]
    skipped: bool = False  # a run with the same config hash already existed


def config_hash(config: TrainConfig, model_key: str, table: FeatureTable) -> str:
    flat = config.flat()
    flat.pop("name")
    flat["model_key"] = model_key
    flat["data"] = table.fingerprint
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def existing_run(store: Store, chash: str) -> str | None:
    if not catalog.shard_paths(store, "runs"):
        return None
    rows = catalog.query(store, "SELECT run_id FROM runs WHERE config_hash = ? ORDER BY created_at", [chash])
    return rows.column(0)[0].as_py() if rows.num_rows else None


def train(
    store: Store,
    config: TrainConfig,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    skip_existing: bool = False,
) -> TrainResult:
    _validate(config)
    catalog.reconcile(store)
    model_key = resolve_model_key(store, config.model_key)
    table = feature_table(store, model_key, config.pairing)
    chash = config_hash(config, model_key, table)
    random_weights = _random_weights(store, model_key)
    if skip_existing and (found := existing_run(store, chash)):
        return TrainResult(found, chash, model_key, random_weights, _run_metrics(store, found), skipped=True)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    loaders = {
        split: FeatureLoader(table, (split,), LoaderConfig(
            config.features, config.batch_size, shuffle=split == "train",
            buffer_rows=config.shuffle_buffer, seed=config.seed))
        for split in SPLITS
    }
    model = build_model(loaders["train"].in_dim, config.fit)

    def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((b.x, b.y) for b in loaders["train"].epoch(epoch))

    def validate(m: torch.nn.Module) -> dict[str, Any]:
        return _evaluate(m, loaders["val"], config.fit)

    fitted = fit(model, train_batches, validate, config.fit, on_epoch)
    model.load_state_dict(fitted.best_state)
    all_splits = FeatureLoader(table, SPLITS, LoaderConfig(config.features, 8192))
    scores = _scores(model, all_splits, config.fit)
    metrics = {
        "model_key": model_key,
        "random_weights": random_weights,
        "features": config.features,
        "pairing": config.pairing,
        "best_epoch": fitted.best_epoch,
        "history": fitted.history,
        **{split: _summarise(scores, split) for split in SPLITS},
        "skipped_missing_text": all_splits.skipped_missing_text,
    }
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{chash[:8]}-{uuid.uuid4().hex[:4]}"
    _write_run(store, run_id, chash, config, model_key, metrics, fitted.best_state, scores)
    return TrainResult(run_id, chash, model_key, random_weights, metrics)


def load_run(store: Store, run_id: str) -> tuple[TrainConfig, torch.nn.Module, dict[str, Any]]:
    """A trained detector back from its run directory: config, model (eval mode), metrics."""
    run_dir = store.run_dir(run_id)
    if not (run_dir / "config.json").exists():
        raise PipelineError(
            f"No run {run_id!r} in {store.root}; `pipeline sql \"SELECT run_id FROM runs\"` lists them."
        )
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = load_file(str(run_dir / "model.safetensors"))
    in_dim = state["body.0.weight"].shape[1] if "body.0.weight" in state else state["head.weight"].shape[1]
    model = build_model(in_dim, config.fit)
    model.load_state_dict(state)
    model.eval()
    return config, model, metrics


# --- private -------------------------------------------------------------------------------


def _validate(config: TrainConfig) -> None:
    fit = config.fit
    if config.batch_size < 2:
        raise PipelineError("--batch-size must be at least 2 (BatchNorm needs two samples).")
    if fit.epochs < 1:
        raise PipelineError("--epochs must be at least 1.")
    if not 0 < fit.cvar_alpha <= 1:
        raise PipelineError("--cvar-alpha must lie in (0, 1].")
    if not 0 <= fit.auc_gamma <= 1:
        raise PipelineError("--auc-gamma must lie in [0, 1].")
    if not 0 < fit.auc_eta <= 1 or fit.auc_p <= 1:
        raise PipelineError("--auc-eta must lie in (0, 1] and --auc-p be above 1.")


@dataclass
class _Scores:
    sample_id: np.ndarray
    split: np.ndarray
    label: np.ndarray
    generator: np.ndarray
    score: np.ndarray


def _evaluate(model: torch.nn.Module, loader: FeatureLoader, fit_config: FitConfig) -> dict[str, Any]:
    s = _scores(model, loader, fit_config)
    if s.label.size == 0:
        return {"auc": float("nan"), "n": 0}
    return summary(s.label, s.score, s.generator)


def _scores(model: torch.nn.Module, loader: FeatureLoader, fit_config: FitConfig) -> _Scores:
    batches = list(loader.epoch(0))
    probs = predict(model, (b.x for b in batches), fit_config)
    cat = lambda name: np.concatenate([getattr(b, name) for b in batches]) if batches else np.zeros(0)  # noqa: E731
    return _Scores(cat("sample_id"), cat("split"), cat("y"), cat("generator"), probs)


def _summarise(s: _Scores, split: str) -> dict[str, Any]:
    mask = s.split == split
    if not mask.any():
        return {"n": 0}
    return summary(s.label[mask], s.score[mask], s.generator[mask])


def _write_run(store: Store, run_id: str, chash: str, config: TrainConfig, model_key: str,
               metrics: dict[str, Any], state: dict[str, torch.Tensor], s: _Scores) -> None:
    run_dir = store.run_dir(run_id)
    flat = config.flat()
    flat["model_key"] = model_key
    write_text(run_dir / "config.json", json.dumps(flat, indent=2, default=str))
    write_text(run_dir / "metrics.json", json.dumps(_jsonable(metrics), indent=2))
    checkpoint = run_dir / "model.safetensors"
    atomic_write(checkpoint, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                                                  metadata={"run_id": run_id, "config_hash": chash}))
    scores = pa.table({
        "run_id": pa.array([run_id] * len(s.score), pa.string()),
        "sample_id": pa.array(s.sample_id.astype(str), pa.string()),
        "split": pa.array(s.split.astype(str), pa.string()),
        "label": pa.array(s.label.astype(np.int8), pa.int8()),
        "generator": pa.array(s.generator.astype(str), pa.string()),
        "score": pa.array(s.score.astype(np.float32), pa.float32()),
    }, schema=SCORES)
    scores_path = write_parquet(scores, store.dataset_dir("scores") / f"{run_id}.parquet")
    run_row = pa.Table.from_pylist([{
        "run_id": run_id, "name": config.name, "config_hash": chash, "model_key": model_key,
        "features": config.features, "val_auc": _num(metrics["val"].get("auc")),
        "test_auc": _num(metrics["test"].get("auc")), "config_json": json.dumps(flat, default=str),
        "metrics_json": json.dumps(_jsonable(metrics)), "checkpoint": store.relative(checkpoint),
        "created_at": datetime.now(UTC),
    }], schema=RUNS)
    # the run row last: a run is visible only once its checkpoint and scores are on disk
    catalog.commit(store, [scores_path, write_parquet(run_row, run_dir / "run.parquet")])


def _run_metrics(store: Store, run_id: str) -> dict[str, Any]:
    path = store.run_dir(run_id) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _random_weights(store: Store, model_key: str) -> bool | None:
    path = store.embeddings_dir(model_key) / "model.json"
    return json.loads(path.read_text()).get("random_weights") if path.exists() else None


def _num(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value
