"""Losses of the paper, each a small pure function whose docstring gives its formula."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    total = top[:whole].sum()
    if frac > 1e-9:
        total = total + frac * top[whole]
    return total / k


def auc_loss(logits: torch.Tensor, labels: torch.Tensor, eta: float = 0.6, p: float = 2.0) -> torch.Tensor:
    """L_AUC = 1/(n₊ n₋) Σ_{i∈P} Σ_{j∈N} [η − (s_i − s_j)]_+^p over every positive/negative pair.

    A batch without positives or without negatives has no pairs: the term is 0 (no NaN).
    """
    pos = logits[labels == 1]
    neg = logits[labels == 0]
    if pos.numel() == 0 or neg.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph and the dtype
    margins = torch.clamp(eta - (pos[:, None] - neg[None, :]), min=0.0)
    return margins.pow(p).mean()


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
    loss = cvar(per_sample, alpha) if alpha < 1.0 else per_sample.mean()
    if gamma < 1.0:
        loss = gamma * loss + (1.0 - gamma) * auc_loss(logits.float(), labels, eta, p)
    return loss
