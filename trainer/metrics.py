"""Evaluation metrics on numpy arrays: ROC AUC (ties averaged), average precision, accuracy."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ_k (R_k − R_{k−1}) P_k over thresholds at each distinct score (as scikit-learn does)."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores)[order], labels[order]
    tp = np.cumsum(y)
    last = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]  # last index of each distinct score
    precision = tp[last] / (last + 1)
    recall = tp[last] / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def accuracy(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    return float(np.mean((np.asarray(probabilities) > threshold) == np.asarray(labels).astype(bool)))


def per_generator_auc(labels: np.ndarray, scores: np.ndarray, generators: np.ndarray) -> dict[str, float]:
    """Each generator's samples against all real samples of the same set."""
    labels = np.asarray(labels).astype(bool)
    generators = np.asarray(generators)
    real = ~labels
    out = {}
    for gen in sorted(set(generators[labels].tolist())):
        mask = real | (labels & (generators == gen))
        out[gen] = roc_auc(labels[mask], np.asarray(scores)[mask])
    return out


def summary(labels: np.ndarray, probabilities: np.ndarray, generators: np.ndarray,
            threshold: float = 0.5) -> dict[str, object]:
    return {
        "auc": roc_auc(labels, probabilities),
        "ap": average_precision(labels, probabilities),
        "accuracy": accuracy(labels, probabilities, threshold),
        "n": int(np.asarray(labels).size),
        "auc_by_generator": per_generator_auc(labels, probabilities, generators),
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores)[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def confusion(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """[[true real, real called generated], [generated called real, true generated]]."""
    labels = np.asarray(labels).astype(bool)
    called = np.asarray(probabilities) > threshold
    return np.array([[np.sum(~labels & ~called), np.sum(~labels & called)],
                     [np.sum(labels & ~called), np.sum(labels & called)]], dtype=np.int64)
