"""Evaluation metrics on numpy arrays: ROC AUC (ties averaged), AP, accuracies, EER, TPR at low FPR,
each with a seeded group-bootstrap interval."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Σ of the positives' ranks (tied values sharing the mean of their ranks), one term per distinct
    # score; every term and partial sum is a multiple of 1/2 below 2^52, so the sum is exact
    pos, sizes = _blocks(labels, scores, nan_equal=True)
    ends = np.cumsum(sizes)
    mean_ranks = (ends - sizes + 1 + ends) / 2.0
    return float((np.dot(pos, mean_ranks) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ_k (R_k − R_{k−1}) P_k over thresholds at each distinct score (as scikit-learn does)."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    pos, sizes = _blocks(labels, scores, descending=True)
    tp = np.cumsum(pos)  # positives scored at or above each distinct score
    precision = tp / np.cumsum(sizes)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _blocks(labels: np.ndarray, scores: np.ndarray, descending: bool = False,
            nan_equal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Positives and samples (int64) at each distinct score, scores ascending (or descending, sorted
    as -score). Holds ~25 bytes a sample, where a rank per sample took ~50."""
    scores = np.asarray(scores)
    if descending:
        negated = np.array(scores, dtype=np.float64)
        np.negative(negated, out=negated)
        order = np.argsort(negated, kind="mergesort")
        del negated
    else:
        order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    del order
    new = s[1:] != s[:-1]
    if nan_equal and s.dtype.kind == "f" and s.size and np.isnan(s[-1]):  # (NaNs sort last, as one value)
        new &= ~(np.isnan(s[1:]) & np.isnan(s[:-1]))
    starts = np.r_[0, np.flatnonzero(new) + 1]
    del s, new
    return np.add.reduceat(y, starts, dtype=np.int64), np.diff(np.r_[starts, y.size])


