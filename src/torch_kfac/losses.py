"""Loss-specific curvature: the Hessian of a reduced loss with respect to the model's outputs.

The generalised Gauss-Newton matrix of a loss L(f(theta)) is J^T H J with J the Jacobian of the
outputs and H the Hessian of L with respect to them. For the quadratic model only products in
output space are needed: v^T GGN w = (J v)^T H (J w). `OutputHessian` computes H u for the losses
whose negative log-likelihood form makes the GGN the Fisher (cross-entropy, sigmoid
cross-entropy, squared error).

A loss of your own: subclass `OutputHessian`, implement `matvec`, and register it with
`register_output_hessian(MyLoss, MyHessian)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class OutputHessian:
    """H u for the Hessian H of a reduced loss with respect to the model outputs."""

    def __init__(self, loss_fn: nn.Module) -> None:
        self.loss_fn = loss_fn

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """H u, same shape as the outputs."""
        raise NotImplementedError

    def inner(self, outputs: Tensor, targets: Tensor, u: Tensor, w: Tensor) -> Tensor:
        """u^T H w."""
        return (u * self.matvec(outputs, targets, w)).sum()


def _reduction(loss_fn: nn.Module) -> str:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: use 'mean' or 'sum'"
        )
    return reduction


class CrossEntropyHessian(OutputHessian):
    """Softmax cross-entropy on logits (class dim 1): per position H = diag(p) - p p^T.

    Label smoothing leaves H unchanged (the loss is linear in the target distribution); class
    weights scale each position by its weight; `ignore_index` positions contribute nothing.
    """

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """(diag(p) - p p^T) u per position, times the reduction's weights."""
        loss_fn: nn.CrossEntropyLoss = self.loss_fn  # type: ignore[assignment]
        reduction = _reduction(loss_fn)
        probs = outputs.detach().softmax(dim=1)
        hu = probs * u - probs * (probs * u).sum(dim=1, keepdim=True)
        if targets.is_floating_point():  # class probabilities: every position counts once
            weight = torch.ones_like(probs.select(1, 0))
        else:
            valid = targets != loss_fn.ignore_index
            weight = valid.to(outputs.dtype)
            if loss_fn.weight is not None:
                weight = weight * loss_fn.weight.to(outputs.dtype)[targets.clamp(min=0) * valid]
        if reduction == "mean":
            weight = weight / weight.sum()
        return hu * weight.unsqueeze(1)


class MSEHessian(OutputHessian):
    """Squared error: H = 2 I (sum) or 2 I / numel (mean)."""

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """2 u, divided by the number of elements for a mean."""
        scale = 2.0 / outputs.numel() if _reduction(self.loss_fn) == "mean" else 2.0
        return scale * u


class BCEWithLogitsHessian(OutputHessian):
    """Sigmoid cross-entropy on logits: H = diag(s (1 - s)), s = sigmoid(output)."""

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """s (1 - s) u (weighted), divided by the number of elements for a mean."""
        loss_fn: nn.BCEWithLogitsLoss = self.loss_fn  # type: ignore[assignment]
        if loss_fn.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss(pos_weight=...) is not supported by the exact curvature")
        s = outputs.detach().sigmoid()
        hu = s * (1 - s) * u
        if loss_fn.weight is not None:
            hu = hu * loss_fn.weight
        return hu / outputs.numel() if _reduction(loss_fn) == "mean" else hu


_REGISTRY: dict[type[nn.Module], Callable[[nn.Module], OutputHessian]] = {
    nn.CrossEntropyLoss: CrossEntropyHessian,
    nn.MSELoss: MSEHessian,
    nn.BCEWithLogitsLoss: BCEWithLogitsHessian,
}


def register_output_hessian(
    loss_type: type[nn.Module], hessian: Callable[[nn.Module], OutputHessian]
) -> None:
    """Use `hessian(loss_fn)` for losses of `loss_type` in the exact curvature."""
    _REGISTRY[loss_type] = hessian


def output_hessian(loss_fn: nn.Module) -> OutputHessian:
    """The output Hessian of a supported loss module; a clear error for any other."""
    for cls in type(loss_fn).__mro__:
        if cls in _REGISTRY:
            hessian = _REGISTRY[cls](loss_fn)
            _reduction(loss_fn)
            return hessian
    if isinstance(loss_fn, nn.NLLLoss):
        raise ValueError(
            "NLLLoss has a zero Hessian with respect to log-probabilities: use CrossEntropyLoss on "
            "logits for the exact curvature"
        )
    supported = ", ".join(t.__name__ for t in _REGISTRY)
    raise ValueError(
        f"loss_fn {type(loss_fn).__name__} has no output Hessian (supported: {supported}); "
        "add one with torch_kfac.losses.register_output_hessian"
    )
