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


def _pairwise(logits: torch.Tensor, labels: torch.Tensor, eta: float, p: float = 2.0) -> torch.Tensor:
    """The defining formula, every pair formed: 1/(n₊ n₋) Σ_i Σ_j [η − (s_i − s_j)]_+^p."""
    pos, neg = logits[labels == 1], logits[labels == 0]
    return torch.clamp(eta - (pos[:, None] - neg[None, :]), min=0.0).pow(p).mean()


def test_auc_loss_by_sorting_has_the_pairwise_gradient_hand_worked() -> None:
    # positives 0.9, 0.2; negatives 0.1, 0.5; η 0.6: margins [η − (s_i − s_j)]_+ per pair
    #   (0.9, 0.1): 0 | (0.9, 0.5): 0.2 | (0.2, 0.1): 0.5 | (0.2, 0.5): 0.9
    # ∂L/∂s_i = −2/(n₊n₋) Σ_j m_ij and ∂L/∂s_j = +2/(n₊n₋) Σ_i m_ij, n₊n₋ = 4
    logits = torch.tensor([0.9, 0.2, 0.1, 0.5], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 1, 0, 0])
    loss = auc_loss(logits, labels, eta=0.6, p=2)
    assert loss.item() == pytest.approx((0 + 0.04 + 0.25 + 0.81) / 4)
    loss.backward()
    assert logits.grad.tolist() == pytest.approx([-0.5 * 0.2, -0.5 * 1.4, 0.5 * 0.5, 0.5 * 1.1])


def test_auc_loss_by_sorting_counts_a_pair_on_the_margin_as_zero() -> None:
    logits = torch.tensor([0.7, 0.1], dtype=torch.float64, requires_grad=True)  # η − (0.7 − 0.1) = 0
    loss = auc_loss(logits, torch.tensor([1, 0]), eta=0.6)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-15) and logits.grad.abs().max().item() < 1e-12


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-8, 8, allow_nan=False), st.booleans()), min_size=2, max_size=60),
    st.floats(0.01, 1.0),
    st.booleans(),
)
def test_auc_loss_by_sorting_equals_the_pairwise_formula_value_and_gradient(
        pairs: list[tuple[float, bool]], eta: float, ties: bool) -> None:
    values = [round(v, 1) if ties else v for v, _ in pairs]  # rounding makes ties and margin pairs common
    labels = torch.tensor([int(y) for _, y in pairs])
    a = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    got, want = auc_loss(a, labels, eta, 2.0), _pairwise(b, labels, eta)
    if labels.min() == labels.max():
        assert got.item() == 0.0
        return
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_auc_loss_other_powers_go_pair_by_pair() -> None:
    logits = torch.tensor([0.9, 0.2, 0.1, 0.5])
    labels = torch.tensor([1, 1, 0, 0])
    assert auc_loss(logits, labels, eta=0.6, p=3).item() == pytest.approx((0 + 0.008 + 0.125 + 0.729) / 4)
