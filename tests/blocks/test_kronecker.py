"""K-FAC's A (x) G approximation (`blocks/kronecker.py`) against dense Kronecker solves in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.blocks.tiny import labels, linear_block, model_for, run, spd
from tests.reference import dense_preconditioned, unvec, vec
from torch_kfac.blocks import ConvBlock
from torch_kfac.blocks.kronecker import KroneckerFactors

pytestmark = pytest.mark.usefixtures("float64")

EXACT = {"rtol": 1e-10, "atol": 1e-12}
DAMPING = torch.tensor(0.05, dtype=torch.float64)


def test_kfac_is_the_default() -> None:
    block = linear_block("kfac")
    assert isinstance(block.approx, KroneckerFactors) and block.FACTORS == ("A", "G")
    assert block.FORWARD_FACTORS == ("A",) and block.needs_output_grads


@pytest.mark.parametrize("pi_correction", [False, True])
def test_cholesky_inverses_solve_the_factored_damped_kronecker_product(pi_correction: bool) -> None:
    block = linear_block("kfac")
    block.update_inverses(DAMPING, pi_correction, "cholesky")
    assert {"A_inv", "G_inv"} <= set(block.state) and "A_eigvecs" not in block.state
    mat = torch.randn(3, 5)
    expected = dense_preconditioned(block.A, block.G, mat, 0.05, pi_correction)
    torch.testing.assert_close(block.precondition(mat[None], DAMPING, pi_correction)[0], expected, **EXACT)


@pytest.mark.parametrize("damping_type", ["factored", "exact"])
def test_eigh_applies_the_damping_when_preconditioning(damping_type: str) -> None:
    block = linear_block("kfac")
    block.update_inverses(DAMPING, True, "eigh")
    assert "A_inv" not in block.state and block.has_inverses()
    mat = torch.randn(3, 5)
    for damping in (0.05, 0.3):  # a new damping takes effect without refreshing the eigenbases
        expected = dense_preconditioned(block.A, block.G, mat, damping, True, damping_type)
        got = block.precondition(mat[None], torch.tensor(damping), True, damping_type)[0]
        torch.testing.assert_close(got, expected, **EXACT)


def test_refreshing_drops_the_other_methods_caches() -> None:
    block = linear_block("kfac")
    block.update_inverses(DAMPING, True, "cholesky")
    block.update_inverses(DAMPING, True, "eigh")
    assert "A_inv" not in block.state and "G_inv" not in block.state and "G_eigvecs" in block.state


def test_power_half_is_the_product_of_the_factor_powers() -> None:
    model, x, name = model_for("linear")
    y = labels(x.shape[0])
    options = {"inverse_method": "eigh", "inverse_power": -0.5, "damping": 1e-2}
    pre = run(model, x, y, enable_pi_correction=False, **options)
    block = pre.blocks[name]
    mat = torch.randn(3, 6)

    def inv_sqrt(m: Tensor) -> Tensor:
        vals, vecs = torch.linalg.eigh(m + 0.1 * torch.eye(m.shape[0]))
        return vecs @ torch.diag(vals.rsqrt()) @ vecs.T

    expected = inv_sqrt(block.G) @ mat @ inv_sqrt(block.A)
    got = block.precondition(mat[None], pre.damping, False)[0]
    torch.testing.assert_close(got, expected, **EXACT)


def test_curvature_product_and_dense_curvature() -> None:
    block = linear_block("kfac")
    mat = torch.randn(3, 5)
    torch.testing.assert_close(block.curvature_product(mat[None])[0], block.G @ mat @ block.A, **EXACT)
    dense = torch.kron(block.A, block.G) + 0.05 * torch.eye(15)
    torch.testing.assert_close(block.dense_curvature(0.05), dense, **EXACT)


def test_groups_are_preconditioned_block_by_block() -> None:
    block = ConvBlock(nn.Conv2d(4, 6, 2, groups=2), "conv")
    block.A = torch.stack([spd(9, 1), spd(9, 3)])
    block.G = torch.stack([spd(3, 2), spd(3, 4)])
    mat = torch.randn(2, 3, 9)
    for method in ("cholesky", "eigh"):
        block.update_inverses(DAMPING, True, method)
        expected = dense_preconditioned(block.A, block.G, mat, 0.05, True)
        torch.testing.assert_close(block.precondition(mat, DAMPING, True), expected, **EXACT)
    product = block.curvature_product(mat)
    for group in range(2):
        dense = torch.kron(block.A[group], block.G[group])
        torch.testing.assert_close(product[group], unvec(dense @ vec(mat[group]), 3, 9), **EXACT)
