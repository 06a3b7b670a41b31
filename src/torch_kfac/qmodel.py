"""The exact quadratic model of the loss along a few directions (Martens & Grosse 2015, section 7).

For directions v_1..v_k, the model's Gram matrix M_ij = v_i^T C v_j with C the generalised
Gauss-Newton matrix (equal to the Fisher for the losses in `losses.py`) costs one vectorised
forward-mode pass over all directions: C-products in output space, (J v_i)^T H (J v_j). The
optimizer minimises q(c) = c^T b + 1/2 c^T (M + lambda V^T V) c over the coefficients of the
update delta = sum_i c_i v_i (b_i = g^T v_i), which gives learning rate and momentum.

Where a model has an operation without a forward-mode derivative (weight_norm's, a custom
`autograd.Function`), J v comes from reverse mode instead (`reverse_directions`, one warning).

The Gram matrix may be estimated on the batch's leading examples only (`max_examples`): the
forward-mode pass costs about five forward passes of those examples for two directions (the
primal computation is shared), the largest part of an adaptive step on a large batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_kfac.linalg import solver_dtype
from torch_kfac.losses import loss_curvature
from torch_kfac.utils import call_arguments, leading_examples, own_backward


class ExactCurvature:
    """GGN quadratic forms of `loss_fn(model(inputs), targets)` at the model's current parameters.

    With `max_examples` m, a batch of n > m examples (along dimension 0 of the targets and
    inputs) gives the forms of its first m examples (an unbiased estimate of the whole batch's
    when the examples are shuffled), scaled by n / m when `loss_fn` sums over examples
    (reduction='sum') so that they keep the whole batch's scale. None: always the whole batch.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, max_examples: int | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.hessian = loss_curvature(loss_fn)
        self.max_examples = max_examples
        #: Whether J v comes from one vectorised forward-mode pass (False after it failed once).
        self.forward_mode = True

    def output_directions(
        self, inputs: Any, directions: Sequence[dict[str, Tensor]]
    ) -> tuple[Tensor, list[Tensor]]:
        """Model outputs and J v for each direction v (a dict of parameter name -> tensor)."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())
        names = [n for n in params if any(n in d for d in directions)]
        args, kwargs = call_arguments(inputs)

        def outputs_of(*values: Tensor) -> Tensor:
            # Buffers are cloned inside the transformed function: batch norm may update them
            # in place there, and the model's own buffers stay untouched.
            state = {
                **params,
                **{n: b.clone() for n, b in buffers.items()},
                **dict(zip(names, values, strict=True)),
            }
            return functional_call(self.model, state, args, kwargs)

        primals = tuple(params[n] for n in names)
        # All directions in one vectorised forward-mode pass.
        tangents = tuple(
            torch.stack([d[n] if n in d else torch.zeros_like(params[n]) for d in directions]) for n in names
        )
        if self.forward_mode:
            try:
                # The math attention kernel: the fused CPU/GPU ones have no forward-mode derivative.
                # randomness='same': one dropout mask (drawn as a plain forward pass draws it) for
                # the outputs and every direction, so the products are those of one network.
                with sdpa_kernel(SDPBackend.MATH):
                    outputs, jvps = vmap(lambda *t: jvp(outputs_of, primals, t), randomness="same")(*tangents)
                return outputs[0], list(jvps.unbind(0))
            except torch.OutOfMemoryError:
                raise  # not a missing derivative: reverse mode would need more memory still
            except (NotImplementedError, RuntimeError) as err:
                # The model's own forward pass ran: the transforms failed (an operation without a
                # forward-mode derivative, e.g. weight_norm's, or a custom autograd.Function).
                self.forward_mode = False
                warnings.warn(
                    f"K-FAC: the quadratic model's forward-mode pass failed ({str(err).splitlines()[0]}); "
                    "it uses two reverse-mode passes per direction from now on (the same products, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        # Fused attention kernels have no double backward.
        with sdpa_kernel(SDPBackend.MATH), own_backward("the exact quadratic model's reverse-mode pass"):
            return reverse_directions(outputs_of, primals, [list(t) for t in zip(*tangents, strict=True)])

    def gram(self, inputs: Any, targets: Tensor, directions: Sequence[dict[str, Tensor]]) -> Tensor:
        """M_ij = v_i^T C v_j for the directions, a (k, k) tensor (on the leading examples, see above)."""
        count = self.max_examples
        size = targets.shape[0] if count is not None and targets.dim() > 0 else 0
        if count is not None and count < size:
            inputs, targets = leading_examples(inputs, targets, count)
            gram = self._gram(inputs, targets, directions)
            return gram * (size / count) if getattr(self.loss_fn, "reduction", None) == "sum" else gram
        return self._gram(inputs, targets, directions)

    def _gram(self, inputs: Any, targets: Tensor, directions: Sequence[dict[str, Tensor]]) -> Tensor:
        """The Gram matrix on the whole of the given batch."""
        outputs, jvps = self.output_directions(inputs, directions)
        # A 16-bit model's products are reduced in float32 (LAPACK solves the small system there).
        dtype = solver_dtype(outputs.dtype)
        outputs, jvps = outputs.to(dtype), [j.to(dtype) for j in jvps]
        k = len(directions)
        gram = outputs.new_zeros(k, k)
        for i in range(k):
            hv = self.hessian.matvec(outputs, targets, jvps[i])
            for j in range(i, k):
                gram[i, j] = gram[j, i] = (jvps[j] * hv).sum()
        return gram


def reverse_directions(
    outputs_of: Callable[..., Tensor], primals: Sequence[Tensor], directions: Sequence[Sequence[Tensor]]
) -> tuple[Tensor, list[Tensor]]:
    """Outputs and J v for each direction (`directions[i][n]`: its part for primal n) by reverse
    mode only: J v = d/du <J^T u, v>, the pullback J^T u built once with its graph, then one
    backward pass per direction. One forward pass, so one dropout mask for every direction.
    Parameters the outputs do not depend on contribute nothing."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in primals]
        outputs = outputs_of(*leaves)
        if not outputs.requires_grad:  # the outputs depend on none of the primals
            return outputs.detach(), [torch.zeros_like(outputs) for _ in directions]
        probe = torch.zeros_like(outputs, requires_grad=True)
        pulled = torch.autograd.grad(outputs, leaves, probe, create_graph=True, allow_unused=True)
        jvps = []
        for direction in directions:
            # A pullback without a graph back to u (piecewise-constant outputs) is 0 and constant.
            inner = [
                (g * v).sum()
                for g, v in zip(pulled, direction, strict=True)
                if g is not None and g.requires_grad
            ]
            if not inner:  # no primal reaches the outputs through a derivative
                jvps.append(torch.zeros_like(outputs))
                continue
            (jv,) = torch.autograd.grad(torch.stack(inner).sum(), probe, retain_graph=True)
            jvps.append(jv.detach())
    return outputs.detach(), jvps