def accuracy(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    return float(np.mean((np.asarray(probabilities) > threshold) == np.asarray(labels).astype(bool)))


def per_generator_auc(labels: np.ndarray, scores: np.ndarray, generators: np.ndarray,
                      names: Sequence[str] | None = None) -> dict[str, float]:
    """Each generator's samples against all real samples of the same set.

    `generators`: each sample's generator name, or (with `names`) its index into `names`, which
    spares a string per sample on large sets."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    return {gen: roc_auc(labels[mask], scores[mask])
            for gen, mask in _generator_sets(labels, generators, names)}


def summary(labels: np.ndarray, probabilities: np.ndarray, generators: np.ndarray,
            threshold: float = 0.5, names: Sequence[str] | None = None) -> dict[str, object]:
    return {
        "auc": roc_auc(labels, probabilities),
        "ap": average_precision(labels, probabilities),
        "accuracy": accuracy(labels, probabilities, threshold),
        "n": int(np.asarray(labels).size),
        "auc_by_generator": per_generator_auc(labels, probabilities, generators, names),
    }


def _generator_sets(labels: np.ndarray, generators: np.ndarray,
                    names: Sequence[str] | None) -> Iterator[tuple[str, np.ndarray]]:
    """Each generator of the generated samples, in name order, with the mask of its samples and every
    real one. `generators` are names, or indexes into `names`."""
    if names is None:
        found, codes = np.unique(np.asarray(generators).astype(str), return_inverse=True)
        names, generators = found.tolist(), codes.ravel()
    generators = np.asarray(generators)
    for code in sorted(np.unique(generators[labels]).tolist(), key=lambda c: names[c]):
        yield names[code], ~labels | (generators == code)


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


# --- metrics with group-bootstrap intervals -------------------------------------------------------
#
# Every metric below is computed from one sort of the scores and per-sample *weights*: weight 1 for
# every sample gives the point estimate; a bootstrap replicate gives each group a Poisson(1) count
# (the Poisson bootstrap: groups resampled independently, a real image and its generated siblings
# together) and each sample its group's count. Replicates are rows of a weight matrix, so one pass of
# numpy over a (replicates x samples) block computes all of them at once.

METRICS = ("auc", "ap", "acc", "real_acc", "fake_acc", "balanced_acc", "eer", "tpr_at_fpr_1", "tpr_at_fpr_5")
LOWER_IS_BETTER = frozenset({"eer"})
CELLS_PER_CHUNK = 4_000_000  # replicates x samples held at once (float64: 32 MB per array)


# The samples a metric's value is a rate over: real_acc counts real images, fake_acc and TPR generated ones
# (TPR at a low FPR also rests on the real images that set the operating point: `n_real` says how many).
_OVER = {"real_acc": "real", "fake_acc": "fake", "tpr_at_fpr_1": "fake", "tpr_at_fpr_5": "fake"}


@dataclass(frozen=True)
class Estimate:
    """A metric's value on the data, its 95% group-bootstrap interval and the samples behind it.

    `n` is the samples the value is computed over (all of them; for real_acc the real images, for
    fake_acc and TPR the generated ones); `n_real` and `n_fake` count each class (None: not recorded)."""

    value: float
    lo: float
    hi: float
    n: int
    n_real: int | None = None
    n_fake: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n, "n_real": self.n_real,
                "n_fake": self.n_fake}


def samples_behind(metric: str, n_real: int, n_fake: int) -> int:
    """`Estimate.n` of `metric`: the samples its value is a rate over."""
    return {"real": n_real, "fake": n_fake}.get(_OVER.get(metric, ""), n_real + n_fake)


def evaluate(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None,
             threshold: float = 0.5, rng: np.random.Generator | None = None,
             n_boot: int = 1000, level: float = 0.95) -> dict[str, Estimate]:
    """Every metric of `METRICS` (score > threshold counts as generated) with a bootstrap interval.

    `groups` ties samples that must be resampled together (None: each sample is its own group).
    Without `rng` or with `n_boot` 0 the intervals are NaN. Metrics undefined on the data (AUC
    without one class) are NaN.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    n = int(labels.size)
    if n == 0:
        return {m: Estimate(float("nan"), float("nan"), float("nan"), 0, 0, 0) for m in METRICS}
    order = np.argsort(scores, kind="mergesort")  # (the order of the scores as float64: the same)
    boot: dict[str, np.ndarray] = {m: np.zeros(0) for m in METRICS}
    sampled = rng is not None and n_boot > 0
    if sampled:
        codes = np.unique(np.asarray(groups)[order] if groups is not None else np.arange(n),
                          return_inverse=True)[1].ravel()
    y = labels[order]
    s = np.asarray(scores[order], dtype=np.float64)
    del order
    starts = np.r_[0, np.nonzero(np.diff(s))[0] + 1]
    called = s > threshold
    del s
    point = _point_metrics(y, called, starts)
    if sampled:
        assert rng is not None
        n_groups = int(codes.max()) + 1
        chunk = max(1, CELLS_PER_CHUNK // n)
        parts: list[dict[str, np.ndarray]] = []
        for done in range(0, n_boot, chunk):
            counts = rng.poisson(1.0, size=(min(chunk, n_boot - done), n_groups)).astype(np.float32)
            parts.append(_weighted_metrics(y, called, starts, counts[:, codes]))
        boot = {m: np.concatenate([p[m] for p in parts]) for m in METRICS}
    tail = 100 * (1 - level) / 2
    n_fake = int(np.count_nonzero(labels))
    out = {}
    for m in METRICS:
        value = float(point[m][0])
        finite = boot[m][np.isfinite(boot[m])]
        lo, hi = (np.percentile(finite, [tail, 100 - tail]) if finite.size >= 10 and np.isfinite(value)
                  else (float("nan"), float("nan")))
        out[m] = Estimate(value, float(lo), float(hi), samples_behind(m, n - n_fake, n_fake), n - n_fake, n_fake)
    return out


def evaluate_by_generator(labels: np.ndarray, scores: np.ndarray, generators: np.ndarray,
                          groups: np.ndarray | None = None, threshold: float = 0.5,
                          rng: np.random.Generator | None = None,
                          n_boot: int = 1000, names: Sequence[str] | None = None) -> dict[str, dict[str, Estimate]]:
    """`evaluate` on all samples (key "all") and on each generator's samples with every real one.

    `generators` as in `per_generator_auc` (names, or indexes into `names`); `groups` any labels
    (strings or integer codes: only which samples share one matters, and codes that sort as the
    keys do draw the same bootstrap)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    groups = None if groups is None else np.asarray(groups)
    out = {"all": evaluate(labels, scores, groups, threshold, rng, n_boot)}
    for gen, mask in _generator_sets(labels, generators, names):
        out[gen] = evaluate(labels[mask], scores[mask], None if groups is None else groups[mask],
                            threshold, rng, n_boot)
    return out


def choose_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold t (call generated when score > t) maximising balanced accuracy, i.e. Youden's J.

    Candidates are the midpoints between consecutive distinct scores (and one below the lowest);
    ties go to the candidate nearest 0.5 so that an uninformative set keeps the usual threshold.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    distinct = np.unique(scores)
    candidates = np.r_[distinct[0] - 1.0, (distinct[:-1] + distinct[1:]) / 2, distinct[-1]]
    called = scores[None, :] > candidates[:, None] if scores.size * candidates.size <= CELLS_PER_CHUNK else None
    if called is not None:
        tpr = (called & labels).sum(1) / n_pos
        tnr = (~called & ~labels).sum(1) / n_neg
    else:  # large sets: the same counts from one sort
        idx = np.searchsorted(np.sort(scores[labels]), candidates, side="right")
        tpr = 1 - idx / n_pos
        tnr = np.searchsorted(np.sort(scores[~labels]), candidates, side="right") / n_neg
    j = tpr + tnr
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def _weighted_metrics(y: np.ndarray, called: np.ndarray, starts: np.ndarray,
                      w: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics for each row of weights `w` (replicates x samples, samples sorted by score)."""
    wp = w * y
    wn = w - wp
    if len(starts) < y.size:  # ties: one block per distinct score
        pos, neg = np.add.reduceat(wp, starts, axis=1), np.add.reduceat(wn, starts, axis=1)
    else:
        pos, neg = wp, wn
    fake_hits = wp @ called.astype(w.dtype)
    real_hits = wn @ (~called).astype(w.dtype)
    del wp, wn
    return _block_metrics(pos, neg, fake_hits, real_hits)


def _point_metrics(y: np.ndarray, called: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
    """`_weighted_metrics` with every weight 1 (the estimate on the data itself), from counts instead
    of a weight row: the same numbers (every sum is of whole numbers, so exact), 24 bytes a sample less."""
    pos = np.add.reduceat(y, starts, dtype=np.float64)[None, :]
    neg = np.diff(np.r_[starts, y.size])[None, :] - pos
    fake_hits = np.array([np.count_nonzero(y & called)], np.float64)
    real_hits = np.array([np.count_nonzero(~y & ~called)], np.float64)
    return _block_metrics(pos, neg, fake_hits, real_hits)


def _block_metrics(pos: np.ndarray, neg: np.ndarray, fake_hits: np.ndarray,
                   real_hits: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics from the (weighted) positives and negatives at each distinct score (rows x scores,
    ascending) and the generated / real samples called right.

    Written for speed and memory at a million samples: few full passes (products summed by einsum),
    temporaries reused in place (the same arithmetic, so the same numbers), ROC operating points
    found by a bisection over all rows at once.
    """
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    neg_cum = np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fake_acc = fake_hits / n_pos
        real_acc = real_hits / n_neg
        acc = (fake_acc * n_pos + real_acc * n_neg) / (n_pos + n_neg)
        auc = (np.einsum("ij,ij->i", pos, neg_cum) - 0.5 * np.einsum("ij,ij->i", pos, neg)) / (n_pos * n_neg)
        # operating point k calls "score >= k-th distinct score" generated: tp, fp fall as k rises
        tp = np.cumsum(pos, axis=1)
        np.subtract(n_pos[:, None], tp, out=tp)
        tp += pos  # tp = n_pos - cumsum(pos) + pos
        fp = neg_cum
        np.subtract(n_neg[:, None], fp, out=fp)
        fp += neg  # fp = n_neg - cumsum(neg) + neg
        precision = tp + fp
        np.maximum(precision, 1e-30, out=precision)
        np.divide(tp, precision, out=precision)
        ap = np.einsum("ij,ij->i", pos, precision) / n_pos  # 0/0 where pos is 0
        del precision
        curve = _Curve(tp, fp, n_pos, n_neg)
        tpr_at = {x: curve.tpr(curve.first(curve.fpr_at_most(x))) for x in (0.01, 0.05)}
        eer = curve.eer()
    return {"auc": auc, "ap": ap, "acc": acc, "real_acc": real_acc, "fake_acc": fake_acc,
            "balanced_acc": (real_acc + fake_acc) / 2, "eer": eer,
            "tpr_at_fpr_1": tpr_at[0.01], "tpr_at_fpr_5": tpr_at[0.05]}


class _Curve:
    """ROC operating points k = 0..K of each row (k = K: nothing called generated)."""

    def __init__(self, tp: np.ndarray, fp: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray) -> None:
        self.tp, self.fp, self.n_pos, self.n_neg = tp, fp, n_pos, n_neg
        self.rows, self.k_max = np.arange(len(tp)), tp.shape[1]

    def _at(self, values: np.ndarray, k: np.ndarray) -> np.ndarray:
        return np.where(k < self.k_max, values[self.rows, np.minimum(k, self.k_max - 1)], 0.0)

    def tpr(self, k: np.ndarray) -> np.ndarray:
        return self._at(self.tp, k) / self.n_pos

    def fpr(self, k: np.ndarray) -> np.ndarray:
        return self._at(self.fp, k) / self.n_neg

    def fpr_at_most(self, x: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda k: self.fpr(k) <= x + 1e-12

    def first(self, condition: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Per row, the first k where `condition` (false, then true as k rises) holds; K if never."""
        lo, hi = np.zeros(len(self.rows), np.int64), np.full(len(self.rows), self.k_max)
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            ok = condition(mid) & (lo < hi)
            hi = np.where(ok, mid, hi)
            lo = np.where(~ok & (lo < hi), mid + 1, lo)
        return lo

    def eer(self) -> np.ndarray:
        """Where the curve, linear between its points, crosses FPR = FNR."""
        gap = lambda k: (1 - self.tpr(k)) - self.fpr(k)  # noqa: E731  (-1 at k = 0, +1 at k = K)
        k1 = np.maximum(self.first(lambda k: gap(k) > 0), 1)
        d0, d1 = gap(k1 - 1), gap(k1)
        t = np.where(d1 - d0 > 0, d1 / np.where(d1 - d0 > 0, d1 - d0, 1.0), 0.0)
        f0, f1 = self.fpr(k1 - 1), self.fpr(k1)
        eer = f1 + t * (f0 - f1)
        return np.where(np.isfinite(d0) & np.isfinite(d1), eer, np.nan)
