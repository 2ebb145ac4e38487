"""The training loop, top to bottom: objective, SAM or plain step, cosine schedule, best-by-val.

Data arrive as callables yielding (features, labels) tensors, so this file never sees a file.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.fused import GEMM_THREAD_INDEPENDENT
from trainer.losses import objective
from trainer.model import MLP
from trainer.precision import Precision, resolve_precision
from trainer.sam import SAM, running_stats

__all__ = ["GEMM_THREAD_INDEPENDENT", "ARITHMETIC", "FitConfig", "FitResult", "build_model", "build_optimizer",
           "train_step", "fit", "predict", "compute_dtype"]

# The version of the arithmetic below (a run's hash includes it): bump it when a change alters the
# numbers a config gives. 2: fused blocks, MKL products in strict mode (bf16 ones with fp32 results),
# AUC by sorting, 16-bit dropout draws (numpy SFC64), fused AdamW, SAM norms in a fixed order.
# 3: bf16 products through oneDNN (bf16 results) on CPUs other than Intel's, where MKL's are slow.
ARITHMETIC = 3

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
    precision: Precision = "auto"  # auto: bf16 where the device computes it natively, else fp32


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
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: loss, lr, val metrics
    best_epoch: int = -1
    best_val_auc: float = float("-inf")
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    timing: list[dict[str, float]] = field(default_factory=list)  # per epoch: samples, seconds, samples/s


def build_model(in_dim: int, config: FitConfig) -> MLP:
    return MLP(in_dim, config.hidden, config.depth, config.dropout)


def build_optimizer(model: nn.Module, config: FitConfig) -> torch.optim.Optimizer:
    # fused AdamW: one pass over each parameter instead of a dozen (9 ms against 45 ms a step for
    # the paper's 7.1M parameters on one core); element-wise, so thread-independent like the loop
    kwargs: dict[str, Any] = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                  fused=_fused_adamw_works(next(model.parameters()).device))
    if config.sam:
        return SAM(model.parameters(), torch.optim.AdamW, rho=config.sam_rho, adaptive=config.sam_adaptive, **kwargs)
    return torch.optim.AdamW(model.parameters(), **kwargs)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               config: FitConfig) -> float:
    """One optimisation step; with SAM, two passes (BatchNorm statistics move on the first only)."""
    if compute_dtype(config, x.device) != x.dtype:
        x = x.to(compute_dtype(config, x.device))  # once for both passes
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
    """Train for `config.epochs`; keep the weights of the epoch with the best validation AUC.

    `on_epoch` gets each epoch's record (as kept in `history`) with its timing added: `samples`,
    `seconds` (training, without validation), `samples_per_s`, `epoch_seconds` (with validation)
    and `eta_seconds` (the remaining epochs at the mean pace so far).
    """
    optimizer = build_optimizer(model, config)
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    t_max = config.cosine_t_max or max(1.0, config.epochs / 4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=t_max, eta_min=config.eta_min)  # type: ignore[arg-type]
    result = FitResult()
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        losses, seen = [], 0
        epoch_start = time.perf_counter()
        for x, y in train_batches(epoch):
            if x.shape[0] < 2:  # BatchNorm cannot train on one sample
                continue
            losses.append(train_step(model, optimizer, x, y, config) * x.shape[0])
            seen += x.shape[0]
        trained = time.perf_counter() - epoch_start
        lr = base.param_groups[0]["lr"]
        schedule.step()
        val = validate(model)
        record = {"epoch": epoch, "train_loss": sum(losses) / max(seen, 1), "lr": lr, **{f"val_{k}": v
                  for k, v in val.items() if not isinstance(v, dict)}}
        result.history.append(record)
        elapsed = time.perf_counter() - started
        timing = {"samples": seen, "seconds": trained, "samples_per_s": seen / trained if trained > 0 else 0.0,
                  "epoch_seconds": time.perf_counter() - epoch_start,
                  "eta_seconds": elapsed / (epoch + 1) * (config.epochs - epoch - 1)}
        result.timing.append(timing)
        val_auc = val.get("auc", float("nan"))
        if math.isnan(val_auc) or result.best_epoch < 0 or val_auc > result.best_val_auc:
            # no validation signal (empty split): the latest weights are the best we know
            result.best_epoch, result.best_val_auc = epoch, val_auc
            result.best_state = copy.deepcopy(model.state_dict())
        if on_epoch:
            on_epoch({**record, **timing})
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


def compute_dtype(config: FitConfig, device: torch.device) -> torch.dtype:
    """The dtype the MLP's products run in: bf16 when the precision (resolved for `device`) says so."""
    return torch.bfloat16 if resolve_precision(config.precision, device.type)[0] == "bf16" else torch.float32


def _autocast(config: FitConfig, device: torch.device) -> Any:
    if compute_dtype(config, device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _fused_adamw_works(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW for `device` (CPU since torch 2.4)."""
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        probe.grad = torch.zeros(1, device=device)
        torch.optim.AdamW([probe], fused=True).step()
        return True
    except (RuntimeError, ValueError, TypeError):
        return False
