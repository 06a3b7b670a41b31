"""Tiny models, labels and per-example gradients shared by the approximation tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from torch_kfac import KFACPreconditioner
from torch_kfac.blocks import LinearBlock


def model_for(kind: str) -> tuple[nn.Module, Tensor, str]:
    """A tiny model ('linear', 'sequence' or 'conv'), its inputs and the name of the layer under test."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    if kind == "linear":
        return (
            nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
            torch.randn(6, 4, generator=gen),
            "2",
        )
    if kind == "sequence":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3))
        return model, torch.randn(6, 3, 4, generator=gen), "0"
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)
    )
    return model, torch.randn(6, 2, 4, 4, generator=gen), "0"


def labels(n: int) -> Tensor:
    """Fixed class labels in {0, 1, 2}."""
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(8))


def per_example_matrices(model: nn.Module, x: Tensor, y: Tensor, name: str) -> Tensor:
    """Per-example gradients of l_n as (N, d_out, d_in [+1]) matrices of layer `name`."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    weight = grads[f"{name}.weight"].reshape(x.shape[0], grads[f"{name}.weight"].shape[1], -1)
    if f"{name}.bias" in grads:
        weight = torch.cat([weight, grads[f"{name}.bias"][..., None]], -1)
    return weight


def run(model: nn.Module, x: Tensor, y: Tensor, steps: int = 1, **options) -> KFACPreconditioner:
    """A preconditioner after `steps` cross-entropy steps on the same batch."""
    pre = KFACPreconditioner(model, **options)
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    return pre


def spd(dim: int, seed: int) -> Tensor:
    """A random symmetric positive definite (dim, dim) matrix."""
    m = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed))
    return m @ m.T / dim + 0.1 * torch.eye(dim)


def linear_block(approximation: str, power: float = -1.0, d_in: int = 4, d_out: int = 3) -> LinearBlock:
    """A block of an nn.Linear(d_in, d_out) with random SPD factors A ((d_in + 1)^2) and G (d_out^2)."""
    block = LinearBlock(nn.Linear(d_in, d_out), "layer")
    block.configure(approximation, power)
    if "A" in block.FACTORS:
        block.A = spd(d_in + 1, 1)
    if "G" in block.FACTORS:
        block.G = spd(d_out, 2)
    return block
