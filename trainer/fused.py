"""The MLP's hidden block in training as one autograd node: Linear → BatchNorm1d → LeakyReLU → Dropout.

Written out by hand because eager torch spent ~30% of a SAM step outside the matrix products on
this block (bench/bench_train.py): each op allocates and walks a 2048 × 1536 tensor, BatchNorm's CPU
kernel reduces in an order that depends on the thread count, dropout drew a float per unit. Here,
with the batch statistics μ, σ² of z = h Wᵀ and x̂ = (z − μ)/√(σ² + ε):

    forward   y = LeakyReLU(y') · m,  y' = (γ x̂ + β) / (1 − p)      m_ij ∈ {0, 1}, P(m_ij = 1) = 1 − p
    backward  ∂L/∂y' = g · d,  d = m · LeakyReLU'(y')                    (g = ∂L/∂y)
              ∂L/∂β = Σ_i ∂L/∂y'_i / (1 − p),   ∂L/∂γ = Σ_i ∂L/∂y'_i x̂_i / (1 − p)
              ∂L/∂z = γ/((1 − p)√(σ² + ε)) · (∂L/∂y' − mean_i ∂L/∂y' − x̂ · mean_i(∂L/∂y' x̂))
              ∂L/∂W = (∂L/∂z)ᵀ h,   ∂L/∂h = (∂L/∂z) W,   ∂L/∂b = 0

(dropout's 1/(1 − p) moves inside LeakyReLU, which commutes with a positive factor). The Linear bias
b cancels against the batch mean, so it is left out of the product and its gradient is exactly 0;
it still enters the running mean, so evaluation is unchanged. (Autograd computes rounding noise of
~1e-8 for ∂L/∂b, which Adam's normalisation turns into random lr-sized steps of b.)

Every reduction is over the batch with one output per feature, which ATen splits by feature, never
along the batch, and the products go through `trainer.products`: the same rounding whatever the
thread count. In bf16 the products take bf16 operands (`trainer.products` says where they give
fp32 results and where bf16 ones); the statistics, the element-wise work and the gradients between
blocks stay in fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.products import THREAD_INDEPENDENT, matmul
from trainer.reduce import fixed_order_sum

GEMM_THREAD_INDEPENDENT = THREAD_INDEPENDENT  # (the name the trainer's other modules use)
MASK_BITS = 16  # random bits per dropout unit: p is realised to 1/65536 (0.335 → 0.3350067)


def realised_p(p: float) -> float:
    """The dropout probability a 16-bit draw realises for `p` (the nearest multiple of 2⁻¹⁶)."""
    return round(p * (1 << MASK_BITS)) / (1 << MASK_BITS)


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A mask of 1 (probability 1 − `realised_p(p)`) and 0 in `dtype`, from torch's default generator."""
    return _keep(_mask_bits(shape, device), p, dtype)


class MaskBits:
    """Random bits for dropout masks on the CPU: numpy's SFC64, seeded once from torch's default
    generator (so a seeded run draws the same masks). Its raw 64-bit draws cost half of torch's
    Mersenne Twister (1.2 against 2.6 ms for 2048 × 1536 units on one core); other devices draw
    from torch's generator for that device."""

    def __init__(self) -> None:
        seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
        self.generator = np.random.Generator(np.random.SFC64(seed))

    def words(self, count: int) -> torch.Tensor:
        return torch.from_numpy(self.generator.bit_generator.random_raw(count).view(np.int64))


