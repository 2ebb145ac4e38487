"""The training loop, top to bottom: objective, SAM or plain step, cosine schedule, best-by-val.

Data arrive as callables yielding (features, labels) tensors, so this file never sees a file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.losses import objective
from trainer.model import MLP
from trainer.sam import SAM, running_stats

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    cvar: bool = True
    cvar_alpha: float = 0.8
    auc: bool = True
    auc_gamma: float = 0.5
    auc_eta: float = 0.6
    auc_p: float = 2.0
    sam: bool = True
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    hidden: int | None = None
    depth: int = 3
    dropout: float = 0.335
    cosine_t_max: float | None = None  # None: epochs / 4, as the reference code
    eta_min: float = 1e-5
    bf16: bool = False

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return objective(
            logits,
            labels,
            alpha=self.cvar_alpha if self.cvar else 1.0,
            gamma=self.auc_gamma if self.auc else 1.0,
            eta=self.auc_eta,
            p=self.auc_p,
        )


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_auc: float = float("-inf")
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)


def build_model(in_dim: int, config: FitConfig) -> MLP:
    return MLP(in_dim, config.hidden, config.depth, config.dropout)


def build_optimizer(model: nn.Module, config: FitConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.sam:
        return SAM(model.parameters(), torch.optim.AdamW, rho=config.sam_rho, adaptive=config.sam_adaptive, **kwargs)
    return torch.optim.AdamW(model.parameters(), **kwargs)  # type: ignore[arg-type]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               config: FitConfig) -> float:
    """One optimisation step; with SAM, two passes (BatchNorm statistics move on the first only)."""
    with _autocast(config, x.device):
        loss = config.loss(model(x), y)
    if not isinstance(optimizer, SAM):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())
    running_stats(model, True)
    loss.backward()
    optimizer.first_step(zero_grad=True)
    running_stats(model, False)
    with _autocast(config, x.device):
        config.loss(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    running_stats(model, True)
    return float(loss.detach())


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Batches],
    validate: Callable[[nn.Module], dict[str, Any]],
    config: FitConfig,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train for `config.epochs`; keep the weights of the epoch with the best validation AUC."""
    optimizer = build_optimizer(model, config)
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    t_max = config.cosine_t_max or max(1.0, config.epochs / 4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=t_max, eta_min=config.eta_min)  # type: ignore[arg-type]
    result = FitResult()
    for epoch in range(config.epochs):
        model.train()
        losses, seen = [], 0
        for x, y in train_batches(epoch):
            if x.shape[0] < 2:  # BatchNorm cannot train on one sample
                continue
            losses.append(train_step(model, optimizer, x, y, config) * x.shape[0])
            seen += x.shape[0]
        lr = base.param_groups[0]["lr"]
        schedule.step()
        val = validate(model)
        record = {"epoch": epoch, "train_loss": sum(losses) / max(seen, 1), "lr": lr, **{f"val_{k}": v
                  for k, v in val.items() if not isinstance(v, dict)}}
        result.history.append(record)
        val_auc = val.get("auc", float("nan"))
        if math.isnan(val_auc) or result.best_epoch < 0 or val_auc > result.best_val_auc:
            # no validation signal (empty split): the latest weights are the best we know
            result.best_epoch, result.best_val_auc = epoch, val_auc
            result.best_state = copy.deepcopy(model.state_dict())
        if on_epoch:
            on_epoch(record)
    return result


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[torch.Tensor], config: FitConfig) -> np.ndarray:
    """Probabilities σ(s) for each batch of features, in order."""
    model.eval()
    out = []
    for x in batches:
        with _autocast(config, x.device):
            out.append(torch.sigmoid(model(x).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _autocast(config: FitConfig, device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
