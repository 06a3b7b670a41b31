"""Small helpers shared by the preconditioner, the optimizer and the quadratic model, and `HostReads`."""

from __future__ import annotations

import copy
import inspect
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

#: Tensor methods that copy a value to the host: on a GPU each waits for the queued kernels.
HOST_READS = frozenset({"item", "__bool__", "tolist", "__float__", "__int__", "cpu", "numpy", "__index__"})


class HostReads(TorchFunctionMode):
    """Records every host read of a tensor inside it (also of CPU tensors, where it costs nothing),
    as (method, file:function of the innermost torch_kfac frame, or 'outside').

    On a CPU it shows which host synchronisations a GPU step would make::

        with HostReads() as reads:
            opt.step()
        print(reads.reads)   # [] for a fixed-hyperparameter K-FAC step
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch_kfac" in f.filename]
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].name}" if frames else "outside"
            self.reads.append((name, where))
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Arguments:
    """Model inputs as positional and keyword arguments, `model(*args, **kwargs)`: the inputs of a
    batch `(Arguments(kwargs=encoding), targets)` for a model called as `model(**encoding)`."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def dense_grad(param: Tensor) -> Tensor:
    """A parameter's gradient, dense (a sparse embedding's, which gets the plain update, as a copy;
    the `.grad` itself is left as it is)."""
    grad = param.grad
    assert grad is not None
    return grad.to_dense() if grad.is_sparse else grad


def deepcopy_sharing(obj: Any, memo: dict[int, Any], shared: Iterable[object | None]) -> Any:
    """`copy.deepcopy(obj)` that keeps the objects in `shared` (the user's loss function and grad
    scaler: what the user's loop goes on calling) by reference, unless the same `deepcopy` call
    has copied them already."""
    for item in shared:
        if item is not None:
            memo.setdefault(id(item), item)
    new = object.__new__(type(obj))
    memo[id(obj)] = new
    state = copy.deepcopy(obj.__getstate__(), memo)
    if hasattr(new, "__setstate__"):
        new.__setstate__(state)
    else:
        new.__dict__.update(state)
    return new


def call_arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch's model inputs as `(args, kwargs)`: `Arguments` as they are, a tuple or list as the
    positional arguments, anything else as the one positional argument."""
    if isinstance(inputs, Arguments):
        return tuple(inputs.args), dict(inputs.kwargs)
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}


def call_model(model: nn.Module, inputs: Any) -> Any:
    """`model` called on a batch's inputs (see `call_arguments`)."""
    args, kwargs = call_arguments(inputs)
    return model(*args, **kwargs)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for the device type (older torch versions: CPU or CUDA only; a device
    type without autocast, such as 'meta': off)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # "unknown device type for autocast"
        return False


@contextmanager
def autocast_off(device_types: Iterable[str]) -> Iterator[None]:
    """Autocast switched off inside for those of the device types where it is on (the optimizer's
    own arithmetic keeps its dtypes in whatever context it is called: Lightning's manual
    optimization steps inside the training step's autocast)."""
    with ExitStack() as stack:
        for device_type in sorted(set(device_types)):
            if autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextmanager
def own_backward(what: str) -> Iterator[None]:
    """Context of a backward pass of the optimizer's own that stops at chosen tensors
    (`torch.autograd.grad`): reentrant activation checkpointing refuses those, which its error
    blames on the user's code; this one names the K-FAC feature and the ways out."""
    try:
        yield
    except RuntimeError as err:
        if "use_reentrant=True" not in str(err):
            raise
        raise RuntimeError(
            f"K-FAC: {what} back-propagates with torch.autograd.grad, which activation checkpointing "
            "with use_reentrant=True does not support; checkpoint with use_reentrant=False "
            "(torch.utils.checkpoint's recommended mode; transformers: "
            "gradient_checkpointing_kwargs={'use_reentrant': False})"
        ) from err


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
    its backward pass with the `.grad`s set aside (so that zeroing them in place cannot touch the
    step's gradients), and they are put back afterwards.
    """
    with preserved_buffers(model):
        if batch is not None:
            assert loss_fn is not None
            inputs, targets = batch
            return loss_fn(call_model(model, inputs), targets).detach()
        assert closure is not None
        if "backward" in inspect.signature(closure).parameters:
            return torch.as_tensor(closure(backward=False)).detach()
        saved = [(p, p.grad) for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        try:
            with torch.enable_grad():
                return torch.as_tensor(closure()).detach()
        finally:
            for p, grad in saved:
                p.grad = grad


def leading_examples(inputs: Any, targets: Tensor, count: int) -> tuple[Any, Tensor]:
    """The first `count` examples of a batch: dimension 0 of the targets and of every input tensor,
    also inside tuples, lists, dicts (e.g. a tokenizer's encoding) and `Arguments`; 0-d tensors, numbers,
    strings and None are shared by all examples and kept. Any other input is an error.

    An input tensor whose dimension 0 is not the targets' (sequence-first inputs, e.g. for an
    `nn.LSTM` without `batch_first`) is an error when the batch has more than `count` examples:
    slicing it would take leading positions, not examples.
    """
    if targets.dim() == 0 or count >= targets.shape[0]:
        return inputs, targets  # the whole batch, whatever its layout
    size = targets.shape[0]

    def leading(x: Any) -> Any:
        if isinstance(x, Tensor):
            if x.dim() > 0 and x.shape[0] != size:
                raise ValueError(
                    f"fisher_batch_size and qmodel_batch_size take the batch's first examples along "
                    f"dimension 0, but an input has {x.shape[0]} rows there and the targets {size}: "
                    "pass batch-first inputs (e.g. nn.LSTM(batch_first=True)) or set these options to None"
                )
            return x[:count] if x.dim() > 0 else x
        if isinstance(x, Arguments):
            return Arguments(leading(x.args), leading(x.kwargs))
        if isinstance(x, Mapping):
            return {key: leading(value) for key, value in x.items()}
        if type(x) in (tuple, list):
            return type(x)(leading(value) for value in x)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise ValueError(
            f"fisher_batch_size and qmodel_batch_size take the batch's first examples, but an input is a "
            f"{type(x).__name__}, which they cannot slice: pass tensors (in tuples, lists or dicts) or set "
            "these options to None"
        )

    return leading(inputs), targets[:count]
