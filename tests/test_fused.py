"""The fused training block against autograd through torch's own modules, and its thread independence."""

import copy

import pytest
import torch
import torch.nn.functional as F

from trainer.fused import GEMM_THREAD_INDEPENDENT, MASK_BITS, _keep, _mask_bits, dropout_mask, realised_p
from trainer.model import MLP
from trainer.products import BF16_THREAD_INDEPENDENT
from trainer.reduce import fixed_order_sum


def _reference(model: MLP, x: torch.Tensor, bits: object) -> torch.Tensor:
    """The same forward pass through F.linear / F.batch_norm / F.leaky_relu and autograd, with the
    masks the fused blocks draw (from a copy of the model's bit source)."""
    h = x
    for i in range(0, len(model.body), 4):
        linear, bn, act, drop = model.body[i:i + 4]
        z = F.linear(h, linear.weight, linear.bias)
        y = F.batch_norm(z, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, True, 0.0, bn.eps)
        y = F.leaky_relu(y, act.negative_slope)
        mask = _keep(_mask_bits(y.shape, y.device, bits), drop.p, y.dtype)  # type: ignore[arg-type]
        h = y * mask / (1 - realised_p(drop.p))
    return model.head(h).squeeze(-1)


def test_fused_block_equals_autograd_through_the_modules_in_float64() -> None:
    torch.manual_seed(0)
    model = MLP(24, hidden=32, depth=3, dropout=0.3).double().train()
    x = (torch.randn(64, 24, dtype=torch.float64) * 2 + 1).requires_grad_()
    reference = copy.deepcopy(model)
    bits = copy.deepcopy(model.mask_bits)
    out = model(x)
    ref_out = _reference(reference, x, bits)
    assert torch.allclose(out, ref_out, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *model.parameters()], g)
    want = torch.autograd.grad(ref_out, [x, *reference.parameters()], g)
    for (name, _), a, b in zip([("input", None), *model.named_parameters()], got, want, strict=True):
        if name.startswith("body.") and name.endswith(".bias") and int(name.split(".")[1]) % 4 == 0:
            # a Linear bias before BatchNorm cancels: its gradient is exactly 0 (autograd: rounding noise)
            assert torch.count_nonzero(a) == 0 and b.abs().max() < 1e-12, name
        else:
            assert torch.allclose(a, b, atol=1e-10), name


def test_running_statistics_move_as_batchnorm_moves_them_once_per_batch() -> None:
    torch.manual_seed(1)
    model = MLP(8, hidden=16, depth=1, dropout=0.0).train()
    bn = model.body[1]
    x = torch.randn(32, 8) * 3 + 2
    model(x)
    z = F.linear(x, model.body[0].weight, model.body[0].bias)
    assert torch.allclose(bn.running_mean, 0.1 * z.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * z.var(0, unbiased=True), atol=1e-5)
    assert bn.num_batches_tracked.item() == 1
    bn.momentum = 0.0  # SAM's second pass: nothing moves, nothing counted
    before = bn.running_mean.clone()
    model(x)
    assert torch.equal(bn.running_mean, before) and bn.num_batches_tracked.item() == 1


def test_bf16_products_err_no_more_than_autocast_through_the_modules() -> None:
    """bf16 operands round gradients through BatchNorm by ~10% here (hidden 128): as much as autocast."""
    torch.manual_seed(2)
    model = MLP(64, hidden=128, depth=3, dropout=0.0).train()
    x, t = torch.randn(256, 64), torch.randn(256)
    ours, autocast = copy.deepcopy(model), copy.deepcopy(model)
    full = model(x)
    (full * t).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ours(x)
        (autocast.head(autocast.body(x)).squeeze(-1).float() * t).sum().backward()
    assert low.dtype == torch.float32  # bf16 operands, fp32 results
    assert (low - full).abs().max() < 0.05 * full.abs().max()
    (low * t).sum().backward()
    for (name, want), got, other in zip(model.named_parameters(), ours.parameters(), autocast.parameters(),
                                        strict=True):
        if not want.grad.any():  # a bias before BatchNorm: exactly 0 here
            continue
        ours_err, autocast_err = ((p.grad - want.grad).abs().max().item() for p in (got, other))
        assert ours_err <= 1.5 * autocast_err + 0.01 * want.grad.abs().max().item(), name
    model.eval(), ours.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ours(x)
    assert (low - model(x)).abs().max() < 0.05 * model(x).abs().max()


def test_a_batch_of_one_is_a_sentence() -> None:
    with pytest.raises(ValueError, match="two samples"):
        MLP(4).train()(torch.randn(1, 4))


def test_dropout_realises_p_to_16_bits_and_keeps_that_fraction() -> None:
    assert realised_p(0.335) == round(0.335 * 2**MASK_BITS) / 2**MASK_BITS
    assert abs(realised_p(0.335) - 0.335) < 2**-17 and realised_p(0.0) == 0.0 and realised_p(0.5) == 0.5
    torch.manual_seed(3)
    mask = dropout_mask((1000, 1000), 0.335, torch.device("cpu"))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.mean().item() == pytest.approx(1 - realised_p(0.335), abs=0.002)  # 5 sd of 10⁶ draws


def _in_threads(threads: int, fn):  # noqa: ANN001, ANN202
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def test_fixed_order_sums_give_the_same_bits_whatever_the_thread_count() -> None:
    values = torch.randn(3_000_001, generator=torch.Generator().manual_seed(5))
    one, two = _in_threads(1, lambda: fixed_order_sum(values)), _in_threads(2, lambda: fixed_order_sum(values))
    assert torch.equal(one, two) and one.item() == pytest.approx(values.double().sum().item(), abs=1e-2)
    assert fixed_order_sum(torch.arange(10.0)).item() == 45.0


@pytest.mark.skipif(not GEMM_THREAD_INDEPENDENT, reason="MKL's thread-independent mode is not in effect here: "
                    "runs carry their thread count in the hash instead")
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_blocks_give_the_same_bits_whatever_the_thread_count(bf16: bool) -> None:
    """Sizes above ATen's 32,768-element grain, so that two threads really split the work (without
    MKL's strict mode, or with torch's own BatchNorm or bf16 products, this fails on this project's
    machine: they round differently with 1 and 2 threads)."""
    if bf16 and not BF16_THREAD_INDEPENDENT:
        pytest.skip("bf16 products go to oneDNN on this CPU (trainer.products): runs carry their thread count")
    torch.manual_seed(4)
    model = MLP(96, hidden=384, depth=3, dropout=0.3).train()
    x = torch.randn(700, 96)  # an odd batch, as an epoch's last one

    def once() -> list[torch.Tensor]:
        m = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x)
            out.square().sum().backward()
            evaluated = m.eval()(x)
        return [out.detach(), evaluated, *[p.grad for p in m.parameters()], m.body[1].running_var.clone()]

    one, two = _in_threads(1, once), _in_threads(2, once)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_fixed_order_sum_of_squares_is_the_sum_of_squares_the_same_whatever_the_thread_count() -> None:
    from trainer.reduce import fixed_order_sum_of_squares

    values = torch.randn(1536, 1537, generator=torch.Generator().manual_seed(6))  # a tail beyond the rows of 1,024
    one = _in_threads(1, lambda: fixed_order_sum_of_squares(values))
    assert torch.equal(one, _in_threads(2, lambda: fixed_order_sum_of_squares(values)))
    assert one.item() == pytest.approx(values.double().square().sum().item(), rel=1e-6)
    assert fixed_order_sum_of_squares(torch.tensor([3.0, 4.0])).item() == 25.0
