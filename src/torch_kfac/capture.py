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
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_kfac.blocks.base import CurvatureBlock
from torch_kfac.linalg import solver_dtype
from torch_kfac.lowrank import RowCapture
from torch_kfac.utils import autocast_enabled

#: Why the hooks run outside a compiled graph (dynamo shows it in its graph-break report, and in the
#: error of `torch.compile(model, fullgraph=True)`, which cannot work with them).
_EAGER = (
    "K-FAC records layer statistics in Python hooks, outside the compiled graph: compile the model "
    "without fullgraph=True"
)


def outside_compiled_graphs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compiler.disable` with K-FAC's reason (older torch versions take no reason)."""
    try:
        return torch.compiler.disable(fn, reason=_EAGER)
    except TypeError:
        return torch.compiler.disable(fn)


def _inert_hook(*args: Any, **kwargs: Any) -> None:
    """What a copied or unpickled module holds in place of a `ModuleHook`: nothing to do."""


def _inert() -> Callable[..., None]:
    """`_inert_hook`, as unpickling rebuilds a `ModuleHook`."""
    return _inert_hook


class ModuleHook:
    """A hook of K-FAC's on a module that copies of the module do not inherit.

    `copy.deepcopy(model)` (an EMA of the weights, a teacher network) and `torch.save(model)` would
    otherwise copy the hook with the optimizer's whole state behind it (its factors), and the
    copy's passes would go on recording statistics nobody folds; the preset's hooks could not be
    pickled at all. The copy gets `_inert_hook` in its place.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)  # torch passes module hooks their arguments by position

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _inert_hook

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return _inert, ()


class ModuleHooks:
    """The forward (pre-)hooks one object of K-FAC's (the capture, the last-pass watcher, the
    preconditioner) keeps on modules.

    A copy of that object is part of a copy of the optimizer, which copies the model with it
    (`copy.deepcopy`, pickling): the copied modules hold inert hooks (`ModuleHook`), and the copy
    registers live ones of its own in their place, so a copied model and optimizer train as the
    originals do.
    """

    def __init__(self) -> None:
        #: (module, hook function, pre-hook, with_kwargs) of each hook, to register again in a copy.
        self._specs: list[tuple[nn.Module, Callable[..., Any], bool, bool]] = []
        self._handles: list[RemovableHandle] = []

    def add(
        self, module: nn.Module, fn: Callable[..., Any], *, pre: bool = False, with_kwargs: bool = False
    ) -> None:
        """Register `fn` (wrapped in a `ModuleHook`) as a forward hook, or a pre-hook, of `module`."""
        spec = (module, fn, pre, with_kwargs)
        self._specs.append(spec)
        self._handles.append(_register(*spec))

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._specs, self._handles = [], []

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy: the copied handles remove the copied modules' inert hooks; live ones replace them."""
        for handle in state["_handles"]:
            handle.remove()
        self._specs = state["_specs"]
        self._handles = [_register(*spec) for spec in self._specs]


def _register(module: nn.Module, fn: Callable[..., Any], pre: bool, with_kwargs: bool) -> RemovableHandle:
    """`module.register_forward_(pre_)hook(ModuleHook(fn), with_kwargs=...)`."""
    hook = ModuleHook(fn)
    if pre:
        return module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    return module.register_forward_hook(hook, with_kwargs=with_kwargs)


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
        center: bool,
    ) -> None:
        self.is_due = is_due
        self.reduction = reduction
        self.center = center
        self.explicit = False
        self._forward_on = False
        self._backward_on = False
        self._paused = False
        self._forced: list[Tensor] | None = None
        self._hooks = ModuleHooks()
        #: dtype in which statistics are computed (None: the activations' and gradients' own, float32
        #: for 16-bit ones; so a pass after `model.to(dtype)` is recorded in the new dtype).
        self.factor_dtype: torch.dtype | None = None
        #: The loss scale of the backward pass now running (a GradScaler's, on the device), or None.
        self.loss_scale: Callable[[], Tensor | None] = _no_scale
        #: The rows kept for low-rank preconditioning (None: option `low_rank_gradients` off).
        self.gradient_rows: RowCapture | None = None
        self.hooked = [member for block in blocks.values() for member in block.hooked()]
        for block in self.hooked:
            block.reduction, block.center = reduction, center
            block.backward_gate = self._backward_recording
            block.statistics_grad = self.statistics_grad
            if type(block).before_forward is not CurvatureBlock.before_forward:
                self._hooks.add(block.module, partial(self._pre_hook, block), pre=True)
            self._hooks.add(block.module, partial(self._forward_hook, block))

    def _recording(self) -> bool:
        if self._forced is not None:
            return True
        if self._paused:
            return False
        if self.explicit:
            return self._forward_on
        return torch.is_grad_enabled() and self.is_due()

    @outside_compiled_graphs
    def _pre_hook(self, block: CurvatureBlock, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        block.before_forward(self._recording(), self._forced)

    @outside_compiled_graphs
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
        rows = self.gradient_rows
        if rows is not None and isinstance(output, Tensor) and output.requires_grad and not self.own_pass():
            rows.watch(block, inputs, output)
        if not self._recording():
            return
        block.new_examples = True
        with _statistics_precision(inputs):
            block.record_inputs(_cast(inputs, self.factor_dtype), self.center)
        if isinstance(output, Tensor) and output.requires_grad and block.needs_output_grads:
            output.register_hook(partial(self._grad_hook, block))
            if self._forced is not None:
                # The optimizer's own backward passes stop at these tensors; hand the rest of the
                # model a copy so an in-place activation cannot overwrite the one we keep.
                self._forced.append(output)
                return output * 1
        return None

    def own_pass(self) -> bool:
        """Whether the pass running now is the optimizer's own (a Fisher pass, or one it pauses)."""
        return self._forced is not None or self._paused

    def _backward_recording(self) -> bool:
        """Whether output gradients arriving now are recorded."""
        return self._forced is not None or not (self._paused or (self.explicit and not self._backward_on))

    @outside_compiled_graphs
    def _grad_hook(self, block: CurvatureBlock, grad: Tensor) -> None:
        if self._backward_recording():
            with _statistics_precision((grad,)):
                block.record_output_grad(self.statistics_grad(grad), self.reduction, self.center)

    def statistics_grad(self, grad: Tensor) -> Tensor:
        """An output gradient as statistics take it: in the factor dtype, the loss scale of the
        user's backward pass removed (the optimizer's own Fisher passes are not scaled)."""
        grad = grad.to(self.factor_dtype or solver_dtype(grad.dtype))
        scale = None if self._forced is not None else self.loss_scale()
        return grad if scale is None else grad / scale.to(grad.dtype)

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
        self._hooks.remove()
        for block in self.hooked:
            block.remove()


def _no_scale() -> None:
    """No loss scaling."""
    return None


def _cast(values: tuple[Any, ...], dtype: torch.dtype | None) -> tuple[Any, ...]:
    """Floating-point tensors among `values` in `dtype` (None: their own, float32 for 16-bit ones)."""
    return tuple(
        v.to(dtype or solver_dtype(v.dtype)) if isinstance(v, Tensor) and v.is_floating_point() else v
        for v in values
    )


def _statistics_precision(values: tuple[Any, ...]) -> AbstractContextManager[object]:
    """Autocast off while statistics are computed (they are sums of squares: 16 bits lose them)."""
    tensor = next((v for v in values if isinstance(v, Tensor)), None)
    if tensor is None or not autocast_enabled(tensor.device.type):
        return nullcontext()  # the common case, in every hook call: no context stack to build
    return torch.autocast(tensor.device.type, enabled=False)
