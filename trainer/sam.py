"""Sharpness-Aware Minimisation (Foret et al., 2021) around any base optimiser.

Step 1 (`first_step`): with the gradient g at w, move to w + e, e = ρ g / ‖g‖ (adaptive SAM:
e = ρ |w|² g / ‖|w| g‖). Step 2 (`second_step`): with the gradient at w + e, restore w and let the
base optimiser step. `running_stats(model, on)` freezes BatchNorm statistics for the second pass.
‖g‖ is added in a fixed order (`trainer.reduce`), so e is the same whatever the thread count; w is
kept in a buffer allocated once and swapped back, not cloned and copied every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trainer.reduce import fixed_order_sum, fixed_order_sum_of_squares


class SAM(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"SAM radius rho must be non-negative, not {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._at_w: dict[torch.Tensor, torch.Tensor] = {}  # w while the weights sit at w + e
        self._moved: list[torch.Tensor] = []

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._kept(p).copy_(p)
                if group["adaptive"]:
                    p.add_(torch.pow(p, 2) * p.grad * scale.to(p))
                else:
                    p.addcmul_(p.grad, scale.to(p))  # w + ρ g/‖g‖ in one pass
                self._moved.append(p)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        for p in self._moved:  # back to w by swapping storage (no copy): w + e is next step's buffer
            self._at_w[p], p.data = p.data, self._at_w[p]
        self._moved = []
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        raise RuntimeError("SAM needs two passes: call first_step() and second_step().")

    def _kept(self, p: torch.Tensor) -> torch.Tensor:
        if p not in self._at_w:
            self._at_w[p] = torch.empty_like(p)
        return self._at_w[p]

    def _grad_norm(self) -> torch.Tensor:
        """‖g‖ over every parameter (‖|w| g‖ in adaptive SAM), in float32 or wider."""
        device = self.param_groups[0]["params"][0].device
        squares = [
            fixed_order_sum_of_squares(((torch.abs(p) * p.grad) if group["adaptive"] else p.grad).float()).to(device)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return fixed_order_sum(torch.stack(squares)).sqrt()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


def running_stats(model: nn.Module, enabled: bool) -> None:
    """Let BatchNorm layers update their running statistics, or freeze them (momentum 0)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not enabled:
                m.backup_momentum = m.momentum  # type: ignore[assignment]
                m.momentum = 0.0
            elif hasattr(m, "backup_momentum"):
                m.momentum = m.backup_momentum  # type: ignore[assignment]
