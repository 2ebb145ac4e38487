"""The statistics policy: how many bootstrap replicates, seeded how, over what unit, computed once.

Every interval of a run is a 95% bootstrap that resamples *groups* (a real image and the images
generated from its caption together), drawn by `split_rng(seed, split)`: the same split of the same
run always draws the same replicates, wherever it is computed. A run's intervals are computed here
once, when it is trained, and stored (`evaluation.results`); pages read them back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.evaluation.results import AtThreshold, Bootstrap, SplitMetrics
from pipeline.evaluation.scores import ScoreArrays
from schemas import SPLITS
from trainer.metrics import Estimate, choose_threshold, evaluate, evaluate_by_generator, summary

N_BOOT = 1000  # bootstrap replicates per interval ...
BOOT_CELLS = 200_000_000  # ... fewer (down to MIN_BOOT) when replicates x samples would pass this
MIN_BOOT = 200
LEVEL = 0.95
UNIT = "group_key"


def bootstrap_replicates(n: int) -> int:
    """Replicates for an interval over `n` samples: `N_BOOT`, fewer for large `n` (cost is replicates x n)."""
    return max(MIN_BOOT, min(N_BOOT, BOOT_CELLS // max(n, 1)))


def split_seed(seed: int, split: str) -> list[int]:
    """The bootstrap seed of one split of a run (the val-threshold metrics of test draw `len(SPLITS)`)."""
    return [seed, SPLITS.index(split) if split in SPLITS else len(SPLITS)]


def split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(split_seed(seed, split))


def by_generator(labels: np.ndarray, scores: np.ndarray, generators: np.ndarray, groups: np.ndarray, seed: int,
                 split: str, names: tuple[str, ...] | None = None, threshold: float = 0.5,
                 replicates: int | None = None) -> dict[str, dict[str, Estimate]]:
    """Every metric on all samples ("all") and per generator, with intervals drawn by the policy."""
    n_boot = bootstrap_replicates(len(labels)) if replicates is None else replicates
    return evaluate_by_generator(labels, scores, generators, groups, threshold, split_rng(seed, split), n_boot,
                                 names=names)


def summarise_splits(s: ScoreArrays, seed: int) -> dict[str, SplitMetrics]:
    """Each split's summary plus every metric per generator with a 95% group-bootstrap interval.

    Groups come from the samples' `group_key`. The train split gets values without intervals (it is
    not a result, and it is the largest). A threshold chosen on val (Youden's J) is applied to test.
    """
    assert s.group is not None
    out: dict[str, SplitMetrics] = {}
    for split in SPLITS:
        mask = s.of(split)
        if not mask.any():
            out[split] = SplitMetrics()
            continue
        y, p, g, grp = s.label[mask], s.score[mask], s.generator[mask], s.group[mask]
        n_boot = 0 if split == "train" else bootstrap_replicates(int(mask.sum()))
        point: dict[str, Any] = summary(y, p, g, names=s.generators)
        intervals = by_generator(y, p, g, grp, seed, split, s.generators, replicates=n_boot)
        out[split] = SplitMetrics(
            n=int(point["n"]), auc=point["auc"], ap=point["ap"], accuracy=point["accuracy"],
            auc_by_generator=dict(point["auc_by_generator"]), intervals=intervals,
            bootstrap=Bootstrap(n_boot, LEVEL, UNIT, tuple(split_seed(seed, split))),
            groups=int(len(np.unique(grp))))
    val, test = s.of("val"), s.of("test")
    if val.any() and test.any():
        threshold = choose_threshold(s.label[val], s.score[val])
        replicates = out["test"].bootstrap.replicates if out["test"].bootstrap else N_BOOT
        chosen = evaluate(s.label[test], s.score[test], s.group[test], threshold,
                          np.random.default_rng(split_seed(seed, "threshold")), replicates)
        keep = ("acc", "real_acc", "fake_acc", "balanced_acc")
        out["test"] = replace(out["test"], at_val_threshold=AtThreshold(threshold, {m: chosen[m] for m in keep}))
    return out


def validation_summary(s: ScoreArrays) -> dict[str, object]:
    """What the training loop sees of val each epoch: point values only (AUC picks the epoch)."""
    mask = s.of("val")
    if not mask.any():
        return {"auc": float("nan"), "n": 0}
    return summary(s.label[mask], s.score[mask], s.generator[mask], names=s.generators)