def dot(u: dict[Any, Tensor], v: dict[Any, Tensor]) -> Tensor:
    """Inner product of two direction dicts over their shared keys (16-bit tensors in float32)."""
    terms = [(u[k].to(solver_dtype(u[k].dtype)) * v[k]).sum() for k in u if k in v]  # promotes v
    return torch.stack(terms).sum() if terms else torch.zeros(())


def solve_coefficients(
    gram: Tensor, linear: Tensor, fixed: dict[int, float | Tensor] | None = None
) -> Tensor:
    """argmin_c c^T b + 1/2 c^T M c, with the coefficients in `fixed` held at given values.

    Singular systems (a zero direction) get the minimum-norm solution.
    """
    fixed = fixed or {}
    fixed_idx = list(fixed)
    free = [i for i in range(linear.shape[0]) if i not in fixed]
    coeffs = linear.new_zeros(linear.shape[0])
    if fixed_idx:
        coeffs[fixed_idx] = torch.stack([torch.as_tensor(fixed[i]).to(linear) for i in fixed_idx])
    if free:
        rhs = -linear[free] - gram[free][:, fixed_idx] @ coeffs[fixed_idx]
        coeffs[free] = torch.linalg.pinv(gram[free][:, free]) @ rhs
    return coeffs


def quadratic_value(gram: Tensor, linear: Tensor, coeffs: Tensor) -> Tensor:
    """q(c) = c^T b + 1/2 c^T M c."""
    return coeffs @ linear + 0.5 * coeffs @ gram @ coeffs


def overlaps(directions: Sequence[dict[Any, Tensor]]) -> Tensor:
    """V^T V: the inner products of the directions, a (k, k) tensor (each pair's product computed once)."""
    k = len(directions)
    pairs = {(i, j): dot(directions[i], directions[j]) for i in range(k) for j in range(i, k)}
    return torch.stack([torch.stack([pairs[min(i, j), max(i, j)] for j in range(k)]) for i in range(k)])


def choose_coefficients(
    curvature: Tensor,
    overlap: Tensor,
    linear: Tensor,
    damping: Tensor,
    model_damping: Tensor | float,
    fixed: dict[int, float],
    bounds: tuple[int, tuple[float, float]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Coefficients minimising the damped model, and the model's value q there (for the damping rule).

    The coefficients minimise c^T b + 1/2 c^T (M + damping V^T V) c; q uses `model_damping` in
    place of the damping (the damping itself or only `l2_reg`). `bounds` (i, (low, high)) keeps
    the free coefficient i within [low, high]: the model is convex, so where the unconstrained
    minimum lies outside, the constrained one has c_i at the nearer bound and the other
    coefficients re-solved with c_i fixed there (no host synchronisation).

    A model that cannot be evaluated (a non-finite curvature, overlap or linear term, e.g. a
    forward-mode pass that overflowed in float16; pinv raises on those) or solved gives zero
    coefficients and q = inf: the caller does not move, and the damping rule counts the step as
    a failure and raises the damping.
    """
    ok = torch.isfinite(curvature).all() & torch.isfinite(linear).all() & torch.isfinite(overlap).all()
    curvature, overlap, linear = (torch.where(ok, t, 0.0) for t in (curvature, overlap, linear))
    damped = curvature + damping * overlap
    coeffs = solve_coefficients(damped, linear, fixed)
    if bounds is not None and bounds[0] not in fixed and bounds[0] < coeffs.shape[0]:
        i, (low, high) = bounds
        clipped = coeffs[i].clamp(low, high)
        on_bound = solve_coefficients(damped, linear, {**fixed, i: clipped})
        coeffs = torch.where(clipped == coeffs[i], coeffs, on_bound)
    ok = ok & torch.isfinite(coeffs).all()
    coeffs = torch.where(ok, coeffs, 0.0)
    q = quadratic_value(curvature + model_damping * overlap, linear, coeffs)
    return coeffs, torch.where(ok, q, torch.inf)


def combine(directions: Sequence[dict[str, Tensor]], coeffs: Tensor) -> dict[str, Tensor]:
    """delta = sum_i c_i v_i over the union of the directions' keys."""
    delta: dict[str, Tensor] = {}
    for c, direction in zip(coeffs, directions, strict=False):
        for n, v in direction.items():
            delta[n] = delta[n] + c * v if n in delta else c * v
    return delta
