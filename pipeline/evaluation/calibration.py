"""Scores a deployer can read as probabilities: Platt scaling fitted on validation, and its ECE.

The detector's score is σ(s), s its logit. The paper's objective mixes a CVaR of the cross-entropy
with a pairwise AUC surrogate, which sees only differences s_i − s_j: nothing pins the logit's offset
or scale, so σ(s) need not be a frequency. We fit, on the validation split,

    p̂ = σ(a·s + b),   (a, b) = argmin Σ_i −[t_i log p̂_i + (1 − t_i) log(1 − p̂_i)],

with Platt's smoothed targets t = (N₊ + 1)/(N₊ + 2) for a generated image and 1/(N₋ + 2) for a real
one, which keep the fit finite when validation is separable. Why this and not the alternatives:
temperature scaling alone (b = 0) cannot move the point where p̂ = ½, which is exactly what a
shift-free AUC term leaves loose; isotonic regression needs thousands of validation images per
bend and turns the score into steps (ties change rankings, so the AUC a user measured would not be
the AUC of the calibrated score). Two parameters cannot overfit a validation split of any size and
σ(a·s + b) with a > 0 keeps every ranking, so AUC and every threshold metric are unchanged.

Expected calibration error (Guo et al. 2017): the scores cut into `BINS` equal-width bins, ECE =
Σ_b (n_b / N) |frac_b − conf_b|, where conf_b is the mean predicted probability of "generated" in
bin b and frac_b the fraction of generated images in it. Measured before and after, on test (the
calibration never saw it) and on val. A run trained before calibration existed has none stored:
`calibration_of` fits it from the run's stored scores, deterministically (rows sorted by id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.store import catalog, duck
from pipeline.store.layout import Store

BINS = 15
CLIP = 1e-7  # scores are float32 probabilities: σ(s) rounds to 1 for s > 17; the logit of a clipped one is finite
NEWTON_STEPS = 100


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's numbers on one split: per equal-width bin of the probability, how many
    scores fell in it, their mean, and the fraction of them that were generated images."""

    counts: tuple[int, ...]
    confidence: tuple[float, ...]  # mean probability per bin (NaN: empty)
    frequency: tuple[float, ...]  # fraction generated per bin (NaN: empty)
    ece: float

    @property
    def n(self) -> int:
        return sum(self.counts)

    def to_json(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "confidence": [_num(v) for v in self.confidence],
                "frequency": [_num(v) for v in self.frequency], "ece": _num(self.ece)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Reliability:
        return Reliability(tuple(int(c) for c in data["counts"]), tuple(_nan(v) for v in data["confidence"]),
                           tuple(_nan(v) for v in data["frequency"]), _nan(data.get("ece")))


@dataclass(frozen=True)
class Calibration:
    """p̂ = σ(a·logit(score) + b), fitted on `n` validation scores; reliability before and after."""

    a: float = 1.0
    b: float = 0.0
    n: int = 0  # validation scores it was fitted on (0: none, the identity)
    method: str = "platt"
    # split -> (before, after): "val" (where it was fitted) and "test" (what it never saw)
    reliability: dict[str, tuple[Reliability, Reliability]] | None = None

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float32) of scores σ(s)."""
        return _sigmoid(self.a * logit(np.asarray(scores, np.float64)) + self.b).astype(np.float32)

    def ece(self, split: str) -> tuple[float, float] | None:
        """(before, after) on `split`, if measured."""
        pair = (self.reliability or {}).get(split)
        return None if pair is None else (pair[0].ece, pair[1].ece)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "a": self.a, "b": self.b, "n": self.n}
        if self.reliability:
            out["reliability"] = {s: [before.to_json(), after.to_json()] for s, (before, after) in
                                  self.reliability.items()}
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> Calibration:
        pairs = data.get("reliability") or {}
        by_split = {s: (Reliability.from_json(p[0]), Reliability.from_json(p[1])) for s, p in pairs.items()}
        return Calibration(float(data["a"]), float(data["b"]), int(data.get("n") or 0),
                           str(data.get("method", "platt")), by_split or None)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), CLIP, 1 - CLIP)
    return np.log(p) - np.log1p(-p)


def fit(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(a, b) of Platt scaling by Newton's method on the smoothed targets (see the module docstring);
    (1, 0) when a class is missing (nothing to fit)."""
    y = np.asarray(labels).astype(bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if not positives or not negatives:
        return 1.0, 0.0
    t = np.where(y, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    z = logit(scores)
    a, b = 1.0, 0.0
    for _ in range(NEWTON_STEPS):
        p = _sigmoid(a * z + b)
        g = np.array([np.dot(p - t, z), np.sum(p - t)])
        w = p * (1 - p)
        h = np.array([[np.dot(w, z * z), np.dot(w, z)], [np.dot(w, z), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - float(step[0]), b - float(step[1])
        if np.abs(step).max() < 1e-10:
            break
    return a, b


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = BINS) -> Reliability:
    """The reliability diagram's numbers and ECE of probabilities of "generated" (see the docstring)."""
    y = np.asarray(labels).astype(np.float64)
    p = np.asarray(probabilities, np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, p, bins) / counts
        frequency = np.bincount(which, y, bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(frequency[filled] - confidence[filled])) / max(1, counts.sum()))
    return Reliability(tuple(int(c) for c in counts), tuple(map(float, confidence)), tuple(map(float, frequency)),
                       ece if len(y) else math.nan)


def calibrate(by_split: dict[str, tuple[np.ndarray, np.ndarray]]) -> Calibration:
    """Fit on `by_split["val"]` ((labels, scores)) and measure before and after on every split given."""
    labels, scores = by_split.get("val", (np.zeros(0), np.zeros(0)))
    a, b = fit(labels, scores)
    fitted = Calibration(a, b, len(labels))
    pairs = {split: (reliability(y, p), reliability(y, fitted.apply(p))) for split, (y, p) in by_split.items()
             if len(y)}
    return Calibration(a, b, len(labels), reliability=pairs or None)


def calibration_of(store: Store, run_id: str, stored: Calibration | None) -> Calibration:
    """The run's calibration: the one it stored, else fitted now from its stored val scores (and measured on
    test), the same every time: the rows are read sorted by sample id."""
    if stored is not None:
        return stored
    by_split: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with catalog.connect(store) as con:
        for split in ("val", "test"):
            rel = con.sql("SELECT label, score FROM scores WHERE run_id = $run AND split = $split "
                          "AND label IS NOT NULL ORDER BY sample_id", params={"run": run_id, "split": split})
            parts = [(b.column(0).to_numpy(), b.column(1).to_numpy()) for b in duck.batches(rel, 1 << 16)]
            if parts:
                by_split[split] = (np.concatenate([y for y, _ in parts]), np.concatenate([p for _, p in parts]))
    return calibrate(by_split)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))  # no overflow warning for large |x|


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)
