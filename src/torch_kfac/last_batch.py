"""The batch and loss of the user's last training pass, for a step called without them.

With `loss_fn` given, `KFACPreconditioner` (and so `KFAC`) watches two calls: the model's (its
inputs; a DistributedDataParallel wrapper's, whose outputs may be new tensors) and `loss_fn`'s (the
outputs it was given, its targets and its value). A training pass `loss_fn(model(x), y)` run with
gradients enabled leaves the batch `((x,), y)` and the loss (a model called with keyword arguments,
`model(**encoding)`, leaves `Arguments(kwargs=encoding)`), so `opt.step()`, Lightning's
`opt.step(closure)` and `pre.step()` can run what needs them: the quadratic model, the MC Fisher's
own pass, the loss after the step. Anything else (no such pass, a loss taken on reshaped outputs,
several passes unless `accumulated_passes='last'` says to take the last) is not guessed at:
`LastBatch.take` says why, and the step's error repeats it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_kfac.capture import ModuleHooks, outside_compiled_graphs
from torch_kfac.utils import Arguments

#: Key of the mark a model call leaves on its output's autograd node (`ModelCall.mark`).
_MARK = "torch_kfac.last_batch"


@dataclass
class ModelCall:
    """One model call with gradients enabled: its arguments, a weak reference to its output
    tensor, and the output's shape and mark (a token in its autograd node's metadata, by which a
    DistributedDataParallel wrapper's copy of a freed output is still recognised)."""

    inputs: tuple[Any, ...] | Arguments
    output: weakref.ref[Tensor] | None
    shape: torch.Size | None
    mark: object


@dataclass
class TrainingPass:
    """One `loss_fn(model(...), targets)` with gradients enabled: the model's arguments (a tuple of
    positional ones, or `Arguments`), the targets and the loss's value (detached)."""

    inputs: tuple[Any, ...] | Arguments
    targets: Tensor
    loss: Tensor


class LastBatch:
    """Hooks on `model` and `loss_fn` that keep the training passes since the last `take()`."""

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, own_pass: Callable[[], bool], take_last: bool
    ) -> None:
        #: Whether a pass running now is the optimizer's own (the Fisher pass, the quadratic model,
        #: a loss evaluation): those are not training passes.
        self.own_pass = own_pass
        #: Whether `take` gives the last of several passes (gradient accumulation) instead of a reason.
        self.take_last = take_last
        self._hooks = ModuleHooks()
        self._hooks.add(model, self._model_called, with_kwargs=True)
        self._hooks.add(loss_fn, self._loss_called, with_kwargs=True)
        # The last model call (the loss's input must be its output tensor).
        self._model_call: ModelCall | None = None
        # The last training pass (its model call, the pass or why it cannot be one), and how many
        # passes since the last `take` (only one is kept: a forgotten optimizer holds no more than
        # one batch).
        self._last_pass: tuple[object, TrainingPass | str] | None = None
        self._passes = 0
        self._loose_loss: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """A copy (of the optimizer) starts with no training pass: the pass's tensors stay here."""
        return {**self.__dict__, "_model_call": None, "_last_pass": None, "_passes": 0, "_loose_loss": None}

    def _recording(self) -> bool:
        return torch.is_grad_enabled() and not self.own_pass()

    @outside_compiled_graphs
    def _model_called(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self._recording():
            return
        inputs = Arguments(args, dict(kwargs)) if kwargs else args
        if not isinstance(output, Tensor):
            self._model_call = ModelCall(inputs, None, None, None)
            return
        mark = object()
        if output.grad_fn is not None:
            output.grad_fn.metadata[_MARK] = mark
        self._model_call = ModelCall(inputs, weakref.ref(output), output.shape, mark)

    @outside_compiled_graphs
    def _loss_called(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self._recording():
            return
        call = self._model_call
        outputs = args[0] if args else kwargs.get("input")
        if call is None:
            self._loose_loss = (
                "loss_fn was called while the optimizer's model had not been since the last step "
                "(a submodule called directly, such as self.net(x) in a LightningModule? Call the "
                "model itself, or build the optimizer on that submodule)"
            )
            return
        if not isinstance(outputs, Tensor) or not _is_output(outputs, call):
            self._loose_loss = (
                "loss_fn was called on a tensor that is not the model's output (a reshaped or "
                "selected output, or a model with several outputs)"
            )
            return
        if len(args) != 2 or kwargs or not isinstance(output, Tensor):
            found: TrainingPass | str = "loss_fn was called with other arguments than (outputs, targets)"
        else:
            found = TrainingPass(call.inputs, args[1], output.detach())
        if self._last_pass is None or self._last_pass[0] is not call:
            self._passes += 1  # a second loss of the same outputs replaces the first
        self._last_pass = (call, found)

    def take(self) -> TrainingPass | str:
        """The one training pass since the last `take()` (with `take_last`, the last of several), or
        why there is none; forgets them."""
        last, passes, loose = self._last_pass, self._passes, self._loose_loss
        self._last_pass, self._passes, self._loose_loss, self._model_call = None, 0, None, None
        if passes > 1 and not self.take_last:
            return (
                f"{passes} training passes (loss_fn on the model's outputs with gradients enabled) "
                "since the last step: with gradient accumulation, which batch the step is for is the "
                "caller's choice (pass it, or accumulated_passes='last' to take the last micro-batch); "
                "an evaluation belongs under torch.no_grad()"
            )
        if last is not None:
            return last[1]
        return (
            loose
            or "loss_fn was not called on the model's outputs with gradients enabled since the last step"
        )

    def remove(self) -> None:
        """Remove the hooks."""
        self._hooks.remove()


def _is_output(tensor: Tensor, call: ModelCall) -> bool:
    """Whether `tensor` is the output of the model `call`: that tensor, or the copy a
    DistributedDataParallel wrapper returns in its place (`_DDPSink`: with find_unused_parameters,
    or a static graph's first step), which the model's hook cannot see when the wrapper came after
    the optimizer (the Hugging Face Trainer's and accelerate's order). The original output is
    freed by then; its autograd node, a parent of the copy's, still bears the call's mark."""
    if call.output is None:
        return False
    if tensor is call.output():
        return True
    node = tensor.grad_fn
    return (
        node is not None
        and type(node).__name__ == "_DDPSinkBackward"
        and tensor.shape == call.shape
        and any(
            parent is not None and parent.metadata.get(_MARK) is call.mark
            for parent, _ in node.next_functions
        )
    )


def unavailable(last: TrainingPass | str | None) -> str:
    """The tail of the error of a step missing a loss or batch: why the last pass gave none."""
    return f"; none could be taken from the last training pass: {last}" if isinstance(last, str) else ""
