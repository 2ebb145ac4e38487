"""SAM: the perturbation has norm ρ, weights are restored before the base step, BN moves once."""

import pytest
import torch
from torch import nn

from trainer.fit import FitConfig, train_step
from trainer.model import MLP
from trainer.sam import SAM, running_stats


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def test_perturbation_norm_is_rho_and_weights_are_restored() -> None:
    torch.manual_seed(0)
    model = MLP(8, depth=2, dropout=0.0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    w0 = _flat(model.parameters())
    nn.functional.binary_cross_entropy_with_logits(model(x), y.float()).backward()
    opt.first_step(zero_grad=True)
    assert (_flat(model.parameters()) - w0).norm().item() == pytest.approx(0.05, rel=1e-4)

    nn.functional.binary_cross_entropy_with_logits(model(x), y.float()).backward()
    grads_at_perturbed = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    # SGD step from the *original* weights with the gradient taken at the perturbed ones
    expected = w0 - 0.1 * torch.cat([g.flatten() for g in grads_at_perturbed])
    assert torch.allclose(_flat(model.parameters()), expected, atol=1e-6)


def test_adaptive_perturbation_scales_by_weight_magnitude() -> None:
    w = nn.Parameter(torch.tensor([1.0, 0.0, 2.0]))
    w.grad = torch.tensor([1.0, 1.0, 1.0])
    opt = SAM([w], torch.optim.SGD, rho=0.1, adaptive=True, lr=0.1)
    opt.first_step(zero_grad=False)
    e = w.detach() - torch.tensor([1.0, 0.0, 2.0])
    assert e[1].item() == 0.0  # a zero weight is not moved
    assert (e.abs() / torch.tensor([1.0, 1.0, 2.0])).norm().item() == pytest.approx(0.1, rel=1e-4)


def test_batchnorm_statistics_move_on_the_first_pass_only() -> None:
    torch.manual_seed(0)
    model = MLP(4, depth=1, dropout=0.0)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    x, y = torch.randn(32, 4) * 3 + 1, torch.randint(0, 2, (32,))
    reference = MLP(4, depth=1, dropout=0.0)
    reference.load_state_dict(model.state_dict())
    ref_bn = next(m for m in reference.modules() if isinstance(m, nn.BatchNorm1d))
    reference.train()
    reference(x)  # exactly one update of the running statistics
    config = FitConfig(sam=True, cvar=False, auc=False, precision="fp32")
    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    model.train()
    train_step(model, optimizer, x, y, config)
    assert torch.allclose(bn.running_mean, ref_bn.running_mean)
    assert torch.allclose(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == 1  # the second pass (momentum 0) neither moves nor counts
    running_stats(model, True)
    assert bn.momentum == 0.1


def test_plain_step_without_sam() -> None:
    model = MLP(4, depth=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = train_step(model, opt, torch.randn(8, 4), torch.randint(0, 2, (8,)), FitConfig(sam=False))
    assert loss > 0
