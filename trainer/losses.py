"""Losses of the paper, each a small pure function whose docstring gives its formula."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.reduce import fixed_order_mean, fixed_order_sum


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ℓ_i = BCE(s_i, y_i) = −y log σ(s) − (1 − y) log(1 − σ(s))."""
    return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")


def cvar(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_CVaR = min_λ { λ + 1/(α n) Σ_i [ℓ_i − λ]_+ }, computed exactly.

    The minimiser λ* is the (1 − α)-quantile of the losses, so L_CVaR is the mean of the largest
    k = α·n losses, the (⌊k⌋+1)-th counted with weight k − ⌊k⌋. α = 1 gives the mean.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"CVaR level alpha must lie in (0, 1], not {alpha}")
    n = losses.numel()
    k = alpha * n
    whole = min(n, math.floor(k + 1e-9))
    frac = k - whole
    top = torch.topk(losses.flatten(), min(n, whole + (1 if frac > 1e-9 else 0))).values
    total = fixed_order_sum(top[:whole])
    if frac > 1e-9:
        total = total + frac * top[whole]
    return total / k


def auc_loss(logits: torch.Tensor, labels: torch.Tensor, eta: float = 0.6, p: float = 2.0) -> torch.Tensor:
    """L_AUC = 1/(n₊ n₋) Σ_{i∈P} Σ_{j∈N} [η − (s_i − s_j)]_+^p over every positive/negative pair.

    A batch without positives or without negatives has no pairs: the term is 0 (no NaN). For the
    paper's p = 2 no pair is formed (`squared_hinge_by_sorting`: O(n log n) instead of n₊ n₋, which
    is a million pairs at batch 2048); other p go pair by pair.
    """
    pos = logits[labels == 1]
    neg = logits[labels == 0]
    if pos.numel() == 0 or neg.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph and the dtype
    if p == 2:
        return squared_hinge_by_sorting(pos, neg, eta).to(logits.dtype)
    margins = torch.clamp(eta - (pos[:, None] - neg[None, :]), min=0.0)
    return fixed_order_mean(margins.pow(p))


def squared_hinge_by_sorting(pos: torch.Tensor, neg: torch.Tensor, eta: float) -> torch.Tensor:
    """1/(n₊ n₋) Σ_i Σ_j [η − (s_i − s_j)]_+² with the negatives sorted instead of every pair formed.

    With a_i = s_i − η, pair (i, j) counts when s_j > a_i and adds (s_j − a_i)² = s_j² − 2 a_i s_j + a_i².
    Sorted negatives give, for each a_i by binary search, the count C_i, sum S_i and sum of squares
    Q_i of those above it, so the loss is Σ_i (Q_i − 2 a_i S_i + a_i² C_i) / (n₊ n₋). Autograd through
    the sort and the suffix sums yields the pairwise gradients, ∂/∂a_i = −2 Σ_{s_j > a_i} (s_j − a_i)
    and ∂/∂s_j = 2 Σ_{a_i < s_j} (s_j − a_i). In float64, so the expansion's cancellation costs
    nothing; a pair with s_j = a_i exactly adds 0 either way.
    """
    a = pos.double() - eta
    s = torch.sort(neg.double()).values
    zero = s.new_zeros(1)
    sums = torch.cat([zero, torch.cumsum(s, 0)])  # sums[k] = Σ of the k smallest
    squares = torch.cat([zero, torch.cumsum(s * s, 0)])
    below = torch.searchsorted(s.detach(), a.detach(), right=True)  # negatives with s_j ≤ a_i
    count = s.numel() - below
    total = squares[-1] - squares[below] - 2 * a * (sums[-1] - sums[below]) + a * a * count
    return fixed_order_sum(total) / (pos.numel() * s.numel())


def objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    eta: float = 0.6,
    p: float = 2.0,
) -> torch.Tensor:
    """L = γ · L_CVaR(α) + (1 − γ) · L_AUC(η, p). α = 1, γ = 1 is plain BCE (ERM)."""
    per_sample = bce(logits.float(), labels)
    loss = cvar(per_sample, alpha) if alpha < 1.0 else fixed_order_mean(per_sample)
    if gamma < 1.0:
        loss = gamma * loss + (1.0 - gamma) * auc_loss(logits.float(), labels, eta, p)
    return loss
