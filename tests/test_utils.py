"""utils.py: model inputs as arguments, buffers kept across extra passes, loss re-evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_data, make_mlp
from torch_kfac.utils import (
    Arguments,
    call_arguments,
    call_model,
    evaluate_loss,
    leading_examples,
    preserved_buffers,
)

pytestmark = pytest.mark.usefixtures("float64")


def test_call_arguments() -> None:
    x = torch.zeros(2)
    assert call_arguments(x) == ((x,), {})
    assert call_arguments((x, 1)) == ((x, 1), {}) and call_arguments([x]) == ((x,), {})
    assert call_arguments({"x": x}) == (({"x": x},), {})  # a dict is one positional argument
    assert call_arguments(Arguments((x,), {"scale": 2.0})) == ((x,), {"scale": 2.0})


def test_call_model_passes_keyword_arguments() -> None:
    def model(x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return x * scale

    x = torch.ones(2)
    assert torch.equal(call_model(model, Arguments(kwargs={"x": x, "scale": 3.0})), x * 3)  # type: ignore[arg-type]
    assert torch.equal(call_model(model, Arguments((x,))), x)  # type: ignore[arg-type]


def test_preserved_buffers_restores_batch_norm_statistics() -> None:
    model = nn.BatchNorm1d(3)
    before = model.running_mean.clone()
    with preserved_buffers(model):
        model(torch.randn(8, 3) + 5.0)
        assert not torch.equal(model.running_mean, before)
    assert torch.equal(model.running_mean, before)


def test_evaluate_loss_on_a_batch_keeps_buffers() -> None:
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    x, y = make_data()
    running = model[1].running_mean.clone()
    expected = F.cross_entropy(copy.deepcopy(model)(x), y)
    value = evaluate_loss(model, nn.CrossEntropyLoss(), (x, y), None)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.equal(model[1].running_mean, running)
    assert not value.requires_grad


def test_evaluate_loss_from_a_closure_puts_the_gradients_back() -> None:
    model = make_mlp()
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def closure() -> torch.Tensor:
        model.zero_grad()
        loss = F.cross_entropy(model(x) * 2.0, y)
        loss.backward()
        return loss

    value = evaluate_loss(model, None, None, closure)
    assert value.item() == pytest.approx(F.cross_entropy(model(x) * 2.0, y).item(), rel=1e-12)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_a_closure_zeroing_the_gradients_in_place_leaves_the_steps_gradients_alone() -> None:
    """`zero_grad(set_to_none=False)` and the backward pass accumulate into `.grad` in place: the
    closure must not reach the gradient tensors the step is using."""
    model = make_mlp()
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    tensors = [p.grad for p in model.parameters()]
    values = [g.clone() for g in tensors]

    def closure() -> torch.Tensor:
        model.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x) * 2.0, y)
        loss.backward()
        return loss

    evaluate_loss(model, None, None, closure)
    assert all(p.grad is g for p, g in zip(model.parameters(), tensors, strict=True))
    assert all(torch.equal(g, v) for g, v in zip(tensors, values, strict=True))


def test_evaluate_loss_calls_a_closure_with_backward_false() -> None:
    calls = []

    def closure(backward: bool = True) -> torch.Tensor:
        calls.append(backward)
        return torch.tensor(1.5)

    assert evaluate_loss(make_mlp(), None, None, closure).item() == 1.5
    assert calls == [False]


def test_leading_examples_slices_every_input_tensor() -> None:
    x, y = make_data(n=6)
    lengths, scalar = torch.arange(6), torch.tensor(3.0)  # a per-example vector; a 0-d tensor is shared
    inputs, targets = leading_examples((x, x + 1, 3.0, lengths, scalar), y, 2)
    assert torch.equal(inputs[0], x[:2]) and torch.equal(inputs[1], x[:2] + 1) and inputs[2] == 3.0
    assert torch.equal(inputs[3], lengths[:2]) and inputs[4] is scalar
    assert torch.equal(targets, y[:2])
    single, _ = leading_examples(x, y, 4)
    assert torch.equal(single, x[:4])


def test_leading_examples_slices_tensors_inside_dicts_and_lists() -> None:
    """A tokenizer-style dict (also nested in a list) is sliced key by key; shared values stay."""
    x, y = make_data(n=6)
    mask, scalar = torch.ones(6, 4), torch.tensor(0.5)
    batch = {"x": x, "parts": [x + 1, {"mask": mask}], "temperature": 2.0, "name": "a", "none": None}
    inputs, targets = leading_examples((batch, scalar), y, 3)
    sliced = inputs[0]
    assert torch.equal(sliced["x"], x[:3]) and torch.equal(sliced["parts"][0], x[:3] + 1)
    assert torch.equal(sliced["parts"][1]["mask"], mask[:3]) and isinstance(sliced["parts"], list)
    assert sliced["temperature"] == 2.0 and sliced["name"] == "a" and sliced["none"] is None
    assert inputs[1] is scalar and torch.equal(targets, y[:3])
    with pytest.raises(ValueError, match=r"7 rows there and the targets 6"):
        leading_examples({"x": x, "positions": torch.zeros(7, 2)}, y, 3)


def test_leading_examples_slices_arguments() -> None:
    x, y = make_data(n=6)
    mask = torch.ones(6, 4)
    inputs, _ = leading_examples(Arguments((x,), {"mask": mask, "items": torch.tensor(6)}), y, 2)
    assert isinstance(inputs, Arguments) and torch.equal(inputs.args[0], x[:2])
    assert torch.equal(inputs.kwargs["mask"], mask[:2]) and inputs.kwargs["items"] == 6


def test_leading_examples_refuses_inputs_it_cannot_slice() -> None:
    """A packed sequence (a named tuple) or another object: an error naming its type, not targets
    sliced while the input stays whole."""
    x, y = make_data(n=6)
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 2), torch.randn(2, 2)])
    with pytest.raises(ValueError, match=r"an input is a PackedSequence, which they cannot slice"):
        leading_examples(packed, y, 3)
    with pytest.raises(ValueError, match=r"an input is a object, which"):
        leading_examples((x, object()), y, 3)


@pytest.mark.parametrize("inputs", ["single", "tuple", "vector"])
def test_leading_examples_refuses_inputs_that_are_not_batch_first(inputs: str) -> None:
    """Sequence-first inputs (T, N, F) with targets (N,), or a vector of T entries: a clear error,
    not a slice of positions."""
    sequence_first, y = torch.randn(7, 4, 3), torch.randint(0, 2, (4,))
    batch = {
        "single": sequence_first,
        "tuple": (torch.zeros(4), sequence_first),
        "vector": (sequence_first.transpose(0, 1), torch.arange(7)),
    }[inputs]
    with pytest.raises(ValueError, match=r"7 rows there and the targets 4.*batch_first=True"):
        leading_examples(batch, y, 2)
    whole, targets = leading_examples(batch, y, 4)  # no more examples than asked for: as given
    assert whole is batch and targets is y
