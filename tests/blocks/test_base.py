"""The block protocols and shared helpers (`blocks/base.py`), in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.blocks.tiny import linear_block, spd
from torch_kfac.blocks import EmbeddingBlock, LinearBlock
from torch_kfac.blocks.base import (
    CurvatureBlock,
    KroneckerBlock,
    Statistic,
    WeightBiasBlock,
    centered,
    input_second_moment,
    pooled,
    second_moment_scale,
)

pytestmark = pytest.mark.usefixtures("float64")


def test_protocols_are_abstract() -> None:
    for cls in (CurvatureBlock, WeightBiasBlock, KroneckerBlock):
        with pytest.raises(TypeError, match="abstract"):
            cls(nn.Linear(2, 2))  # type: ignore[abstract]


def test_a_kronecker_block_needs_both_row_methods() -> None:
    class OnlyInputs(KroneckerBlock):
        def activation_rows(self, inputs: tuple[Tensor, ...]) -> Tensor:
            return inputs[0][None, :, None]

    with pytest.raises(TypeError, match="output_grad_rows"):
        OnlyInputs(nn.Linear(2, 2))  # type: ignore[abstract]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_input_second_moment_is_the_moment_of_rows_with_a_ones_column(bias: bool, lead: tuple) -> None:
    rows = torch.randn(*lead, 7, 4)
    full = torch.cat([rows, torch.ones(*lead, 7, 1)], -1) if bias else rows
    torch.testing.assert_close(input_second_moment(rows, bias), full.mT @ full / 7, rtol=1e-14, atol=1e-14)


def test_centered_removes_the_mean_over_rows() -> None:
    rows = torch.randn(2, 7, 4)
    torch.testing.assert_close(centered(rows), rows - rows.mean(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(centered(rows).sum(-2), torch.zeros(2, 4), rtol=0, atol=1e-14)


def test_second_moment_scale_per_reduction() -> None:
    assert second_moment_scale("sum", 4) == 0.25
    assert second_moment_scale("mean", 4) == 4.0
    assert second_moment_scale("mean_positions", 4, loss_terms=3) == 12.0


def test_factor_attributes_read_and_set_the_running_average() -> None:
    block = linear_block("kfac")
    a = spd(5, 3)
    block.A = a
    assert block.state["A_ema"].shape == (1, 5, 5) and block.state["A_weight"] == 1.0  # group dim added
    block.state["A_ema"] = 0.5 * block.state["A_ema"]
    block.state["A_weight"] = torch.tensor(0.5)
    torch.testing.assert_close(block.A, a, rtol=1e-14, atol=0)  # zero-debiased
    embedding = EmbeddingBlock(nn.Embedding(6, 3), "emb")
    embedding.A = torch.arange(6.0)
    assert embedding.state["A_ema"].shape == (6,)  # a vector: no group dim


def test_unknown_approximation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="approximation must be one of"):
        LinearBlock(nn.Linear(2, 2)).configure("kron")


def test_configure_replaces_the_factors_and_what_is_pending() -> None:
    block = linear_block("kfac")
    block.add_forward_statistic("A", torch.eye(5), 5)
    block.configure("diagonal")
    assert block.FACTORS == ("D",) and block._pending == {"D": []}
    assert block.needs_output_grads


def test_drop_state_forgets_present_entries_only() -> None:
    block = linear_block("kfac")
    block.state["A_inv"] = torch.eye(5)
    block.drop_state(("A_inv", "G_inv"))
    assert "A_inv" not in block.state and {"A_ema", "G_ema"} <= set(block.state)


def test_pooled_weights_each_pass_by_its_examples() -> None:
    """Micro-batches of 2 and 6 examples: unscaled statistics (forward ones, 'sum' or 'micro-batch'
    losses) weigh 2/8 and 6/8; statistics of losses scaled by their share n/N hold (n/N)^2 of their own
    and weigh 8/2 and 8/6; backward passes through one forward pass (one group) are averaged first."""
    a, b, c = torch.full((2, 2), 1.0), torch.full((2, 2), 5.0), torch.full((2, 2), 9.0)
    torch.testing.assert_close(pooled([Statistic(a, 2), Statistic(b, 6)]), a / 4 + b * 3 / 4)
    scaled = pooled([Statistic(a, 2, True, 1), Statistic(b, 6, True, 2)])
    torch.testing.assert_close(scaled, a * 4 + b * 4 / 3)
    grouped = pooled([Statistic(a, 2, False, 1), Statistic(c, 2, False, 1), Statistic(b, 6, False, 2)])
    torch.testing.assert_close(grouped, (a + c) / 2 / 4 + b * 3 / 4)
    assert pooled([Statistic(a, 3)]) is a
