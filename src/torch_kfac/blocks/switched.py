"""Blocks that re-run their module's forward to see its internals (RNN gates, attention projections).

Fused kernels hide the tensors K-FAC needs. Such a block replaces the module's `forward` by a
`SwitchedForward` instance attribute while it exists: unarmed it calls the forward it replaced;
armed by the capture (`before_forward(recording=True, ...)`) it runs the block's exact Python
re-implementation once, which records statistics itself. `remove()` puts the forward back.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor, nn

from torch_kfac.blocks.base import CurvatureBlock


class SwitchedForward:
    """The module's `forward` while a block is attached.

    Unarmed, it calls `previous` (the forward it replaced: another block's switch when two
    optimizers share a model, None for the class's own forward). A top-level callable object
    rather than a closure, so a model with a block attached can still be pickled and deep-copied.
    """

    def __init__(self, block: SwitchedForwardBlock, previous: SwitchedForward | None) -> None:
        self.block = block
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.block.dispatch(self.previous, *args, **kwargs)

    def __reduce__(self) -> tuple[type[partial[Any]], tuple[Callable[..., Any], nn.Module]]:
        """A copied or pickled module gets its class's own forward, bound to it, in place of the switch
        (not the block behind it, nor the optimizer's state behind the block); a copy of the
        optimizer attaches a switch of its own (`SwitchedForwardBlock.__setstate__`)."""
        module = self.block.module
        return partial, (type(module).forward, module)


def _replaced_forward(module: nn.Module) -> SwitchedForward | None:
    """The `forward` instance attribute a new switch replaces: None for none, or for the class's own
    forward that a copy of a switch holds (`SwitchedForward.__reduce__`)."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, partial) and forward.func is type(module).forward and forward.args == (module,):
        return None
    return forward


class SwitchedForwardBlock(CurvatureBlock):
    """A block whose module runs a recording re-implementation of its forward when armed.

    Subclasses implement `recording_forward(*args, keep=..., **kwargs)` (the module's forward,
    recording statistics) and `observe_call(args, kwargs)` (note the batch size of a call).
    """

    def attach(self) -> None:
        """Install the switch as the module's `forward` (call at the end of `__init__`)."""
        self._armed = False
        self._keep: list[Tensor] | None = None
        self._detached = False
        self._switch = SwitchedForward(self, _replaced_forward(self.module))
        self.module.forward = self._switch  # type: ignore[method-assign]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (of the optimizer, with the model) attaches to the copied module."""
        self.__dict__.update(state)
        if not self._detached:
            self.attach()

    @staticmethod
    def check_forward_attribute(module: nn.Module, name: str, what: str) -> None:
        """Refuse a module that already has a `forward` attribute of its own (not one of ours)."""
        if not isinstance(_replaced_forward(module), SwitchedForward | None):
            raise ValueError(
                f"{type(module).__name__} {name!r} has a forward attribute of its own, whose semantics "
                f"K-FAC's {what} cannot know: pass skip_modules=[{name!r}] to leave it to the plain update"
            )

    def before_forward(self, recording: bool, keep: list[Tensor] | None) -> None:
        """Arm (or disarm) the next forward call."""
        self._armed, self._keep = recording, keep

    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """Nothing: the block records its statistics itself during the forward call."""

    def record_output_grad(self, grad_output: Tensor, reduction: str, center: bool = False) -> None:
        """Nothing: output gradients arrive through the block's own tensor hooks."""

    @property
    def needs_output_grads(self) -> bool:
        """The capture's output hooks are not needed: the block hooks its internal tensors."""
        return False

    def remove(self) -> None:
        """Give the module back its forward: drop the instance attribute (or restore the one replaced).

        Switches of blocks removed earlier but still below ours in the chain are skipped.
        """
        self._armed, self._keep, self._detached = False, None, True
        attrs = self.module.__dict__
        if attrs.get("forward") is not self._switch:
            return  # a later block sits on top; its removal skips this detached one
        previous = self._switch.previous
        while previous is not None and previous.block._detached:
            previous = previous.previous
        if previous is None:
            del attrs["forward"]
        else:
            attrs["forward"] = previous

    def dispatch(self, previous: SwitchedForward | None, *args: Any, **kwargs: Any) -> Any:
        """The recording re-implementation when armed (once), else the forward this block replaced."""
        recording, keep = self._armed, self._keep
        self._armed, self._keep = False, None
        self.observe_call(args, kwargs)
        if recording:
            return self.recording_forward(*args, keep=keep, **kwargs)
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    @abstractmethod
    def observe_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note what a call says about the batch (its size)."""

    @abstractmethod
    def recording_forward(self, *args: Any, keep: list[Tensor] | None = None, **kwargs: Any) -> Any:
        """The module's forward, re-implemented to record statistics."""
