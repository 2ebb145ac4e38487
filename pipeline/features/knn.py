"""A k-nearest-neighbour detector: the similarity-weighted vote of the k closest training samples.

A strong, cheap baseline the paper does not have: no training, one FAISS index over the training
split's features (image, text or both, L2-normalised after concatenation). Each sample's score is
Σ w·y / Σ w over its k nearest training neighbours (itself excluded), w = exp((cos − 1)/τ), the
weighting of Wu et al. (2018); k is chosen by validation AUC.

Bounded memory: the index is chosen by the same memory budget as `pipeline index build`
(flat, IVF, SQ8 or PQ), the training vectors are added in chunks from the feature stream, and
every split is then searched a chunk at a time. What grows with rows is one label per training
row and one score per k per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.features.index import DEFAULT_MAX_MEMORY, IndexConfig, build_in_memory, plan_index
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.vectors import normalise
from pipeline.features.view import FeatureTable
from pipeline.store.layout import Store
from trainer.metrics import roc_auc

KS = (1, 5, 10, 25, 50)
TAU = 0.07
CHUNK_ROWS = 16384


@dataclass
class KnnFit:
    k: int
    scores: np.ndarray  # per row of `rows`, for the chosen k
    val_auc_by_k: dict[int, float]
    index_params: dict[str, Any]


def knn_scores(table: FeatureTable, features: str, splits: tuple[str, ...], exclude: set[str],
               seed: int = 0, ks: tuple[int, ...] = KS, input_norm: str = "l2",
               max_memory: int = DEFAULT_MAX_MEMORY) -> tuple[dict[str, np.ndarray], KnnFit]:
    """Columns (sample_id, split, label, generator) of every row of `splits`, and the fitted vote."""
    train = FeatureLoader(table, ("train",), LoaderConfig(features, CHUNK_ROWS, input_norm=input_norm))
    n_train = train.count()
    labels = np.zeros(n_train, np.int8)

    def chunks() -> Iterator[np.ndarray]:
        at = 0
        for b in train.epoch(0):
            labels[at:at + len(b.y)] = b.y.numpy()
            at += len(b.y)
            yield b.x.numpy()

    def sample(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # the stream is in a fixed pseudo-random order, so its first rows are a random sample
        taken, got = [], 0
        for x in chunks():
            taken.append(x[: count - got])
            got += len(taken[-1])
            if got >= count:
                break
        return np.arange(got), np.concatenate(taken)

    plan = plan_index(n_train, train.in_dim, "auto", max_memory)
    index, params = build_in_memory(plan, train.in_dim, chunks, sample, n_train,
                                    IndexConfig(Store(Path(".")), seed=seed, max_memory=max_memory))
    k_max = max(1, min(max(ks), n_train - 1))
    cols: dict[str, list[np.ndarray]] = {"sample_id": [], "split": [], "label": [], "generator": []}
    by_k: dict[int, list[np.ndarray]] = {k: [] for k in sorted({min(k, k_max) for k in ks})}
    for split in splits:
        position = 0  # a training row's own index row: the stream above met it at this position
        loader = FeatureLoader(table, (split,), LoaderConfig(features, CHUNK_ROWS, input_norm=input_norm))
        for b in loader.epoch(0):
            sims, found = index.search(normalise(b.x.numpy()), k_max + 1)
            own = np.arange(position, position + len(b.y))[:, None] if split == "train" else None
            position += len(b.y)
            for k, score in _votes(sims, found, labels, own, by_k).items():
                by_k[k].append(score)
            for name in ("sample_id", "split", "generator"):
                cols[name].append(b.column(name))
            cols["label"].append(b.y.numpy())
    out = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in cols.items()}
    scores = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in by_k.items()}
    val = (out["split"] == "val") & ~np.isin(out["sample_id"], list(exclude))
    val_auc = {k: roc_auc(out["label"][val], s[val]) if val.any() else float("nan") for k, s in scores.items()}
    best = max(val_auc, key=lambda k: (-np.inf if np.isnan(val_auc[k]) else val_auc[k], -k))
    params.pop("recall_by_breadth", None)
    return out, KnnFit(best, scores[best], val_auc, params)


def _votes(sims: np.ndarray, found: np.ndarray, labels: np.ndarray, own: np.ndarray | None,
           ks: dict[int, list[np.ndarray]]) -> dict[int, np.ndarray]:
    """Σ w·y / Σ w over the first k valid neighbours (own row excluded) of each query, for each k."""
    valid = found >= 0
    if own is not None:
        valid &= found != own
    rank = np.cumsum(valid, axis=1) - 1
    weights = np.where(valid, np.exp((sims - 1.0) / TAU), 0.0)
    votes = np.where(valid, labels[np.maximum(found, 0)], 0)
    out = {}
    for k in ks:
        w = np.where(rank < k, weights, 0.0)
        out[k] = ((w * votes).sum(1) / np.maximum(w.sum(1), 1e-30)).astype(np.float32)
    return out
