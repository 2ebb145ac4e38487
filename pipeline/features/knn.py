"""A k-nearest-neighbour detector: the similarity-weighted vote of the k closest training samples.

A strong, cheap baseline the paper does not have: no training, one index over the training
split's features (image, text or both, L2-normalised after concatenation). Each sample's score is
Σ w·y / Σ w over its k nearest training neighbours (itself excluded), w = exp((cos − 1)/τ), the
weighting of Wu et al. (2018); k is chosen by validation AUC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.features.index import in_memory_index
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.vectors import normalise
from pipeline.features.view import FeatureTable
from trainer.metrics import roc_auc

KS = (1, 5, 10, 25, 50)
TAU = 0.07


@dataclass
class KnnFit:
    k: int
    scores: np.ndarray  # per row of `rows`, for the chosen k
    val_auc_by_k: dict[int, float]
    index_params: dict


def knn_scores(table: FeatureTable, features: str, splits: tuple[str, ...], exclude: set[str],
               seed: int = 0, ks: tuple[int, ...] = KS) -> tuple[dict[str, np.ndarray], KnnFit]:
    """Columns (sample_id, split, label, generator) of every row of `splits`, and the fitted vote."""
    batches = list(FeatureLoader(table, splits, LoaderConfig(features, 65536)).epoch(0))
    cols = {name: np.concatenate([getattr(b, name) for b in batches]) for name in ("sample_id", "split", "generator")}
    cols["label"] = np.concatenate([b.y.numpy() for b in batches])
    x = normalise(np.concatenate([b.x.numpy() for b in batches]))
    train_rows = np.nonzero(cols["split"] == "train")[0]
    index, params = in_memory_index(np.ascontiguousarray(x[train_rows]), seed=seed)
    k_max = min(max(ks), len(train_rows) - 1)
    sims, found = index.search(x, k_max + 1)
    neighbour_rows = np.where(found >= 0, train_rows[np.maximum(found, 0)], -1)
    own = neighbour_rows == np.arange(len(x))[:, None]
    valid = (found >= 0) & ~own
    # keep the first k_max valid neighbours of each row, in order of similarity
    rank = np.cumsum(valid, axis=1) - 1
    weights = np.where(valid, np.exp((sims - 1.0) / TAU), 0.0)
    votes = np.where(valid, cols["label"][np.maximum(neighbour_rows, 0)], 0)
    val = (cols["split"] == "val") & ~np.isin(cols["sample_id"], list(exclude))
    by_k: dict[int, np.ndarray] = {}
    val_auc: dict[int, float] = {}
    for k in sorted({min(k, k_max) for k in ks}):
        w = np.where(rank < k, weights, 0.0)
        by_k[k] = ((w * votes).sum(1) / np.maximum(w.sum(1), 1e-30)).astype(np.float32)
        val_auc[k] = roc_auc(cols["label"][val], by_k[k][val]) if val.any() else float("nan")
    best = max(val_auc, key=lambda k: (-np.inf if np.isnan(val_auc[k]) else val_auc[k], -k))
    return cols, KnnFit(best, by_k[best], val_auc, params)
