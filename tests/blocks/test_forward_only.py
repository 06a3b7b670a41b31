"""The forward-only approximation (`blocks/forward_only.py`): A (x) I, in float64."""

from __future__ import annotations

import pytest
import torch

from tests.blocks.tiny import labels, linear_block, model_for, run
from torch_kfac.blocks.forward_only import ForwardOnly

pytestmark = pytest.mark.usefixtures("float64")

EXACT = {"rtol": 1e-10, "atol": 1e-12}
DAMPING = torch.tensor(0.05, dtype=torch.float64)


def test_forward_only_records_no_backward_statistics() -> None:
    model, x, name = model_for("linear")
    y = labels(x.shape[0])
    block = run(model, x, y, approximation="forward-only").blocks[name]
    assert isinstance(block.approx, ForwardOnly)
    assert block.FACTORS == ("A",) and not block.has_factor("G") and block.has_factors()
    assert not block.needs_output_grads


def test_cholesky_inverse_is_the_damped_input_factors() -> None:
    block = linear_block("forward-only")
    block.update_inverses(DAMPING, True, "cholesky")  # no G: the damping is not split by pi
    mat = torch.randn(3, 5)
    expected = mat @ torch.linalg.inv(block.A + 0.05 * torch.eye(5))
    torch.testing.assert_close(block.precondition(mat[None], DAMPING, True)[0], expected, **EXACT)


@pytest.mark.parametrize("power", [-1.0, -0.5])
def test_eigh_applies_the_damped_power_of_a(power: float) -> None:
    block = linear_block("forward-only", power)
    block.update_inverses(DAMPING, True, "eigh")
    vals, vecs = torch.linalg.eigh(block.A)
    mat = torch.randn(3, 5)
    expected = mat @ vecs @ torch.diag((vals + 0.05).pow(power)) @ vecs.T
    torch.testing.assert_close(block.precondition(mat[None], DAMPING, True)[0], expected, **EXACT)


def test_curvature_is_a_kron_identity() -> None:
    block = linear_block("forward-only")
    mat = torch.randn(3, 5)
    torch.testing.assert_close(block.curvature_product(mat[None])[0], mat @ block.A, **EXACT)
    torch.testing.assert_close(block.dense_curvature(), torch.kron(block.A, torch.eye(3)), **EXACT)
