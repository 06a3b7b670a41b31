"""Loss-specific curvature pieces: the model's predictive distribution behind each loss.

Each supported loss is the negative log-likelihood of a distribution over targets given the
model's outputs. For a reduced loss L = sum_i w_i l_i over loss terms i (examples, or positions of
a sequence; w_i = 1/count for a mean), `LossCurvature` provides

* `matvec(outputs, targets, u)`: H u with H the Fisher of that distribution in output space,
  weighted by w (for these losses the Hessian of L with respect to the outputs, so
  (J v)^T H (J w) is the generalised Gauss-Newton product used by the quadratic model);
* `sample_targets(outputs, targets, generator)`: targets drawn from the predictive distribution,
  for the Monte-Carlo Fisher, and `sampled_loss(outputs, targets, sampled)`, whose gradient in the
  outputs is then a sample of the weighted Fisher (`loss_fn` on the drawn targets by default; the
  terms weighted by w_i explicitly where `loss_fn`'s own gradient on them is not one: class
  weights, label smoothing, probability targets);
* `fisher_columns(outputs, targets)`: vectors v_k, shaped like the outputs, with
  sum_k v_k v_k^T = sum_i w_i^2 H_i: backpropagating each gives the exact (type-2) Fisher in the
  same scaling as backpropagating the gradient of L (the empirical and MC Fisher).

A loss of your own: subclass `LossCurvature` and `register_loss(MyLoss, MyCurvature)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def _reduction(loss_fn: nn.Module) -> str:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: use 'mean' or 'sum'"
        )
    return reduction


class LossCurvature:
    """Output-space curvature and sampling of one loss module."""

    #: Dimension of the outputs that holds the classes/features of one loss term.
    class_dim: int = -1

    def __init__(self, loss_fn: nn.Module) -> None:
        self.loss_fn = loss_fn
        self.reduction = _reduction(loss_fn)

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """H u, shaped like the outputs."""
        raise NotImplementedError

    def sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator | None) -> Tensor:
        """Targets drawn from the model's predictive distribution."""
        raise NotImplementedError

    def sampled_loss(self, outputs: Tensor, targets: Tensor, sampled: Tensor) -> Tensor:
        """A scalar whose gradient v in the outputs, for targets `sampled` by `sample_targets`, has
        E[v v^T] = sum_i w_i^2 H_i per term (as `fisher_columns`): here `loss_fn(outputs, sampled)`."""
        return self.loss_fn(outputs, sampled)

    def fisher_columns(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Columns v_k, stacked on a new dim 0, of the weighted Fisher square root."""
        raise NotImplementedError

    def terms_per_example(self, outputs: Tensor) -> int:
        """Loss terms (positions) per example: the output's size outside batch and class dims."""
        per_example = outputs[0].numel() if outputs.dim() > 1 else 1
        return max(1, per_example // outputs.shape[self.class_dim]) if outputs.dim() > 1 else 1

    def _elementwise_weight(self, outputs: Tensor) -> float:
        return 1.0 / outputs.numel() if self.reduction == "mean" else 1.0


class _CategoricalBase(LossCurvature):
    """Shared by cross-entropy (logits) and NLL (log-probabilities): classes on dim 1."""

    class_dim = 1

    def _weights(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-position weight w_i of the reduced loss (shape of the outputs without dim 1).

        Position i's loss is sum_c a_ic (-log p_ic), whose Hessian in the logits is
        (sum_c a_ic) (diag(p_i) - p_i p_i^T), so w_i = sum_c a_ic over the normaliser of 'mean'
        (as `F.cross_entropy` computes them): a_ic = w_c t_ic with class weights w (1 without)
        and targets t (one-hot for class indices), label smoothing eps taking t to
        (1 - eps) t + eps / C. 'mean' divides by the number of positions for probability
        targets, by the summed class weights of the valid positions' targets for indices.
        """
        loss_fn = self.loss_fn
        classes = outputs.shape[1]
        smoothing = float(getattr(loss_fn, "label_smoothing", 0.0))
        class_weight = getattr(loss_fn, "weight", None)
        class_weight = None if class_weight is None else class_weight.to(outputs.dtype)
        if targets.is_floating_point():  # class probabilities
            probs = targets.to(outputs.dtype)
            if smoothing:
                probs = probs * (1.0 - smoothing) + smoothing / classes
            if class_weight is not None:
                probs = probs * class_weight.reshape((1, classes) + (1,) * (probs.dim() - 2))
            weight = probs.sum(1)
            return weight / weight.numel() if self.reduction == "mean" else weight
        valid = targets != loss_fn.ignore_index  # type: ignore[union-attr]
        if class_weight is None:
            target_weight = valid.to(outputs.dtype)
            smoothed = target_weight  # (1 - eps) + eps / C * C = 1 per valid position
        else:
            target_weight = class_weight[targets.clamp(min=0) * valid] * valid
            smoothed = ((1.0 - smoothing) * target_weight + smoothing / classes * class_weight.sum()) * valid
        return smoothed / target_weight.sum() if self.reduction == "mean" else smoothed

    def _probs(self, outputs: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_probs(self, outputs: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator | None) -> Tensor:
        """Class indices sampled per position; ignored positions stay ignored."""
        probs = self._probs(outputs).detach().movedim(1, -1)
        flat = probs.reshape(-1, probs.shape[-1])
        sampled = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
        if not targets.is_floating_point():
            sampled = torch.where(targets == self.loss_fn.ignore_index, targets, sampled)  # type: ignore[union-attr]
        return sampled

    def sampled_loss(self, outputs: Tensor, targets: Tensor, sampled: Tensor) -> Tensor:
        """sum_i w_i (-log p_i[sampled_i]), with the true targets' weights w_i: the gradient
        w_i (p_i - e_sampled) at each position has E[v v^T] = w_i^2 H_i. `loss_fn` itself where it
        computes that sum, that is without class weights, label smoothing, probability targets
        and an `ignore_index` that is a class: it would weigh the drawn class, smooth it, drop
        the targets' weights or ignore a drawn label equal to `ignore_index`."""
        loss_fn, classes = self.loss_fn, outputs.shape[1]
        ignore_index = loss_fn.ignore_index  # type: ignore[union-attr]
        smoothing, class_weight = getattr(loss_fn, "label_smoothing", 0.0), getattr(loss_fn, "weight", None)
        if not (
            smoothing
            or class_weight is not None
            or targets.is_floating_point()
            or 0 <= ignore_index < classes
        ):
            return loss_fn(outputs, sampled)
        # Ignored positions (weight 0) keep ignore_index as their draw, perhaps not a class index.
        index = sampled.clamp(0, classes - 1).unsqueeze(1)
        picked = self._log_probs(outputs).gather(1, index).squeeze(1)
        return -(self._weights(outputs, targets).detach() * picked).sum()


class CrossEntropyCurvature(_CategoricalBase):
    """Softmax cross-entropy on logits: per position H = diag(p) - p p^T.

    The loss is linear in the target distribution, so targets, class weights and label smoothing
    only scale each position's H (see `_weights`); `ignore_index` positions contribute nothing.
    """

    def _probs(self, outputs: Tensor) -> Tensor:
        return outputs.softmax(dim=1)

    def _log_probs(self, outputs: Tensor) -> Tensor:
        return outputs.log_softmax(dim=1)

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """(diag(p) - p p^T) u per position, times the reduction's weights."""
        probs = self._probs(outputs.detach())
        hu = probs * u - probs * (probs * u).sum(dim=1, keepdim=True)
        return hu * self._weights(outputs, targets).unsqueeze(1)

    def fisher_columns(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """sqrt(p_k) (e_k - p) per class k: (diag(sqrt p) - p sqrt(p)^T) is a square root of H."""
        probs = self._probs(outputs.detach())
        weight = self._weights(outputs, targets).unsqueeze(1)
        eye = torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)
        shape = (probs.shape[1], 1, probs.shape[1]) + (1,) * (probs.dim() - 2)
        onehot = eye.reshape(shape)
        root = probs.sqrt().movedim(1, 0).unsqueeze(2)  # (C, N, 1, ...)
        return root * (onehot - probs.unsqueeze(0)) * weight


class NLLCurvature(_CategoricalBase):
    """NLL on log-probabilities: Fisher in log-probability space H = diag(p).

    Its Hessian with respect to log-probabilities is zero; the Fisher is the curvature that,
    backpropagated through the model's log-softmax, gives the softmax Fisher.
    """

    def _probs(self, outputs: Tensor) -> Tensor:
        return outputs.exp()

    def _log_probs(self, outputs: Tensor) -> Tensor:
        return outputs

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """p * u per position, times the reduction's weights."""
        return self._probs(outputs.detach()) * u * self._weights(outputs, targets).unsqueeze(1)

    def fisher_columns(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """sqrt(p_k) e_k per class k."""
        probs = self._probs(outputs.detach())
        weight = self._weights(outputs, targets).unsqueeze(1)
        eye = torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)
        onehot = eye.reshape((probs.shape[1], 1, probs.shape[1]) + (1,) * (probs.dim() - 2))
        return onehot * probs.sqrt().unsqueeze(0) * weight


class MSECurvature(LossCurvature):
    """Squared error, a Gaussian likelihood: H = 2 I per element, weighted by the reduction."""

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """2 w u."""
        return 2.0 * self._elementwise_weight(outputs) * u

    def sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator | None) -> Tensor:
        """outputs + N(0, 1/2): the gradient 2 (f - y) then has covariance 2 I = H per element."""
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device)
        return outputs.detach() + noise * 0.5**0.5

    def fisher_columns(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """sqrt(2) w e_k for each feature k of the last dim."""
        return _diagonal_columns(torch.full_like(outputs, 2.0**0.5 * self._elementwise_weight(outputs)))


class BCEWithLogitsCurvature(LossCurvature):
    """Sigmoid cross-entropy on logits, a Bernoulli likelihood: H = diag(s (1 - s))."""

    def _check(self) -> None:
        if getattr(self.loss_fn, "pos_weight", None) is not None:
            raise ValueError(
                "BCEWithLogitsLoss(pos_weight=...) is not supported by the Fisher and GGN curvature"
            )

    def _element_weights(self, outputs: Tensor) -> Tensor | float:
        w = self._elementwise_weight(outputs)
        weight = getattr(self.loss_fn, "weight", None)
        return w * weight if weight is not None else w

    def matvec(self, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """s (1 - s) u, weighted."""
        self._check()
        s = outputs.detach().sigmoid()
        return s * (1 - s) * u * self._element_weights(outputs)

    def sample_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator | None) -> Tensor:
        """Bernoulli draws with probability sigmoid(output); `loss_fn` on them weighs each element
        by its own weight, which does not depend on the target (the default `sampled_loss`)."""
        self._check()
        return torch.bernoulli(outputs.detach().sigmoid(), generator=generator)

    def fisher_columns(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """sqrt(s (1 - s)) w e_k for each feature k of the last dim."""
        self._check()
        s = outputs.detach().sigmoid()
        return _diagonal_columns((s * (1 - s)).sqrt() * self._element_weights(outputs))


def _diagonal_columns(scale: Tensor) -> Tensor:
    """Columns e_k * scale over the last dim, stacked on a new dim 0."""
    k = scale.shape[-1]
    eye = torch.eye(k, dtype=scale.dtype, device=scale.device)
    onehot = eye.reshape((k,) + (1,) * (scale.dim() - 1) + (k,))
    return onehot * scale.unsqueeze(0)


_REGISTRY: dict[type[nn.Module], Callable[[nn.Module], LossCurvature]] = {
    nn.CrossEntropyLoss: CrossEntropyCurvature,
    nn.NLLLoss: NLLCurvature,
    nn.MSELoss: MSECurvature,
    nn.BCEWithLogitsLoss: BCEWithLogitsCurvature,
}


def register_loss(loss_type: type[nn.Module], curvature: Callable[[nn.Module], LossCurvature]) -> None:
    """Use `curvature(loss_fn)` for losses of `loss_type` (Fisher types, quadratic model)."""
    if not (isinstance(loss_type, type) and issubclass(loss_type, nn.Module)):
        raise TypeError(f"loss_type must be an nn.Module subclass, got {loss_type!r}")
    _REGISTRY[loss_type] = curvature


def loss_curvature(loss_fn: nn.Module) -> LossCurvature:
    """The curvature of a supported loss module; a clear error for any other."""
    if not isinstance(loss_fn, nn.Module):
        raise ValueError(f"loss_fn must be a loss module such as nn.CrossEntropyLoss(), got {loss_fn!r}")
    for cls in type(loss_fn).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](loss_fn)
    supported = ", ".join(t.__name__ for t in _REGISTRY)
    raise ValueError(
        f"loss_fn {type(loss_fn).__name__} is not supported (supported: {supported}); "
        "add it with torch_kfac.losses.register_loss"
    )


__all__ = [
    "BCEWithLogitsCurvature",
    "CrossEntropyCurvature",
    "LossCurvature",
    "MSECurvature",
    "NLLCurvature",
    "loss_curvature",
    "register_loss",
]
