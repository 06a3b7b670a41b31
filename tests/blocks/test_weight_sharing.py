"""Weight sharing: KFAC-expand and KFAC-reduce (Eschenhagen et al. 2023) and modules called
several times in one forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.reference import curvlinops_factors
from tests.test_fisher_types import PerPosition
from torch_kfac import KFACPreconditioner

pytestmark = pytest.mark.usefixtures("float64")


def one_step(pre: KFACPreconditioner, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> None:
    """Forward, backward and one preconditioner step."""
    model.zero_grad()
    loss_fn(model(x), y).backward()
    pre.step()


def cnn() -> nn.Module:
    """A small convnet classifier."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_linear_matches_curvlinops(approx: str) -> None:
    model = PerPosition()
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 5, 4, generator=gen), torch.randint(0, 3, (4, 5), generator=gen)
    pre = KFACPreconditioner(model, loss_fn=loss_fn, reduction="mean_positions", kfac_approx=approx)
    one_step(pre, model, loss_fn, x, y)
    ref_a, ref_g = curvlinops_factors(model, loss_fn, x, y, kfac_approx=approx)
    for name, block in pre.blocks.items():
        torch.testing.assert_close(block.A, ref_a[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.G, ref_g[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_matches_curvlinops(approx: str) -> None:
    model = cnn()
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 2, 6, 6, generator=gen), torch.randint(0, 4, (5,), generator=gen)
    pre = KFACPreconditioner(model, kfac_approx=approx)
    one_step(pre, model, loss_fn, x, y)
    ref_a, ref_g = curvlinops_factors(model, loss_fn, x, y, kfac_approx=approx)
    for name, block in pre.blocks.items():
        torch.testing.assert_close(block.A, ref_a[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.G, ref_g[name], rtol=1e-10, atol=1e-12)


class Twice(nn.Module):
    """The same Linear applied twice (a shared layer), then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_gets_expand_factors_over_its_calls() -> None:
    model = Twice()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    inputs: list[Tensor] = []
    probes: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        inputs.append(args[0].detach())
        probes.append(torch.zeros_like(output, requires_grad=True))
        return output + probes[-1]

    handle = model.shared.register_forward_hook(hook)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), probes)
    handle.remove()
    a = torch.cat([torch.cat([i, torch.ones(6, 1)], 1) for i in inputs])
    expected_a = a.T @ a / 12
    expected_g = sum((6 * g).T @ (6 * g) for g in grads) / 6

    pre = KFACPreconditioner(model)
    one_step(pre, model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(pre.blocks["shared"].A, expected_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pre.blocks["shared"].G, expected_g, rtol=1e-10, atol=1e-12)


def test_separate_backward_passes_are_pooled() -> None:
    """Gradient accumulation over two identical micro-batches (each loss halved, so that the
    gradients add up to the batch's) gives the one-batch factors."""
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    results = []
    for micro in (1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        pre = KFACPreconditioner(model)
        for _ in range(micro):
            (F.cross_entropy(model(x), y) / micro).backward()
        pre.step()
        results.append({n: (b.A, b.G) for n, b in pre.blocks.items()})
    for name, (a, g) in results[0].items():
        torch.testing.assert_close(results[1][name][0], a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(results[1][name][1], g, rtol=1e-12, atol=1e-14)


def test_invalid_kfac_approx() -> None:
    with pytest.raises(ValueError, match="kfac_approx"):
        KFACPreconditioner(nn.Linear(2, 2), kfac_approx="sum")
