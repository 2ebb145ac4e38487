"""Losses against hand-worked numbers and their defining formulas."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.losses import auc_loss, bce, cvar, objective


def _cvar_by_definition(losses: np.ndarray, alpha: float) -> float:
    """min_λ λ + 1/(α n) Σ [ℓ_i − λ]_+: convex, piecewise linear, so the minimum sits at some ℓ_i."""
    n = losses.size
    return min(lam + np.maximum(losses - lam, 0).sum() / (alpha * n) for lam in losses)


def test_cvar_hand_worked() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert cvar(losses, 0.5).item() == pytest.approx(3.5)  # mean of the top 2
    assert cvar(losses, 0.25).item() == pytest.approx(4.0)
    # k = 0.375 * 4 = 1.5: (4 + 0.5 * 3) / 1.5
    assert cvar(losses, 0.375).item() == pytest.approx((4 + 1.5) / 1.5)


def test_cvar_alpha_one_is_the_mean() -> None:
    losses = torch.rand(37)
    assert cvar(losses, 1.0).item() == pytest.approx(losses.mean().item(), abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.01, 1.0),
)
def test_cvar_equals_its_defining_minimisation(values: list[float], alpha: float) -> None:
    losses = np.array(values, dtype=np.float64)
    got = cvar(torch.tensor(losses), alpha).item()
    assert got == pytest.approx(_cvar_by_definition(losses, alpha), abs=1e-6)


def test_cvar_rejects_bad_alpha() -> None:
    with pytest.raises(ValueError):
        cvar(torch.ones(3), 0.0)


def test_cvar_gradient_flows_to_the_top_losses_only() -> None:
    losses = torch.tensor([1.0, 5.0, 3.0], requires_grad=True)
    cvar(losses, 1 / 3).backward()
    assert losses.grad.tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_auc_loss_hand_worked() -> None:
    logits = torch.tensor([0.9, 0.2, 0.1, 0.5])
    labels = torch.tensor([1, 1, 0, 0])
    # pairs (pos - neg): 0.8, 0.4, 0.1, -0.3; [0.6 - d]_+^2: 0, 0.04, 0.25, 0.81
    assert auc_loss(logits, labels, eta=0.6, p=2).item() == pytest.approx((0 + 0.04 + 0.25 + 0.81) / 4)


def test_auc_loss_without_one_class_is_zero_not_nan() -> None:
    logits = torch.randn(5, requires_grad=True)
    for labels in (torch.ones(5), torch.zeros(5)):
        loss = auc_loss(logits, labels)
        assert loss.item() == 0.0 and not math.isnan(loss.item())
        loss.backward()
    total = objective(logits, torch.ones(5), alpha=0.8, gamma=0.5)
    assert torch.isfinite(total)


def test_objective_combines_as_the_formula() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    labels = torch.tensor([1, 0, 0, 1])
    per = bce(logits, labels)
    expected = 0.3 * cvar(per, 0.5) + 0.7 * auc_loss(logits, labels, 0.6, 2)
    got = objective(logits, labels, alpha=0.5, gamma=0.3, eta=0.6, p=2)
    assert got.item() == pytest.approx(expected.item())
    assert objective(logits, labels).item() == pytest.approx(per.mean().item())  # plain BCE


def test_bce_matches_formula() -> None:
    s, y = torch.tensor([0.3]), torch.tensor([1])
    assert bce(s, y).item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.3))))
