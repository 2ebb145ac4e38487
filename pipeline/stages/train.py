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

from pipeline.store import catalog
from pipeline.store.atomic import atomic_write, write_parquet, write_text
from pipeline.errors import PipelineError
from pipeline.features.view import FeatureTable, feature_table, resolve_model_key
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.store.layout import Store
from schemas import RUNS, SCORES
from trainer.fit import FitConfig, build_model, fit, predict
from trainer.metrics import summary

SPLITS = ("train", "val", "test")
DETECTORS = ("mlp", "knn")
EVAL_ROWS = 2048  # the fixed evaluation set: the first rows of the val split in table order


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. `name` is a label only; every other field enters the hash."""

    model_key: str | None = None
    features: str = "image+text"
    pairing: str = "as-ingested"
    batch_size: int = 2048
    shuffle_buffer: int = 65536
    seed: int = 0
    detector: str = "mlp"  # mlp: the paper's detector | knn: vote of the nearest training samples
    exclude_leaks: bool = False  # drop val/test samples with a near-duplicate in an earlier split
    leak_threshold: float = 0.95  # cosine similarity that counts as a near-duplicate
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


def config_hash(config: TrainConfig, model_key: str, table: FeatureTable, leak_scan: str | None = None) -> str:
    flat = config.flat()
    flat.pop("name")
    flat["model_key"] = model_key
    flat["data"] = table.fingerprint
    if leak_scan:
        flat["leak_scan"] = leak_scan
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
    excluded, leak_scan = _leaks(store, model_key, config)
    chash = config_hash(config, model_key, table, leak_scan)
    random_weights = store.model_info(model_key).get("random_weights")
    if skip_existing and (found := existing_run(store, chash)):
        return TrainResult(found, chash, model_key, random_weights, _run_metrics(store, found), skipped=True)

    if config.detector == "knn":
        scores, extra, state = _fit_knn(table, config, excluded)
    else:
        scores, extra, state = _fit_mlp(table, config, excluded, on_epoch)
    metrics = {
        "model_key": model_key,
        "random_weights": random_weights,
        "detector": config.detector,
        "features": config.features,
        "pairing": config.pairing,
        **extra,
        **{split: _summarise(scores, split, excluded) for split in SPLITS},
        "excluded_leaks": {split: int(np.sum((scores.split == split) & np.isin(scores.sample_id, list(excluded))))
                           for split in ("val", "test")} if config.exclude_leaks else None,
    }
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{chash[:8]}-{uuid.uuid4().hex[:4]}"
    _write_run(store, run_id, chash, config, model_key, metrics, state, scores)
    return TrainResult(run_id, chash, model_key, random_weights, metrics)


def load_run(store: Store, run_id: str) -> tuple[TrainConfig, torch.nn.Module, dict[str, Any]]:
    """A trained detector back from its run directory: config, model (eval mode), metrics."""
    config, metrics = load_run_record(store, run_id)
    run_dir = store.run_dir(run_id)
    if config.detector != "mlp":
        raise PipelineError(f"Run {run_id} is a {config.detector} detector; it keeps no weights to load.")
    state = load_file(str(run_dir / "model.safetensors"))
    in_dim = state["body.0.weight"].shape[1] if "body.0.weight" in state else state["head.weight"].shape[1]
    model = build_model(in_dim, config.fit)
    model.load_state_dict(state)
    model.eval()
    return config, model, metrics


def load_run_record(store: Store, run_id: str) -> tuple[TrainConfig, dict[str, Any]]:
    """A run's config and metrics (any detector)."""
    run_dir = store.run_dir(run_id)
    if not (run_dir / "run.parquet").exists():
        raise PipelineError(
            f"No run {run_id!r} in {store.root}; `pipeline sql \"SELECT run_id FROM runs\"` lists them."
        )
    flat = json.loads((run_dir / "config.json").read_text())
    return TrainConfig.from_dict(flat), json.loads((run_dir / "metrics.json").read_text())


def evaluation_set(table: FeatureTable, features: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The fixed set a run's evaluation loss (and its loss landscape) is computed on.

    The first `EVAL_ROWS` rows of the val split in the feature table's fixed order (the test split
    when val is empty).
    """
    for split in ("val", "test"):
        xs, ys, n = [], [], 0
        for b in FeatureLoader(table, (split,), LoaderConfig(features, 4096)).epoch(0):
            xs.append(b.x[: EVAL_ROWS - n])
            ys.append(b.y[: EVAL_ROWS - n])
            n += len(xs[-1])
            if n >= EVAL_ROWS:
                break
        if n:
            return torch.cat(xs), torch.cat(ys), split
    raise PipelineError("The store has no val or test samples to evaluate on.")


@torch.no_grad()
def evaluation_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fit_config: FitConfig) -> float:
    """The run's objective (as configured) on one evaluation set, weights in eval mode."""
    model.eval()
    return float(fit_config.loss(model(x).float(), y))


