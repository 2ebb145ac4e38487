"""`pipeline score --run RUN`: score samples (e.g. newly ingested and encoded ones) with a trained run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import feature_table
from pipeline.reporting import Reporter, Silent
from pipeline.runs import Scores, load_run, write_scores
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.store.lock import writing
from schemas import SPLITS
from trainer.fit import predict


@dataclass(frozen=True)
class ScoreConfig(Validated):
    store: Store
    run_id: str
    wait: bool = True


@dataclass
class ScoreResult:
    run_id: str
    scored: int
    already_scored: int


def run(cfg: ScoreConfig, reporter: Reporter | None = None) -> ScoreResult:
    """Score every encoded sample the run has not scored yet; one new score shard."""
    reporter = reporter or Silent()
    store, run_id = cfg.store, cfg.run_id
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
    scores = Scores(np.concatenate(ids), np.concatenate(splits), np.concatenate(labels), np.concatenate(gens),
                    np.concatenate(probs))
    stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    with writing(store, reporter, cfg.wait):
        catalog.commit(store, [write_scores(store, run_id, scores, f"scored-{stamp}")])
    return ScoreResult(run_id, len(scores.score), len(done))

