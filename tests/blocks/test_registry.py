"""The extension point: a user's own module type gets a curvature block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac import KFAC, KroneckerBlock, register_block
from torch_kfac.blocks import block_type_for
from torch_kfac.layers import Layer

pytestmark = pytest.mark.usefixtures("float64")


class ScaledLinear(nn.Module):
    """y = s * (x W^T + b) with a fixed scale s: not an nn.Linear subclass."""

    def __init__(self, d_in: int, d_out: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(x, self.weight, self.bias)


class ScaledLinearBlock(Layer):
    """Its gradient w.r.t. the pre-scale output is s times the output gradient."""

    def activation_rows(self, inputs: tuple[Tensor, ...]) -> Tensor:
        x = inputs[0]
        return x.reshape(1, x.shape[0], 1, -1)

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return (self.module.scale * grad_output).reshape(1, grad_output.shape[0], 1, -1)


def test_registered_block_gets_the_right_factors() -> None:
    register_block(ScaledLinear, ScaledLinearBlock)
    model = nn.Sequential(ScaledLinear(3, 4, scale=2.0), nn.Tanh(), nn.Linear(4, 2))
    opt = KFAC(model, 0.1, 1e-2)
    assert isinstance(opt.blocks["0"], ScaledLinearBlock)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    pre = F.linear(x, model[0].weight, model[0].bias).detach().requires_grad_()
    out = model[2](torch.tanh(2.0 * pre))
    (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), pre)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    a = torch.cat([x, torch.ones(10, 1)], 1)
    torch.testing.assert_close(opt.blocks["0"].A, a.T @ a / 10, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.blocks["0"].G, g.T @ g / 10, rtol=1e-12, atol=1e-14)


def test_subclasses_inherit_their_base_block() -> None:
    class MyConv(nn.Conv2d):
        pass

    assert block_type_for(MyConv(1, 1, 3)).__name__ == "ConvBlock"
    assert block_type_for(nn.Bilinear(2, 2, 2)) is None


def test_register_block_rejects_wrong_types() -> None:
    with pytest.raises(TypeError, match="module_type"):
        register_block(int, KroneckerBlock)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="block_type"):
        register_block(nn.Linear, dict)  # type: ignore[arg-type]