# --- private -------------------------------------------------------------------------------


def _leaks(store: Store, model_key: str, config: TrainConfig) -> tuple[set[str], str | None]:
    if not config.exclude_leaks:
        return set(), None
    from pipeline.stages.leaks import leaking_ids

    return leaking_ids(store, model_key, config.leak_threshold)


def _fit_mlp(table: FeatureTable, config: TrainConfig, excluded: set[str],
             on_epoch: Callable[[dict[str, Any]], None] | None) -> tuple[_Scores, dict[str, Any], dict]:
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
        s = _scores(m, loaders["val"], config.fit)
        return _summarise(s, "val", excluded) if s.label.size else {"auc": float("nan"), "n": 0}

    fitted = fit(model, train_batches, validate, config.fit, on_epoch)
    model.load_state_dict(fitted.best_state)
    all_splits = FeatureLoader(table, SPLITS, LoaderConfig(config.features, 8192))
    scores = _scores(model, all_splits, config.fit)
    x, y, eval_split = evaluation_set(table, config.features)
    extra = {
        "best_epoch": fitted.best_epoch,
        "history": fitted.history,
        "eval_loss": evaluation_loss(model, x, y, config.fit),
        "eval_set": {"split": eval_split, "rows": int(len(y))},
        "skipped_missing_text": all_splits.skipped_missing_text,
    }
    return scores, extra, fitted.best_state


def _fit_knn(table: FeatureTable, config: TrainConfig, excluded: set[str]) -> tuple[_Scores, dict[str, Any], None]:
    from pipeline.features.knn import knn_scores

    cols, fitted = knn_scores(table, config.features, SPLITS, excluded, config.seed)
    scores = _Scores(cols["sample_id"], cols["split"], cols["label"], cols["generator"], fitted.scores)
    extra = {"k": fitted.k, "val_auc_by_k": fitted.val_auc_by_k, "index": fitted.index_params}
    return scores, extra, None


def _validate(config: TrainConfig) -> None:
    fit = config.fit
    if config.detector not in DETECTORS:
        raise PipelineError(f"--detector must be one of {', '.join(DETECTORS)}.")
    if not 0 < config.leak_threshold <= 1:
        raise PipelineError("--leak-threshold must lie in (0, 1].")
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


def _scores(model: torch.nn.Module, loader: FeatureLoader, fit_config: FitConfig) -> _Scores:
    batches = list(loader.epoch(0))
    probs = predict(model, (b.x for b in batches), fit_config)
    cat = lambda name: np.concatenate([getattr(b, name) for b in batches]) if batches else np.zeros(0)  # noqa: E731
    return _Scores(cat("sample_id"), cat("split"), cat("y"), cat("generator"), probs)


def _summarise(s: _Scores, split: str, excluded: set[str] | None = None) -> dict[str, Any]:
    mask = s.split == split
    if excluded:
        mask &= ~np.isin(s.sample_id, list(excluded))
    if not mask.any():
        return {"n": 0}
    return summary(s.label[mask], s.score[mask], s.generator[mask])


def _write_run(store: Store, run_id: str, chash: str, config: TrainConfig, model_key: str,
               metrics: dict[str, Any], state: dict[str, torch.Tensor] | None, s: _Scores) -> None:
    run_dir = store.run_dir(run_id)
    flat = config.flat()
    flat["model_key"] = model_key
    write_text(run_dir / "config.json", json.dumps(flat, indent=2, default=str))
    write_text(run_dir / "metrics.json", json.dumps(_jsonable(metrics), indent=2))
    checkpoint: Path | None = None
    if state is not None:
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
        "metrics_json": json.dumps(_jsonable(metrics)),
        "checkpoint": store.relative(checkpoint) if checkpoint else None,
        "created_at": datetime.now(UTC),
    }], schema=RUNS)
    # the run row last: a run is visible only once its checkpoint and scores are on disk
    catalog.commit(store, [scores_path, write_parquet(run_row, run_dir / "run.parquet")])


def _run_metrics(store: Store, run_id: str) -> dict[str, Any]:
    path = store.run_dir(run_id) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


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
