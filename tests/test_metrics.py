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
