"""update.py: momentum, norm constraint, weight decay and the per-parameter split, by hand in float64."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from torch_kfac.blocks import LinearBlock
from torch_kfac.options import MomentumType
from torch_kfac.update import block_updates, clip, parameter_change, per_parameter, velocity

pytestmark = pytest.mark.usefixtures("float64")


def test_velocity_accumulates_in_the_state() -> None:
    state: dict[str, Any] = {}
    first = velocity(state, torch.tensor([1.0, 2.0]), 0.5)
    assert torch.equal(first, torch.tensor([1.0, 2.0])) and state["momentum_buffer"] is first
    second = velocity(state, torch.tensor([4.0, 0.0]), 0.5)
    assert torch.equal(second, torch.tensor([4.5, 1.0]))
    assert state["momentum_buffer"] is first  # updated in place


def test_velocity_without_momentum_keeps_no_buffer() -> None:
    state: dict[str, Any] = {}
    vec = torch.tensor([1.0])
    assert velocity(state, vec, 0.0) is vec and not state


def test_clip_scales_to_the_bound() -> None:
    vecs = {"a": torch.tensor([3.0]), "b": torch.tensor([1.0])}
    natural = {"a": torch.tensor([2.0]), "b": torch.tensor([2.0])}
    # lr^2 vec^T nat = 0.25 * (6 + 2) = 2; bound 0.5 -> coefficient sqrt(0.5 / 2) = 0.5
    clipped = clip(vecs, natural, 0.5, 0.5)
    torch.testing.assert_close(clipped["a"], torch.tensor([1.0]), rtol=1e-15, atol=0)
    torch.testing.assert_close(clipped["b"], torch.tensor([1.0]), rtol=1e-15, atol=0)


def test_clip_leaves_small_updates_and_no_bound_alone() -> None:
    vecs, natural = {"a": torch.tensor([1.0])}, {"a": torch.tensor([1.0])}
    assert torch.equal(clip(vecs, natural, 0.1, 1.0)["a"], torch.tensor([1.0]))
    assert clip(vecs, natural, 0.1, None) is natural
    zero = {"a": torch.tensor([0.0])}
    assert torch.equal(clip(zero, zero, 0.1, 1.0)["a"], torch.tensor([0.0]))  # no 0/0


@pytest.mark.parametrize("lr", [1.0, 0.0])
def test_clip_leaves_an_update_with_a_negative_quadratic_form_unscaled(lr: float) -> None:
    """vec^T F^-1 vec < 0 (an inverse made indefinite by rounding): no sqrt of a negative ratio, no NaN,
    also at lr 0 (a warm-up's first step), where lr^2 times the negative form is -0.0."""
    vecs, natural = {"a": torch.tensor([1.0])}, {"a": torch.tensor([-2.0])}
    assert torch.equal(clip(vecs, natural, lr, 1.0)["a"], torch.tensor([-2.0]))


def _precondition(mats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: mat / 2.0 for name, mat in mats.items()}  # P = I / 2


def test_regular_momentum_accumulates_clipped_natural_gradients() -> None:
    states: dict[str, dict[str, Any]] = {"b": {"momentum_buffer": torch.tensor([[1.0, 0.0]])}}
    mats = {"b": torch.tensor([[4.0, 2.0]])}
    # natural = [2, 1]; lr^2 g^T P g = 1 * (8 + 2) = 10; bound 2.5 -> c = 0.5; v = 0.9 [1, 0] + [1, 0.5]
    out = block_updates(mats, _precondition, states, MomentumType.REGULAR, 1.0, 0.9, 2.5)
    torch.testing.assert_close(out["b"], torch.tensor([[1.9, 0.5]]), rtol=1e-15, atol=0)


def test_adam_momentum_preconditions_the_clipped_velocity() -> None:
    states: dict[str, dict[str, Any]] = {"b": {"momentum_buffer": torch.tensor([[2.0, 0.0]])}}
    mats = {"b": torch.tensor([[4.0, 2.0]])}
    # v = 0.5 [2, 0] + [4, 2] = [5, 2]; P v = [2.5, 1]; lr^2 v^T P v = 14.5; bound 14.5 / 4 -> c = 1/2
    out = block_updates(mats, _precondition, states, MomentumType.ADAM, 1.0, 0.5, 14.5 / 4)
    torch.testing.assert_close(out["b"], torch.tensor([[1.25, 0.5]]), rtol=1e-15, atol=0)
    torch.testing.assert_close(states["b"]["momentum_buffer"], torch.tensor([[5.0, 2.0]]), rtol=0, atol=0)


@pytest.mark.parametrize("momentum_type", [MomentumType.REGULAR, MomentumType.ADAM])
def test_block_updates_of_a_skipped_step_leave_the_momentum_alone(momentum_type: MomentumType) -> None:
    """taken=False (a step skipped on the device): the old buffer stays, a new one starts at zero."""
    old = torch.tensor([[2.0, 0.0]])
    states: dict[str, dict[str, Any]] = {"b": {"momentum_buffer": old.clone()}, "c": {}}
    mats = {"b": torch.tensor([[4.0, 2.0]]), "c": torch.tensor([[1.0, 3.0]])}
    skipped = torch.tensor(False)
    out = block_updates(mats, _precondition, states, momentum_type, 1.0, 0.5, None, skipped)
    assert torch.equal(states["b"]["momentum_buffer"], old)
    assert torch.equal(states["c"]["momentum_buffer"], torch.zeros(1, 2))
    expected_b = old if momentum_type == MomentumType.REGULAR else old / 2.0  # ADAM: P v
    assert torch.equal(out["b"], expected_b) and torch.equal(out["c"], torch.zeros(1, 2))
    block_updates(mats, _precondition, states, momentum_type, 1.0, 0.5, None, torch.tensor(True))
    taken_b = mats["b"] / 2.0 if momentum_type == MomentumType.REGULAR else mats["b"]  # v <- mu v + (P) g
    assert torch.equal(states["b"]["momentum_buffer"], 0.5 * old + taken_b)


def test_parameter_change_with_decoupled_weight_decay() -> None:
    param, update = torch.tensor([2.0]), torch.tensor([1.0])
    assert parameter_change(param, update, 0.1, 0.0).item() == pytest.approx(-0.1, rel=1e-15)
    assert parameter_change(param, update, 0.1, 0.5).item() == pytest.approx(-0.2, rel=1e-15)


def test_per_parameter_splits_each_block_matrix() -> None:
    layer = nn.Linear(3, 2)
    block = LinearBlock(layer, "layer")
    mat = torch.arange(8.0).reshape(2, 4)  # [W | b]
    parts = list(per_parameter({"layer": block}, {"layer": mat}))
    assert [p for p, _ in parts] == [layer.weight, layer.bias]
    assert torch.equal(parts[0][1], mat[:, :3]) and torch.equal(parts[1][1], mat[:, 3])
    block.remove()


def test_per_parameter_refuses_a_block_whose_unpack_disagrees_with_its_parameters() -> None:
    """A (custom) block whose `unpack` drops a part is an error, not a parameter silently left out."""

    class DropsBias(LinearBlock):
        def unpack(self, mat: torch.Tensor) -> list[torch.Tensor]:
            return super().unpack(mat)[:1]

    block = DropsBias(nn.Linear(3, 2), "layer")
    with pytest.raises(ValueError, match="zip"):
        list(per_parameter({"layer": block}, {"layer": torch.zeros(2, 4)}))
    block.remove()
