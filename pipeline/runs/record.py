"""A run in the store: the one writer of its files (`write_run`) and how it is read back.

A run is its config (and hash), its metrics (`evaluation.results.RunMetrics`), the weights of its best
validation epoch (safetensors) and one score per sample. `write_run` writes all of it and commits it
in one catalog update, the run row last; `load_run` / `load_run_record` read it back for scoring,
reports and landscapes. Stages that make runs and stages that read them meet here.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import PipelineError
from pipeline.evaluation.results import RunMetrics
from pipeline.evaluation.scores import ScoreWriter
from pipeline.runs.config import TrainConfig
from pipeline.store import catalog, writes
from pipeline.store.atomic import atomic_write, write_parquet, write_text
from pipeline.store.layout import Store
from pipeline.store.manifest import Manifest, Shard
from schemas import METRICS, RUNS, from_rows
from trainer.fit import build_model


def run_shards(manifest: Manifest, run_id: str) -> list[Shard]:
    """A run's committed shards: `runs/<id>/run.parquet` and every per-run shard, named for the run
    (`<dataset>/<id>.parquet` or `<dataset>/<id>-<part>.parquet`: its scores, its metrics)."""
    def of_run(rel: str) -> bool:
        if rel.startswith(f"runs/{run_id}/"):
            return True
        stem = Path(rel).stem
        return rel.count("/") == 1 and (stem == run_id or stem.startswith(f"{run_id}-"))

    return [s for rel, s in sorted(manifest.shards.items()) if of_run(rel)]


def existing_run(store: Store, chash: str) -> str | None:
    if not catalog.shard_paths(store, "runs"):
        return None
    rows = catalog.query(store, "SELECT run_id FROM runs WHERE config_hash = ? ORDER BY created_at", [chash])
    return rows.column(0)[0].as_py() if rows.num_rows else None


def load_run(store: Store, run_id: str) -> tuple[TrainConfig, torch.nn.Module, RunMetrics]:
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


def load_run_record(store: Store, run_id: str) -> tuple[TrainConfig, RunMetrics]:
    """A run's config and metrics (any detector)."""
    run_dir = store.run_dir(run_id)
    if not (run_dir / "run.parquet").exists():
        raise PipelineError(
            f"No run {run_id!r} in {store.root}; `pipeline sql \"SELECT run_id FROM runs\"` lists them."
        )
    flat = json.loads((run_dir / "config.json").read_text())
    return TrainConfig.from_dict(flat), RunMetrics.from_json(json.loads((run_dir / "metrics.json").read_text()))


def run_metrics(store: Store, run_id: str) -> RunMetrics:
    """The metrics a committed run recorded."""
    return load_run_record(store, run_id)[1]


def write_run(store: Store, run_id: str, chash: str, config: TrainConfig, metrics: RunMetrics,
              state: dict[str, torch.Tensor] | None, scores: ScoreWriter) -> None:
    """Write a run's files and commit them with its scores (written by `scores`, published here)."""
    run_dir = store.run_dir(run_id)
    flat = config.flat()
    flat["model_key"] = metrics.model_key
    recorded = metrics.to_json()
    write_text(run_dir / "config.json", json.dumps(flat, indent=2, default=str))
    write_text(run_dir / "metrics.json", json.dumps(recorded, indent=2))
    checkpoint: Path | None = None
    if state is not None:
        checkpoint = run_dir / "model.safetensors"
        atomic_write(checkpoint, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                                                      metadata={"run_id": run_id, "config_hash": chash}))
    scores_path = scores.publish()
    run_row = from_rows(RUNS, [{
        "run_id": run_id, "name": config.name, "config_hash": chash, "model_key": metrics.model_key,
        "features": config.features, "val_auc": _finite(metrics.val.auc),
        "test_auc": _finite(metrics.test.auc), "config_json": json.dumps(flat, default=str),
        "metrics_json": json.dumps(recorded),
        "checkpoint": store.relative(checkpoint) if checkpoint else None,
        "created_at": datetime.now(UTC),
    }])
    metrics_path = write_parquet(from_rows(METRICS, metric_rows(run_id, metrics)),
                                 store.dataset_dir("metrics") / f"{run_id}.parquet")
    # The run row last, then one commit of all three: a run is visible only once every file is in
    # place. A kill before `run.parquet` leaves ghosts the next writer sweeps (scores and metrics
    # named by a run without `run.parquet`); a kill after it, files the next writer adopts whole.
    writes.commit(store, [scores_path, metrics_path, write_parquet(run_row, run_dir / "run.parquet")])


def metric_rows(run_id: str, metrics: RunMetrics) -> list[dict[str, Any]]:
    """The `metrics` table's rows of a run: every split x generator x metric with its interval and n,
    exactly the estimates `metrics` holds (the `metrics` view and every page show the same numbers)."""
    rows = []
    for split in ("train", "val", "test"):
        summary = metrics.split(split).to_json()
        for generator, by_metric in (summary.get("intervals") or {}).items():
            for metric, e in by_metric.items():
                rows.append({"run_id": run_id, "split": split, "generator": generator, "metric": metric, **e})
        chosen = summary.get("at_val_threshold") or {}
        for metric, e in (chosen.get("metrics") or {}).items():
            rows.append({"run_id": run_id, "split": split, "generator": "all",
                         "metric": f"{metric}_at_val_threshold", **e})
    return rows


def _finite(value: float | None) -> float | None:
    return None if value is None or value != value else float(value)
