"""Hooks that hand layer inputs and output gradients to the curvature blocks.

The hooks stay registered but return at once unless statistics are due, so a step that does not
update the factors costs one Python call per layer. Statistics are turned into covariance
contributions on the spot; no activation is kept alive past the forward or backward pass.

Output gradients are caught with a hook on the layer's output tensor, not a module backward hook:
an in-place activation right after the layer (`nn.ReLU(inplace=True)`) then still delivers the
gradient with respect to the layer's own output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_kfac.blocks.base import CurvatureBlock


class StatisticsCapture:
    """Decides when statistics are recorded and routes them to the blocks.

    Two modes. Automatic (the default): a forward pass with gradients enabled records statistics
    whenever `is_due()` says a factor update is due. Explicit: once `track_forward()` or
    `track_backward()` has been used, statistics are recorded only inside those contexts, as
    in the original torch_kfac API.
    """

    def __init__(
        self,
        blocks: dict[str, CurvatureBlock],
        is_due: Callable[[], bool],
        reduction: str,
        center: bool = False,
    ) -> None:
        self.blocks = blocks
        self.is_due = is_due
        self.reduction = reduction
        self.center = center
        self.explicit = False
        self._forward_on = False
        self._backward_on = False
        self._paused = False
        self._forced: list[Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        self.hooked = [member for block in blocks.values() for member in block.hooked()]
        for block in self.hooked:
            block.reduction, block.center = reduction, center
            block.backward_gate = self._backward_recording
            if type(block).before_forward is not CurvatureBlock.before_forward:
                self._handles.append(block.module.register_forward_pre_hook(partial(self._pre_hook, block)))
            self._handles.append(block.module.register_forward_hook(partial(self._forward_hook, block)))

    def _recording(self) -> bool:
        if self._forced is not None:
            return True
        if self._paused:
            return False
        if self.explicit:
            return self._forward_on
        return torch.is_grad_enabled() and self.is_due()

    def _pre_hook(self, block: CurvatureBlock, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        block.before_forward(self._recording(), self._forced)

    def _forward_hook(
        self, block: CurvatureBlock, module: nn.Module, inputs: tuple[Any, ...], output: Any
    ) -> Any:
        if inputs and isinstance(inputs[0], Tensor):
            block.batch_size = block.num_examples(inputs)
            if block.batch_size == 0 and self._recording():
                raise ValueError(
                    f"K-FAC: empty batch (no examples) in the forward pass of {block.name or 'the model'!r}: "
                    "its statistics are undefined; skip empty batches"
                )
        if not self._recording():
            return
        block.record_inputs(inputs, self.center)
        if isinstance(output, Tensor) and output.requires_grad and block.needs_output_grads:
            output.register_hook(partial(self._grad_hook, block))
            if self._forced is not None:
                # The optimizer's own backward passes stop at these tensors; hand the rest of the
                # model a copy so an in-place activation cannot overwrite the one we keep.
                self._forced.append(output)
                return output * 1
        return None

    def _backward_recording(self) -> bool:
        """Whether output gradients arriving now are recorded."""
        return self._forced is not None or not (self._paused or (self.explicit and not self._backward_on))

    def _grad_hook(self, block: CurvatureBlock, grad: Tensor) -> None:
        if self._backward_recording():
            block.record_output_grad(grad, self.reduction, self.center)

    @contextmanager
    def track_forward(self) -> Iterator[None]:
        """Record layer inputs of the forward passes run inside (explicit mode)."""
        self.explicit = True
        for block in self.hooked:
            block.clear_pending(block.FORWARD_FACTORS)
        self._forward_on = True
        try:
            yield
        finally:
            self._forward_on = False

    @contextmanager
    def track_backward(self) -> Iterator[None]:
        """Record output gradients of the backward passes run inside (explicit mode)."""
        self.explicit = True
        for block in self.hooked:
            block.clear_pending(tuple(k for k in block.FACTORS if k not in block.FORWARD_FACTORS))
        self._backward_on = True
        try:
            yield
        finally:
            self._backward_on = False

    @contextmanager
    def forced(self) -> Iterator[list[Tensor]]:
        """Record everything inside, whatever the mode; yields the layers' output tensors."""
        outputs: list[Tensor] = []
        previous, self._forced = self._forced, outputs
        try:
            yield outputs
        finally:
            self._forced = previous

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside (the optimizer's own extra forward passes)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def remove(self) -> None:
        """Remove every hook; the model is left as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block in self.hooked:
            block.remove()