def hidden_block(h: torch.Tensor, h_low: torch.Tensor, linear: nn.Linear, bn: nn.BatchNorm1d, slope: float,
                 p: float, dtype: torch.dtype, bits: MaskBits | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training-mode block: `h` carries the gradient, `h_low` (h in `dtype`) feeds the product.
    Returns the block's output and its copy in `dtype`. Updates `bn`'s running statistics unless its
    momentum is 0 (SAM's second pass), counting the batch only when it does."""
    if h.shape[0] < 2:
        raise ValueError("BatchNorm needs at least two samples in a training batch")
    assert bn.affine and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
    out, out_low, mean, var = _HiddenBlock.apply(h, h_low, linear.weight, linear.bias, bn.weight, bn.bias, bn.eps,
                                                 slope, p, dtype, bits)
    if bn.momentum is None or bn.momentum > 0:
        with torch.no_grad():
            assert bn.num_batches_tracked is not None
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            n = h.shape[0]
            bn.running_mean.mul_(1 - m).add_(mean + linear.bias.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var * (n / (n - 1)), alpha=m)  # unbiased, as BatchNorm1d
    return out, (out if out_low is None else out_low)


def head(h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """The output layer's logits s = h wᵀ + b (one per row), in fp32 whatever the blocks' precision
    (0.01% of the step's FLOPs), its bias gradient added in a fixed order."""
    return _Head.apply(h, linear.weight, linear.bias)


@torch.no_grad()
def evaluate_blocks(model: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The MLP in evaluation with products in `dtype` through `trainer.products` (bf16 autocast would
    send them to oneDNN, whose rounding changes with the thread count): BatchNorm with its running
    statistics, no dropout."""
    h = x.float()
    for i in range(0, len(model.body), 4):
        linear, bn, act = model.body[i], model.body[i + 1], model.body[i + 2]
        z = matmul(h, linear.weight.t(), dtype) + linear.bias
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        h = torch.nn.functional.leaky_relu(torch.addcmul(bn.bias - bn.running_mean * scale, z, scale),
                                           act.negative_slope)
    return (matmul(h, model.head.weight.t(), h.dtype) + model.head.bias).squeeze(-1)


class _HiddenBlock(torch.autograd.Function):
    """Saved for the backward pass: h and W (in `dtype`), z − μ, 1/√(σ² + ε), γ and d = m · LeakyReLU'.
    Each batch-sized tensor is written once and reused where the formulas allow: on the CPU these
    passes are bound by memory bandwidth, not arithmetic."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, h_low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                gamma: torch.Tensor, beta: torch.Tensor, eps: float, slope: float, p: float, dtype: torch.dtype,
                bits: MaskBits | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        w = weight.to(dtype)
        c = matmul(h_low, w.t(), dtype)  # z, in fp32 (fp64 for fp64)
        mean = c.sum(0) / n
        c.sub_(mean)  # z − μ
        y = torch.mul(c, c)
        var = y.sum(0) / n
        invstd = torch.rsqrt(var + eps)
        keep = 1.0 / (1.0 - realised_p(p))
        torch.addcmul(beta * keep, c, gamma * invstd * keep, out=y)  # y', in the squares' memory
        # d = m · LeakyReLU'(y'): the mask where y' > 0, slope × mask elsewhere (one kernel: LeakyReLU's
        # backward applied to the mask). Then y = LeakyReLU(y') · m = y' · d.
        d = _keep(_mask_bits(y.shape, y.device, bits), p, c.dtype) if p > 0 else torch.ones_like(y)
        torch.ops.aten.leaky_relu_backward.grad_input(d, y, slope, False, grad_input=d)
        y.mul_(d)
        low = y.to(dtype) if dtype != y.dtype else None
        ctx.save_for_backward(h_low, w, c, invstd, gamma, d)
        ctx.keep, ctx.dtype, ctx.weight_dtype = keep, dtype, weight.dtype
        ctx.mark_non_differentiable(*([low] if low is not None else []), mean, var)
        return y, low, mean, var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        h_low, w, c, invstd, gamma, d = ctx.saved_tensors
        n, keep = grad.shape[0], ctx.keep
        g = torch.mul(grad, d)  # ∂L/∂y'
        sum_g = g.sum(0)
        sum_gc = torch.mul(g, c).sum(0)  # (vecdot gives the same bits at 3× the time here)
        k = gamma * invstd * keep
        grad_z = torch.addcmul(k * sum_g * (-1.0 / n), g, k, out=g)  # (reuses g's memory)
        grad_z.addcmul_(c, k * invstd * invstd * sum_gc * (-1.0 / n))
        grad_zq = grad_z.to(ctx.dtype)
        grad_h = matmul(grad_zq, w, ctx.dtype) if ctx.needs_input_grad[0] else None
        grad_w = matmul(grad_zq.t(), h_low, ctx.dtype).to(ctx.weight_dtype) if ctx.needs_input_grad[2] else None
        grad_b = torch.zeros_like(gamma) if ctx.needs_input_grad[3] else None  # b cancels (see the docstring)
        grad_gamma = sum_gc * invstd * keep if ctx.needs_input_grad[4] else None
        grad_beta = sum_g * keep if ctx.needs_input_grad[5] else None
        return grad_h, None, grad_w, grad_b, grad_gamma, grad_beta, None, None, None, None, None


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return (torch.mm(h, weight.t()) + bias).squeeze(-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        grad_h = grad[:, None] * weight if ctx.needs_input_grad[0] else None  # (an outer product)
        grad_w = torch.mm(grad[None, :], h) if ctx.needs_input_grad[1] else None
        grad_b = fixed_order_sum(grad).reshape(1) if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b


def _mask_bits(shape: torch.Size | tuple[int, ...], device: torch.device,
               source: MaskBits | None = None) -> torch.Tensor:
    """16 random bits per unit (int16, uniform on [−2¹⁵, 2¹⁵)): one 64-bit draw gives four units (a
    float per unit, as `torch.rand` draws, costs ~4× more: 9.7 ms against 2.6 ms for 2048 × 1536
    units on one core of this machine). From `source` on the CPU, else torch's default generator."""
    n = 1
    for size in shape:
        n *= size
    count = (n + 3) // 4
    if source is not None and device.type == "cpu":
        words = source.words(count)
    else:
        words = torch.empty(count, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return words.view(torch.int16)[:n].view(shape)


def _keep(bits: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """1 where a unit is kept (probability 1 − `realised_p(p)`), else 0, in `dtype`."""
    threshold = round(p * (1 << MASK_BITS)) - (1 << (MASK_BITS - 1))
    return torch.ge(bits, threshold, out=torch.empty(bits.shape, dtype=dtype, device=bits.device))
