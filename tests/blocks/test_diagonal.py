"""The diagonal approximation (`blocks/diagonal.py`): the exact diagonal of the Fisher, in float64."""

from __future__ import annotations

import pytest
import torch

from tests.blocks.tiny import labels, linear_block, model_for, per_example_matrices, run
from torch_kfac.blocks.diagonal import DiagonalFisher

pytestmark = pytest.mark.usefixtures("float64")

EXACT = {"rtol": 1e-10, "atol": 1e-12}


@pytest.mark.parametrize("kind", ["linear", "sequence", "conv"])
def test_diagonal_is_the_exact_fisher_diagonal(kind: str) -> None:
    model, x, name = model_for(kind)
    y = labels(x.shape[0])
    pre = run(model, x, y, approximation="diagonal")
    expected = per_example_matrices(model, x, y, name).square().mean(0)
    state = pre.blocks[name].state
    torch.testing.assert_close(state["D_ema"][0] / state["D_weight"], expected, rtol=1e-10, atol=1e-14)
    assert not any(k.startswith(("A_", "G_")) for k in state)  # no Kronecker factors kept


def test_rows_are_kept_from_the_first_call() -> None:
    block = linear_block("diagonal")
    assert isinstance(block.approx, DiagonalFisher) and block.FACTORS == ("D",)
    assert block.FORWARD_FACTORS == () and block.approx.joint_statistics()
    assert not block.has_inverses()


@pytest.mark.parametrize("power", [-1.0, -0.5])
def test_preconditioning_is_elementwise(power: float) -> None:
    block = linear_block("diagonal", power)
    d = torch.rand(1, 3, 5) + 0.1
    block.state["D_ema"], block.state["D_weight"] = 0.5 * d, torch.tensor(0.5)
    block.update_inverses(torch.tensor(0.05), True, "cholesky")
    assert set(block.state) == {"D_ema", "D_weight"} and block.has_inverses()  # nothing to cache
    mat = torch.randn(1, 3, 5)
    torch.testing.assert_close(block.precondition(mat, torch.tensor(0.05), True), mat * (d + 0.05).pow(power))
    torch.testing.assert_close(block.curvature_product(mat), d * mat, **EXACT)
    torch.testing.assert_close(block.dense_curvature(), torch.diag(d[0].T.reshape(-1)), **EXACT)
