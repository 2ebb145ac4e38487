import pytest
import torch
from torch import nn

from trainer.fused import realised_p
from trainer.model import MLP, Dropout


def test_mlp_shape_and_structure() -> None:
    model = MLP(12, depth=3)
    assert model(torch.randn(5, 12)).shape == (5,)
    kinds = [type(m) for m in model.body]
    assert kinds[:4] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, Dropout] and len(kinds) == 12
    assert model.body[0].weight.shape == (12, 12) and model.head.weight.shape == (1, 12)
    assert model.body[3].p == pytest.approx(0.335) and model.body[2].negative_slope == 0.01


def test_dropout_keeps_with_probability_one_minus_p_and_rescales() -> None:
    torch.manual_seed(0)
    drop = Dropout(0.335).train()
    x = torch.ones(400, 500)
    y = drop(x)
    kept = (y > 0).float().mean().item()
    assert kept == pytest.approx(0.665, abs=0.005)
    assert torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / (1 - realised_p(0.335))))  # p to 2⁻¹⁶
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # unbiased, as nn.Dropout
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_dropout_gradient_is_the_mask() -> None:
    torch.manual_seed(1)
    x = torch.ones(64, 8, requires_grad=True)
    y = Dropout(0.5).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y > 0).float() * 2.0)
