"""Per-block approximations (K-FAC, EKFAC, diagonal, forward-only) and powers -1 and -1/2,
against per-example gradients from torch.func and dense matrix functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from torch_kfac import KFACPreconditioner

pytestmark = pytest.mark.usefixtures("float64")


def model_for(kind: str) -> tuple[nn.Module, Tensor, Tensor, str]:
    """A tiny model, its inputs and labels, and the name of the layer under test."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    if kind == "linear":
        return (
            nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
            torch.randn(6, 4, generator=gen),
            None,
            "2",
        )
    if kind == "sequence":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3))
        return model, torch.randn(6, 3, 4, generator=gen), None, "0"
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)
    )
    return model, torch.randn(6, 2, 4, 4, generator=gen), None, "0"


def labels(n: int) -> Tensor:
    """Fixed class labels."""
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
    """A preconditioner after `steps` steps on the same batch."""
    pre = KFACPreconditioner(model, **options)
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    return pre


@pytest.mark.parametrize("kind", ["linear", "sequence", "conv"])
def test_diagonal_is_the_exact_fisher_diagonal(kind: str) -> None:
    model, x, _, name = model_for(kind)
    y = labels(x.shape[0])
    pre = run(model, x, y, approximation="diagonal")
    expected = per_example_matrices(model, x, y, name).square().mean(0)
    state = pre.blocks[name].state
    torch.testing.assert_close(state["D_ema"][0] / state["D_weight"], expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["linear", "sequence", "conv"])
def test_ekfac_diagonal_in_the_kronecker_eigenbasis(kind: str) -> None:
    model, x, _, name = model_for(kind)
    y = labels(x.shape[0])
    pre = run(
        model,
        x,
        y,
        approximation="ekfac",
        factor_update_steps=1,
        inverse_update_steps=100,
        warmup_steps=0,
        cov_ema_decay=0.0,
    )
    block = pre.blocks[name]
    qa, qg = block.state["A_eigvecs"][0], block.state["G_eigvecs"][0]
    init = block.state["G_eigvals"][0][:, None] * block.state["A_eigvals"][0][None, :]
    torch.testing.assert_close(block.state["S_ema"][0], init)  # basis just computed: S from eigenvalues
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()  # re-estimates S in the (unchanged) basis
    projected = qg.T @ per_example_matrices(model, x, y, name) @ qa
    torch.testing.assert_close(block.state["S_ema"][0], projected.square().mean(0), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("approximation", ["kfac", "ekfac", "diagonal", "forward-only"])
@pytest.mark.parametrize("power", [-1.0, -0.5])
def test_preconditioning_is_the_damped_matrix_power(approximation: str, power: float) -> None:
    model, x, _, name = model_for("linear")
    y = labels(x.shape[0])
    damping = 1e-2
    options = {"approximation": approximation, "inverse_power": power, "damping": damping}
    options |= {"inverse_method": "eigh", "damping_type": "exact", "inverse_update_steps": 1}
    pre = run(model, x, y, steps=2, **options)  # second step: EKFAC has an estimated S
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], 1)
    pre.step()
    block = pre.blocks[name]
    dense = block.dense_curvature(damping)
    vals, vecs = torch.linalg.eigh(dense)
    expected = (vecs @ torch.diag(vals.pow(power)) @ vecs.T @ raw.T.reshape(-1)).reshape(raw.shape[1], -1).T
    got = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], 1)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


def test_forward_only_records_no_backward_statistics() -> None:
    model, x, _, name = model_for("linear")
    y = labels(x.shape[0])
    pre = run(model, x, y, approximation="forward-only")
    block = pre.blocks[name]
    assert block.FACTORS == ("A",) and not block.has_factor("G")
    assert not block.needs_output_grads


def test_kfac_power_half_matches_the_factor_powers() -> None:
    model, x, _, name = model_for("linear")
    y = labels(x.shape[0])
    pre = run(
        model, x, y, inverse_method="eigh", inverse_power=-0.5, damping=1e-2, enable_pi_correction=False
    )
    block = pre.blocks[name]
    mat = torch.randn(3, 6)

    def inv_sqrt(m: Tensor) -> Tensor:
        vals, vecs = torch.linalg.eigh(m + 0.1 * torch.eye(m.shape[0]))
        return vecs @ torch.diag(vals.rsqrt()) @ vecs.T

    expected = inv_sqrt(block.G) @ mat @ inv_sqrt(block.A)
    got = block.precondition(mat[None], pre.damping, False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"approximation": "kron"}, "approximation"),
        ({"inverse_power": -2.0}, "inverse_power"),
        ({"inverse_power": -0.5}, "eigh"),
    ],
)
def test_invalid_approximation_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KFACPreconditioner(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize("approximation", ["ekfac", "diagonal", "forward-only"])
def test_approximations_train_with_kfac(approximation: str) -> None:
    from torch_kfac import KFAC

    model, x, _, _ = model_for("conv")
    y = labels(x.shape[0])
    opt = KFAC(model, 0.2, 1e-2, approximation=approximation, inverse_method="eigh", inverse_update_steps=3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
