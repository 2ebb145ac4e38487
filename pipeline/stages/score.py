"""`pipeline score --run RUN`: score samples (e.g. newly ingested and encoded ones) with a trained run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import torch

from pipeline.store import catalog
from pipeline.store.atomic import write_parquet
from pipeline.errors import PipelineError
from pipeline.features.view import feature_table
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.store.layout import Store
from pipeline.stages.train import SPLITS, load_run
from schemas import SCORES
from trainer.fit import predict


@dataclass
class ScoreResult:
    run_id: str
    scored: int
    already_scored: int


def score(store: Store, run_id: str) -> ScoreResult:
    catalog.reconcile(store)
    config, model, metrics = load_run(store, run_id)
    model_key = metrics["model_key"]
    if model_key not in catalog.model_keys(store):
        raise PipelineError(f"Run {run_id} needs embeddings of {model_key}, which this store lacks.")
    done = set(catalog.query(store, "SELECT sample_id FROM scores WHERE run_id = ?", [run_id]).column(0).to_pylist())
    table = feature_table(store, model_key, config.pairing)
    loader = FeatureLoader(table, SPLITS, LoaderConfig(config.features, 8192))
    ids, splits, labels, gens, probs = [], [], [], [], []
    for batch in loader.epoch(0):
        keep = np.array([s not in done for s in batch.sample_id], dtype=bool)
        if not keep.any():
            continue
        probs.append(predict(model, [batch.x[torch.from_numpy(keep)]], config.fit))
        ids.append(batch.sample_id[keep])
        splits.append(batch.split[keep])
        labels.append(batch.y.numpy()[keep])
        gens.append(batch.generator[keep])
    if not ids:
        return ScoreResult(run_id, 0, len(done))
    n = sum(len(i) for i in ids)
    out = pa.table({
        "run_id": pa.array([run_id] * n, pa.string()),
        "sample_id": pa.array(np.concatenate(ids).astype(str)),
        "split": pa.array(np.concatenate(splits).astype(str)),
        "label": pa.array(np.concatenate(labels).astype(np.int8)),
        "generator": pa.array(np.concatenate(gens).astype(str)),
        "score": pa.array(np.concatenate(probs).astype(np.float32)),
    }, schema=SCORES)
    stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    path = write_parquet(out, store.dataset_dir("scores") / f"{run_id}-scored-{stamp}.parquet")
    catalog.commit(store, [path])
    return ScoreResult(run_id, n, len(done))

