"""The detector: an MLP over concatenated CLIP features that outputs one logit."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from trainer.fused import MaskBits, dropout_mask, evaluate_blocks, head, hidden_block, realised_p


class Dropout(nn.Module):
    """Inverted dropout, as `nn.Dropout`: each unit kept with probability 1 − p and scaled by 1/(1 − p).

    The mask takes 16 random bits per unit from torch's generator (`trainer.fused.dropout_mask`, so p
    is realised to 1/65536): ~10× faster on CPU than `nn.Dropout`, whose `bernoulli_` draw took 43% of
    a whole SAM step at batch 2048 × 1536 (bench/bench_train.py). The MLP's training pass does the
    same inside its fused block; this module serves evaluation and direct use.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), not {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = dropout_mask(x.shape, self.p, x.device).to(x.dtype)
        return x * keep * (1.0 / (1.0 - realised_p(self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """`depth` blocks of Linear(d, d) → BatchNorm1d → LeakyReLU → Dropout, then Linear(d, 1).

    With the paper's defaults (hidden = input width, depth 3, dropout 0.335, slope 0.01). In training
    each block runs as one fused autograd node (`trainer.fused`); evaluation runs the modules. Under
    autocast the products take operands in its dtype (bf16) through `trainer.products` (fp32 accumulation,
    the same whatever the thread count where MKL computes them); statistics, activations and gradients stay in fp32.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int | None = None,
        depth: int = 3,
        dropout: float = 0.335,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        width = hidden or in_dim
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.LeakyReLU(negative_slope), Dropout(dropout)]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, 1)
        self.negative_slope = negative_slope
        self.reset_parameters()
        self.mask_bits = MaskBits()  # dropout's random bits in training, seeded from torch's generator

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=self.negative_slope, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.head.weight.dtype
        with torch.autocast(device, enabled=False):  # products go through trainer.products instead
            if not self.training:
                if dtype == self.head.weight.dtype:
                    return self.head(self.body(x)).squeeze(-1)
                return evaluate_blocks(self, x, dtype)
            h, h_low = x, x.to(dtype)
            for i in range(0, len(self.body), 4):
                linear, bn = cast(nn.Linear, self.body[i]), cast(nn.BatchNorm1d, self.body[i + 1])
                act, drop = cast(nn.LeakyReLU, self.body[i + 2]), cast(Dropout, self.body[i + 3])
                slope, p = float(act.negative_slope), float(drop.p)
                h, h_low = hidden_block(h, h_low, linear, bn, slope, p, dtype, self.mask_bits)
            return head(h if h.dtype == self.head.weight.dtype else h.to(self.head.weight.dtype), self.head)
