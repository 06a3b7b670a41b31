"""EKFAC (`blocks/ekfac.py`): the diagonal S in K-FAC's eigenbasis, against per-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.blocks.tiny import labels, linear_block, model_for, per_example_matrices, run
from tests.reference import unvec, vec
from torch_kfac.blocks.ekfac import EigenbasisDiagonal

pytestmark = pytest.mark.usefixtures("float64")

EXACT = {"rtol": 1e-10, "atol": 1e-12}
DAMPING = torch.tensor(0.05, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["linear", "sequence", "conv"])
def test_ekfac_diagonal_in_the_kronecker_eigenbasis(kind: str) -> None:
    model, x, name = model_for(kind)
    y = labels(x.shape[0])
    options = {"factor_update_steps": 1, "inverse_update_steps": 100, "warmup_steps": 0, "cov_ema_decay": 0.0}
    pre = run(model, x, y, approximation="ekfac", **options)
    block = pre.blocks[name]
    qa, qg = block.state["A_eigvecs"][0], block.state["G_eigvecs"][0]
    init = block.state["G_eigvals"][0][:, None] * block.state["A_eigvals"][0][None, :]
    torch.testing.assert_close(block.state["S_ema"][0], init)  # basis just computed: S from eigenvalues
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()  # re-estimates S in the (unchanged) basis
    projected = qg.T @ per_example_matrices(model, x, y, name) @ qa
    torch.testing.assert_close(block.state["S_ema"][0], projected.square().mean(0), rtol=1e-9, atol=1e-14)


def test_factors_and_statistics() -> None:
    block = linear_block("ekfac")
    assert isinstance(block.approx, EigenbasisDiagonal) and block.FACTORS == ("A", "G", "S")
    assert block.has_factors()  # S is not needed before the first basis
    assert not block.approx.joint_statistics()  # no basis: no per-example statistics yet
    block.update_inverses(DAMPING, True, "cholesky")  # the method does not matter: S needs a basis
    assert block.approx.joint_statistics() and "A_inv" not in block.state


def test_a_new_basis_restarts_s_and_drops_what_was_kept_for_the_old_one() -> None:
    block = linear_block("ekfac")
    block.update_inverses(DAMPING, True, "eigh")
    block._saved_rows.append(torch.ones(1, 2, 1, 5))
    block.add_backward_statistic("S", torch.ones(1, 3, 5), 2)
    block.A = 2.0 * block.A
    block.update_inverses(DAMPING, True, "eigh")
    assert not block._saved_rows and not block.has_pending("S")
    la, lg = torch.linalg.eigvalsh(block.A), torch.linalg.eigvalsh(block.G)
    torch.testing.assert_close(block.state["S_ema"][0], lg[:, None] * la[None, :], **EXACT)
    assert block.state["S_weight"] == 1.0


@pytest.mark.parametrize("power", [-1.0, -0.5])
def test_preconditioning_is_the_damped_power_of_the_eigenbasis_diagonal(power: float) -> None:
    block = linear_block("ekfac", power)
    block.update_inverses(DAMPING, True, "eigh")
    s = torch.rand(1, 3, 5) + 0.1
    block.state["S_ema"], block.state["S_weight"] = 2.0 * s, torch.tensor(2.0)
    qa, qg = torch.linalg.eigh(block.A)[1], torch.linalg.eigh(block.G)[1]
    basis = torch.kron(qa, qg)  # the eigenvectors' signs cancel in basis diag(.) basis^T
    dense = basis @ torch.diag((s[0].T.reshape(-1) + 0.05).pow(power)) @ basis.T
    mat = torch.randn(3, 5)
    got = block.precondition(mat[None], DAMPING, True)[0]
    torch.testing.assert_close(got, unvec(dense @ vec(mat), 3, 5), **EXACT)
    curvature = basis @ torch.diag(s[0].T.reshape(-1)) @ basis.T
    torch.testing.assert_close(
        block.curvature_product(mat[None])[0], unvec(curvature @ vec(mat), 3, 5), **EXACT
    )
    torch.testing.assert_close(block.dense_curvature(), curvature, **EXACT)


def test_before_a_basis_the_curvature_is_kfacs() -> None:
    block = linear_block("ekfac")
    mat = torch.randn(3, 5)
    torch.testing.assert_close(block.curvature_product(mat[None])[0], block.G @ mat @ block.A, **EXACT)
    torch.testing.assert_close(block.dense_curvature(), torch.kron(block.A, block.G), **EXACT)
