"""The exact quadratic model of the loss along a few directions (Martens & Grosse 2015, section 7).

For directions v_1..v_k, the model's Gram matrix M_ij = v_i^T C v_j with C the generalised
Gauss-Newton matrix (equal to the Fisher for the losses in `losses.py`) costs one forward-mode pass per
direction: C-products in output space, (J v_i)^T H (J v_j). The optimizer minimises
q(c) = c^T b + 1/2 c^T (M + lambda V^T V) c over the coefficients of the update
delta = sum_i c_i v_i (b_i = g^T v_i), which gives learning rate and momentum automatically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call

from torch_kfac.losses import loss_curvature


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


class ExactCurvature:
    """GGN quadratic forms of `loss_fn(model(inputs), targets)` at the model's current parameters."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.hessian = loss_curvature(loss_fn)

    def output_directions(
        self, inputs: Any, directions: Sequence[dict[str, Tensor]]
    ) -> tuple[Tensor, list[Tensor]]:
        """Model outputs and J v for each direction v (a dict of parameter name -> tensor)."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        args = as_args(inputs)
        outputs, jvps = None, []
        # Forward-mode AD with dual numbers (torch.autograd.forward_ad rather than torch.func,
        # which refuses the in-place buffer updates of batch norm in training mode).
        with preserved_buffers(self.model), torch.no_grad(), forward_ad.dual_level():
            for direction in directions:
                duals = {n: forward_ad.make_dual(params[n], v) for n, v in direction.items()}
                out = functional_call(self.model, {**params, **duals}, args)
                outputs, jv = forward_ad.unpack_dual(out)
                jvps.append(torch.zeros_like(outputs) if jv is None else jv)
        assert outputs is not None
        return outputs, jvps

    def gram(self, inputs: Any, targets: Tensor, directions: Sequence[dict[str, Tensor]]) -> Tensor:
        """M_ij = v_i^T C v_j for the directions, a (k, k) tensor."""
        outputs, jvps = self.output_directions(inputs, directions)
        k = len(directions)
        gram = outputs.new_zeros(k, k)
        for i in range(k):
            hv = self.hessian.matvec(outputs, targets, jvps[i])
            for j in range(i, k):
                gram[i, j] = gram[j, i] = (jvps[j] * hv).sum()
        return gram


def dot(u: dict[Any, Tensor], v: dict[Any, Tensor]) -> Tensor:
    """Inner product of two direction dicts over their shared keys."""
    terms = [(u[k] * v[k]).sum() for k in u if k in v]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def solve_coefficients(gram: Tensor, linear: Tensor, fixed: dict[int, float] | None = None) -> Tensor:
    """argmin_c c^T b + 1/2 c^T M c, with the coefficients in `fixed` held at given values.

    Singular systems (a zero direction) get the minimum-norm solution.
    """
    fixed = fixed or {}
    fixed_idx = list(fixed)
    free = [i for i in range(linear.shape[0]) if i not in fixed]
    coeffs = linear.new_zeros(linear.shape[0])
    coeffs[fixed_idx] = linear.new_tensor([fixed[i] for i in fixed_idx])
    if free:
        rhs = -linear[free] - gram[free][:, fixed_idx] @ coeffs[fixed_idx]
        coeffs[free] = torch.linalg.pinv(gram[free][:, free]) @ rhs
    return coeffs


def quadratic_value(gram: Tensor, linear: Tensor, coeffs: Tensor) -> Tensor:
    """q(c) = c^T b + 1/2 c^T M c."""
    return coeffs @ linear + 0.5 * coeffs @ gram @ coeffs
