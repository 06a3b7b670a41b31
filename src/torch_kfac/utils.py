"""Small helpers shared by the preconditioner, the optimizer and the quadratic model."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def as_args(inputs: Any) -> tuple[Any, ...]:
    """Model inputs as a tuple of positional arguments."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers (e.g. batch-norm running statistics) after extra passes."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def evaluate_loss(
    model: nn.Module,
    loss_fn: nn.Module | None,
    batch: tuple[Any, Tensor] | None,
    closure: Callable[..., Tensor] | None,
) -> Tensor:
    """The loss on `batch` (with `loss_fn`) or from `closure`, leaving buffers and `.grad`s as they were.

    A closure that accepts a `backward` keyword is called with `backward=False`; any other runs
    its backward pass, whose gradients are then put back.
    """
    with preserved_buffers(model):
        if batch is not None:
            assert loss_fn is not None
            inputs, targets = batch
            return loss_fn(model(*as_args(inputs)), targets).detach()
        assert closure is not None
        if "backward" in inspect.signature(closure).parameters:
            return torch.as_tensor(closure(backward=False)).detach()
        saved = [(p, p.grad) for p in model.parameters()]
        try:
            with torch.enable_grad():
                return torch.as_tensor(closure()).detach()
        finally:
            for p, grad in saved:
                p.grad = grad
