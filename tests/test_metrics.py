import numpy as np
import pytest

from trainer.metrics import accuracy, average_precision, per_generator_auc, roc_auc


def test_roc_auc_hand_worked_with_ties() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_roc_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairwise)


def test_average_precision_hand_worked() -> None:
    # ranked: 0.9(1) 0.8(0) 0.7(1) 0.1(0): AP = 0.5*1 + 0.5*(2/3)
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(
        0.5 + 1 / 3
    )


def test_accuracy_and_per_generator() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array([0.2, 0.6, 0.7, 0.9, 0.1])
    assert accuracy(labels, probs) == pytest.approx(3 / 5)
    gens = np.array(["real", "real", "a", "a", "b"])
    per = per_generator_auc(labels, probs, gens)
    assert per == {"a": pytest.approx(1.0), "b": pytest.approx(0.0)}


# --- metrics with intervals -------------------------------------------------------------------

from statistics import NormalDist  # noqa: E402

from trainer.metrics import METRICS, choose_threshold, evaluate, evaluate_by_generator  # noqa: E402


def _values(labels: list[int], scores: list[float], threshold: float = 0.5) -> dict[str, float]:
    return {m: e.value for m, e in evaluate(np.array(labels), np.array(scores), threshold=threshold).items()}


def test_evaluate_hand_worked() -> None:
    # ROC points (fpr, tpr): (0,0) (0,.5) (.5,.5) (.5,1) (1,1); FPR = FNR where fpr = .5
    v = _values([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert v == pytest.approx({"auc": 0.75, "ap": 0.5 + 1 / 3, "acc": 0.75, "real_acc": 1.0, "fake_acc": 0.5,
                               "balanced_acc": 0.75, "eer": 0.5, "tpr_at_fpr_1": 0.5, "tpr_at_fpr_5": 0.5})


def test_evaluate_all_tied_and_perfect() -> None:
    tied = _values([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5])
    assert tied == pytest.approx({"auc": 0.5, "ap": 0.5, "acc": 0.5, "real_acc": 1.0, "fake_acc": 0.0,
                                  "balanced_acc": 0.5, "eer": 0.5, "tpr_at_fpr_1": 0.0, "tpr_at_fpr_5": 0.0})
    perfect = _values([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert perfect["eer"] == 0.0 and perfect["tpr_at_fpr_1"] == 1.0 and perfect["auc"] == 1.0
    one_class = _values([1, 1], [0.2, 0.9])
    assert np.isnan(one_class["auc"]) and np.isnan(one_class["eer"]) and one_class["fake_acc"] == 0.5


def _reference_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[list[float], list[float]]:
    """ROC points by brute force over thresholds, highest first."""
    fpr, tpr = [0.0], [0.0]
    for t in sorted(set(scores.tolist()), reverse=True):
        called = scores >= t
        tpr.append(float((called & labels).sum() / labels.sum()))
        fpr.append(float((called & ~labels).sum() / (~labels).sum()))
    return fpr, tpr


def test_evaluate_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, 60).astype(bool)
        scores = np.round(rng.normal(size=60) + labels, 1) / 4 + 0.5
        v = _values(labels.astype(int).tolist(), scores.tolist())
        fpr, tpr = _reference_curve(labels, scores)
        assert v["tpr_at_fpr_5"] == pytest.approx(max(t for f, t in zip(fpr, tpr, strict=True) if f <= 0.05))
        gaps = [(1 - t) - f for f, t in zip(fpr, tpr, strict=True)]
        j = next(i for i, g in enumerate(gaps) if g <= 0)
        share = gaps[j - 1] / (gaps[j - 1] - gaps[j])
        assert v["eer"] == pytest.approx(fpr[j - 1] + share * (fpr[j] - fpr[j - 1]))
        assert v["auc"] == pytest.approx(roc_auc(labels, scores))
        assert v["ap"] == pytest.approx(average_precision(labels, scores))
        called = scores > 0.5
        assert v["real_acc"] == pytest.approx((~called[~labels]).mean())
        assert v["fake_acc"] == pytest.approx(called[labels].mean())


def test_bootstrap_weights_equal_repeated_samples() -> None:
    """A replicate's weights must give the metrics of the data with each sample repeated that often."""
    from trainer.metrics import _weighted_metrics

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 40).astype(bool)
    scores = np.round(rng.normal(size=40) + labels, 1)
    counts = rng.poisson(1.0, 40)
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    starts = np.r_[0, np.nonzero(np.diff(s))[0] + 1]
    weighted = _weighted_metrics(y, s > 0.5, starts, counts[order][None, :].astype(np.float64))
    repeated = _values(np.repeat(labels, counts).astype(int).tolist(), np.repeat(scores, counts).tolist())
    assert {m: float(weighted[m][0]) for m in METRICS} == pytest.approx(repeated)


def test_group_bootstrap_interval_covers_true_auc() -> None:
    """Seeded synthetic draws: groups of one real and two generated images sharing a group effect."""
    rng = np.random.default_rng(11)
    d, group_sd = 1.0, 0.5
    true_auc = NormalDist().cdf(d / np.sqrt(2 * (1 + group_sd**2)))
    covered, trials = 0, 150
    for _ in range(trials):
        shift = np.repeat(rng.normal(0, group_sd, 80), 3)
        labels = np.tile([0, 1, 1], 80)
        scores = shift + d * labels + rng.normal(size=240)
        auc = evaluate(labels, scores, np.repeat(np.arange(80), 3), rng=rng, n_boot=200)["auc"]
        covered += auc.lo <= true_auc <= auc.hi
        assert auc.lo <= auc.value <= auc.hi and auc.n == 240
    assert 0.85 <= covered / trials <= 0.995


def test_bootstrap_reproduces_with_seed_and_groups_widen_interval() -> None:
    rng = np.random.default_rng(2)
    shift = np.repeat(rng.normal(0, 2.0, 50), 4)
    labels = np.tile([0, 1, 1, 1], 50)
    scores = shift + labels + rng.normal(size=200)
    groups = np.repeat(np.arange(50), 4)
    a = evaluate(labels, scores, groups, rng=np.random.default_rng(0), n_boot=300)
    b = evaluate(labels, scores, groups, rng=np.random.default_rng(0), n_boot=300)
    assert a == b
    single = evaluate(labels, scores, None, rng=np.random.default_rng(0), n_boot=300)
    assert a["auc"].value == single["auc"].value
    assert np.isnan(evaluate(labels, scores)["auc"].lo)  # no rng: no interval


def test_evaluate_by_generator_and_threshold() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.2, 0.6, 0.7, 0.9, 0.1])
    out = evaluate_by_generator(labels, scores, np.array(["real", "real", "a", "a", "b"]))
    assert set(out) == {"all", "a", "b"} and out["a"]["auc"].value == 1.0 and out["b"]["auc"].n == 3
    assert choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.25)
    assert choose_threshold(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_codes_and_names_give_the_same_metrics_and_counts_the_same_point_estimates() -> None:
    """Generator codes with `names`, group codes that sort as the keys do, and the point estimate from
    counts are ways to spend fewer bytes a sample: every number must stay the same."""
    from trainer.metrics import _point_metrics, _weighted_metrics, summary

    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, 600).astype(np.int8)
    scores = np.round(rng.normal(size=600) + labels, 1).astype(np.float32)  # many ties
    names = ("real", "sd-xl", "if")
    codes = np.where(labels == 1, rng.integers(1, 3, 600), 0).astype(np.int16)
    keys = np.array([f"group-{k:03d}" for k in rng.integers(0, 150, 600)])
    ranks = np.unique(keys, return_inverse=True)[1].astype(np.int32)
    by_name = evaluate_by_generator(labels, scores, np.array(names)[codes], keys, 0.4, np.random.default_rng(1), 50)
    by_code = evaluate_by_generator(labels, scores, codes, ranks, 0.4, np.random.default_rng(1), 50, names=names)
    assert list(by_name) == list(by_code) == ["all", "if", "sd-xl"]
    assert {g: {m: e.as_dict() for m, e in d.items()} for g, d in by_name.items()} == \
        {g: {m: e.as_dict() for m, e in d.items()} for g, d in by_code.items()}
    assert summary(labels, scores, np.array(names)[codes]) == summary(labels, scores, codes, names=names)
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order].astype(np.float64), labels[order].astype(bool)
    starts = np.r_[0, np.nonzero(np.diff(s))[0] + 1]
    weighted = _weighted_metrics(y, s > 0.5, starts, np.ones((1, 600)))
    counted = _point_metrics(y, s > 0.5, starts)
    assert {m: weighted[m].tolist() for m in METRICS} == {m: counted[m].tolist() for m in METRICS}
    pairs = (scores[labels == 1][:, None] > scores[labels == 0][None, :]) + \
        0.5 * (scores[labels == 1][:, None] == scores[labels == 0][None, :])
    assert roc_auc(labels, scores) == pytest.approx(pairs.mean(), abs=1e-12)
