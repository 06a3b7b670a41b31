"""Independent reference computations shared by the exact K-FAC tests.

Everything here is computed by a different route from the library:

* layer inputs and output gradients are recorded with a forward hook that adds a zero
  "probe" tensor to the layer output and differentiates the loss with respect to that
  probe (so in-place activations after the layer do not interfere);
* convolution patches are extracted with an explicit loop over output positions from
  the input padded by ``torch.nn.functional.pad`` with the module's padding mode, and
  the extraction is self-checked by reproducing the module's output from the patches;
* preconditioned gradients are obtained by a dense solve with the full Kronecker product.

Conventions (per-example-loss Fisher): with ``reduction="mean"`` the training loss is
``L = (1/N) sum_n l_n`` and the per-example output gradient is ``N * dL/dy``; with
``reduction="sum"`` it is ``dL/dy``. ``A = 1/(N T) sum a a^T`` and ``G = 1/N sum g g^T``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac import KFAC, KFACPreconditioner

DTYPE = torch.float64

# Tolerances for quantities that are exact up to floating-point summation order.
EXACT = {"rtol": 1e-10, "atol": 1e-12}
# Tolerances for quantities obtained through linear solves (well-conditioned, float64).
SOLVE = {"rtol": 1e-9, "atol": 1e-11}

LossFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------
# Data, losses and models
# ---------------------------------------------------------------------------------------


def make_loss(kind: str, reduction: str) -> LossFn:
    """Return a torch loss module (``"mse"`` or ``"ce"``) with the given reduction."""
    if kind == "mse":
        return nn.MSELoss(reduction=reduction)
    if kind == "ce":
        return nn.CrossEntropyLoss(reduction=reduction)
    raise ValueError(kind)


def make_per_example_loss(kind: str, reduction: str) -> LossFn:
    """Loss whose ``"sum"`` version is exactly ``N`` times its ``"mean"`` version.

    For cross-entropy this is the plain torch loss. For squared error the per-example loss
    is the mean over output features, so that ``sum`` and ``mean`` share per-example losses
    (torch's ``MSELoss(reduction="sum")`` also sums over features, which changes the loss).
    """
    if kind == "ce":
        return nn.CrossEntropyLoss(reduction=reduction)
    if kind == "mse":

        def loss(output: Tensor, target: Tensor) -> Tensor:
            per_example = F.mse_loss(output, target, reduction="none").flatten(1).mean(1)
            return per_example.mean() if reduction == "mean" else per_example.sum()

        return loss
    raise ValueError(kind)


def make_target(kind: str, batch_size: int, num_outputs: int, generator: torch.Generator):
    """Random regression targets (``"mse"``) or class labels (``"ce"``)."""
    if kind == "mse":
        return torch.randn(batch_size, num_outputs, dtype=DTYPE, generator=generator)
    if kind == "ce":
        return torch.randint(0, num_outputs, (batch_size,), generator=generator)
    raise ValueError(kind)


def randn(*shape: int, generator: torch.Generator) -> Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=generator)


class Transpose(nn.Module):
    """Swap two dimensions (produces a non-contiguous tensor)."""

    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(self.dim0, self.dim1)


def with_flatten_head(body: nn.Module, input_shape: Sequence[int], num_outputs: int):
    """``Sequential(body, Flatten(1), Linear(features, num_outputs))`` in float64.

    ``input_shape`` excludes the batch dimension. The head layer is named ``"2"`` and the
    body ``"0"``.
    """
    body = body.to(DTYPE)
    with torch.no_grad():
        features = body(torch.zeros(1, *input_shape, dtype=DTYPE)).numel()
    return nn.Sequential(body, nn.Flatten(1), nn.Linear(features, num_outputs)).to(DTYPE)


# ---------------------------------------------------------------------------------------
# Recording inputs and output gradients
# ---------------------------------------------------------------------------------------


@dataclass
class LayerRecord:
    module: nn.Module
    input: Tensor  # layer input, exactly as the layer received it (possibly non-contiguous)
    output: Tensor  # layer output
    grad_output: Tensor  # dL/dy for the *reduced* training loss L


@dataclass
class Recording:
    loss: Tensor
    layers: dict[str, LayerRecord]
    param_grads: dict[str, Tensor]  # gradients of L, keyed by qualified parameter name


def record(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, names: Sequence[str]):
    """One forward/backward pass of ``loss_fn(model(x), y)`` recording the named layers.

    Does not touch ``.grad`` of the parameters (uses ``torch.autograd.grad``) and removes
    its hooks before returning. Each named layer must be called exactly once.
    """
    modules = dict(model.named_modules())
    probes: dict[str, Tensor] = {}
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            assert name not in probes, f"layer {name} called more than once"
            probe = torch.zeros_like(output, requires_grad=True)
            probes[name] = probe
            seen[name] = (args[0].detach(), output.detach().clone())
            return output + probe

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
    try:
        loss = loss_fn(model(x), y)
    finally:
        for handle in handles:
            handle.remove()

    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [probes[n] for n in names] + [p for _, p in named_params])
    layers = {
        name: LayerRecord(modules[name], seen[name][0], seen[name][1], grad)
        for name, grad in zip(names, grads[: len(names)], strict=True)
    }
    param_grads = {n: g.detach() for (n, _), g in zip(named_params, grads[len(names) :], strict=True)}
    return Recording(loss.detach(), layers, param_grads)


def per_example_scale(batch_size: int, reduction: str) -> float:
    """Factor turning dL/dy into the per-example-loss gradient d l_n / dy."""
    return {"mean": float(batch_size), "sum": 1.0}[reduction]


# ---------------------------------------------------------------------------------------
# Reference Kronecker factors
# ---------------------------------------------------------------------------------------


def _covariances(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``a``: (N, T, groups, d_a); ``g``: (N, T, groups, d_g) -> A, G of shape (groups, ...)."""
    n, t = a.shape[:2]
    big_a = torch.zeros(a.shape[2], a.shape[3], a.shape[3], dtype=a.dtype)
    big_g = torch.zeros(g.shape[2], g.shape[3], g.shape[3], dtype=g.dtype)
    # Explicit accumulation of outer products (not a single batched contraction).
    for i in range(n):
        for j in range(t):
            big_a += a[i, j, :, :, None] * a[i, j, :, None, :]
            big_g += g[i, j, :, :, None] * g[i, j, :, None, :]
    return big_a / (n * t), big_g / n


def _append_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


def linear_factors(rec: LayerRecord, reduction: str) -> tuple[Tensor, Tensor]:
    """Reference (A, G) for an ``nn.Linear`` layer with input (N, *, d_in)."""
    module = rec.module
    assert isinstance(module, nn.Linear)
    batch_size = rec.input.shape[0]
    a = rec.input.reshape(batch_size, -1, 1, module.in_features)
    if module.bias is not None:
        a = _append_ones(a)
    g = rec.grad_output.reshape(batch_size, -1, 1, module.out_features)
    g = g * per_example_scale(batch_size, reduction)
    big_a, big_g = _covariances(a, g)
    return big_a[0], big_g[0]


def conv_paddings(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dimension, as torch's convolution applies it."""
    ndim = len(module.kernel_size)
    if module.padding == "valid":
        return [(0, 0)] * ndim
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def pad_conv_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Pad ``x`` with the module's padding amounts and padding mode."""
    flat: list[int] = []
    for left, right in reversed(conv_paddings(module)):
        flat += [left, right]
    if module.padding_mode == "zeros":
        return F.pad(x, flat, mode="constant", value=0.0)
    return F.pad(x, flat, mode=module.padding_mode)


def conv_patches(module: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, list[int]]:
    """Patches of shape (N, T, groups, C_in/groups * prod(kernel)) and the output size.

    Patch ``[n, t, j]`` is the input patch of group ``j`` that produces output location
    ``t`` (row-major over output positions), flattened in the weight's
    ``(C_in/groups, k1, k2, ...)`` order.
    """
    xp = pad_conv_input(module, x)
    batch_size, channels = xp.shape[:2]
    groups = module.groups
    geometry = list(zip(xp.shape[2:], module.kernel_size, module.stride, module.dilation, strict=True))
    out_sizes = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in geometry]
    patches = []
    for position in itertools.product(*(range(o) for o in out_sizes)):
        window = tuple(
            slice(o * s, o * s + d * (k - 1) + 1, d)
            for o, (_, k, s, d) in zip(position, geometry, strict=True)
        )
        patch = xp[(slice(None), slice(None), *window)]
        assert patch.shape[2:] == module.kernel_size
        patches.append(patch.reshape(batch_size, groups, -1))
    assert channels % groups == 0
    return torch.stack(patches, dim=1), out_sizes


def conv_factors(rec: LayerRecord, reduction: str) -> tuple[Tensor, Tensor]:
    """Reference (A, G) for ``nn.Conv{1,2,3}d``; leading group dim only if groups > 1.

    Also checks that the extracted patches reproduce the recorded layer output.
    """
    module = rec.module
    assert isinstance(module, nn.modules.conv._ConvNd)
    groups = module.groups
    batch_size = rec.input.shape[0]
    patches, out_sizes = conv_patches(module, rec.input)
    assert list(rec.output.shape[2:]) == out_sizes

    # Self-check: output[n, t, group j, o] = W_j[o] . patch[n, t, j] + b_j[o].
    c_out = module.out_channels
    weight = module.weight.detach().reshape(groups, c_out // groups, -1)
    output = torch.einsum("ntgi,goi->ntgo", patches, weight).reshape(batch_size, -1, c_out)
    if module.bias is not None:
        output = output + module.bias.detach()
    expected = rec.output.movedim(1, -1).reshape(batch_size, -1, c_out)
    torch.testing.assert_close(output, expected, **EXACT)

    a = _append_ones(patches) if module.bias is not None else patches
    g = rec.grad_output.movedim(1, -1).reshape(batch_size, -1, groups, c_out // groups)
    g = g * per_example_scale(batch_size, reduction)
    big_a, big_g = _covariances(a, g)
    if groups == 1:
        return big_a[0], big_g[0]
    return big_a, big_g


def centered_factors(a: Tensor, g: Tensor, bias: bool, batch_size: int) -> tuple[Tensor, Tensor]:
    """Centered (A, G) from rows a (M, d_a) and per-example output-gradient rows g (M, d_g), M = N T.

    a (not the bias's 1) and g are centered over all M rows: A = 1/M sum [a - mean, 1][...]^T and
    G = 1/N sum (g - mean)(g - mean)^T, by explicit accumulation of outer products.
    """
    a = a - a.mean(0)
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    g = g - g.mean(0)
    big_a = sum(torch.outer(row, row) for row in a) / a.shape[0]
    big_g = sum(torch.outer(row, row) for row in g) / batch_size
    return big_a, big_g


def reference_factors(rec: LayerRecord, reduction: str) -> tuple[Tensor, Tensor]:
    if isinstance(rec.module, nn.Linear):
        return linear_factors(rec, reduction)
    return conv_factors(rec, reduction)


# ---------------------------------------------------------------------------------------
# Gradient matrices, exact Fisher and dense preconditioning
# ---------------------------------------------------------------------------------------


def gradient_matrix(weight_grad: Tensor, bias_grad: Tensor | None, groups: int = 1) -> Tensor:
    """``[W.grad.reshape(d_out, -1), b.grad[:, None]]`` (bias column only if present).

    With ``groups > 1`` the result has shape (groups, d_out/groups, d_in/groups*prod(k) [+1]):
    group ``j`` holds output channels ``j*d_out/groups .. (j+1)*d_out/groups``.
    """
    matrix = weight_grad.reshape(weight_grad.shape[0], -1)
    if bias_grad is not None:
        matrix = torch.cat([matrix, bias_grad[:, None]], dim=1)
    if groups == 1:
        return matrix
    return matrix.reshape(groups, matrix.shape[0] // groups, matrix.shape[1])


def layer_gradient_matrix(param_grads: dict[str, Tensor], name: str, groups: int = 1) -> Tensor:
    """Gradient matrix of layer ``name`` from gradients keyed by qualified parameter name."""
    prefix = f"{name}." if name else ""
    return gradient_matrix(param_grads[prefix + "weight"], param_grads.get(prefix + "bias"), groups)


def vec(matrix: Tensor) -> Tensor:
    """Column-stacking vectorisation."""
    return matrix.T.reshape(-1)


def unvec(vector: Tensor, rows: int, cols: int) -> Tensor:
    return vector.reshape(cols, rows).T


def pi_value(big_a: Tensor, big_g: Tensor, enable_pi_correction: bool) -> float:
    if not enable_pi_correction:
        return 1.0
    mean_a = big_a.diagonal().sum().item() / big_a.shape[0]
    mean_g = big_g.diagonal().sum().item() / big_g.shape[0]
    return math.sqrt(mean_a / mean_g)


def dense_preconditioned(
    big_a: Tensor,
    big_g: Tensor,
    matrix: Tensor,
    damping: float,
    enable_pi_correction: bool,
    damping_type: str = "factored",
) -> Tensor:
    """Preconditioned gradient matrix by a dense solve with the full Kronecker product.

    ``"factored"``: solve ``kron(A + pi sqrt(d) I, G + sqrt(d)/pi I) vec(P) = vec(M)``;
    ``"exact"``: solve ``(kron(A, G) + d I) vec(P) = vec(M)``. With a leading group dim
    (A: (groups, ...), M: (groups, ...)) every group is solved on its own, with its own pi.
    """
    if big_a.dim() == 3:
        return torch.stack(
            [
                dense_preconditioned(a, g, m, damping, enable_pi_correction, damping_type)
                for a, g, m in zip(big_a, big_g, matrix, strict=True)
            ]
        )
    eye_a = torch.eye(big_a.shape[0], dtype=big_a.dtype)
    eye_g = torch.eye(big_g.shape[0], dtype=big_g.dtype)
    if damping_type == "exact":
        curvature = torch.kron(big_a, big_g) + damping * torch.kron(eye_a, eye_g)
    else:
        pi = pi_value(big_a, big_g, enable_pi_correction)
        root = math.sqrt(damping)
        curvature = torch.kron(big_a + pi * root * eye_a, big_g + root / pi * eye_g)
    solution = torch.linalg.solve(curvature, vec(matrix))
    return unvec(solution, *matrix.shape)


# ---------------------------------------------------------------------------------------
# curvlinops
# ---------------------------------------------------------------------------------------


def curvlinops_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher_type: str = "empirical",
    mc_samples: int = 1,
    kfac_approx: str = "expand",
):
    """curvlinops' KFAC factors (bias folded into A), whole batch at once.

    Returns ``(input_covariances, gradient_covariances)`` dicts keyed by module name.
    """
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(
        model,
        loss_fn,
        params,
        [(x, y)],
        check_deterministic=False,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=False,
    )
    op.compute_kronecker_factors()
    return dict(op._input_covariances), dict(op._gradient_covariances)


def curvlinops_gradient_scale(loss_fn: nn.Module, output_shape: Sequence[int]) -> float:
    """Ratio curvlinops G / our G, for a model with 2-D output (N, C).

    For ``sum`` curvlinops uses the summed-loss Fisher (N times ours). For ``mean`` it uses
    the per-example-loss Fisher, except that for ``MSELoss`` its per-example loss sums over
    the C output features instead of averaging (it rescales the loss by sqrt(C)).
    """
    batch_size, num_outputs = output_shape
    if loss_fn.reduction == "sum":
        return float(batch_size)
    if isinstance(loss_fn, nn.MSELoss):
        return float(num_outputs)
    return 1.0


# ---------------------------------------------------------------------------------------
# Driving the library
# ---------------------------------------------------------------------------------------


def library_kfac_factors(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, reduction: str
) -> dict[str, tuple[Tensor, Tensor]]:
    """Factors of ``torch_kfac.KFAC`` after one forward/backward and one ``update_cov``."""
    opt = KFAC(
        model,
        lr=0.1,
        damping=1e-3,
        momentum=0.0,
        cov_ema_decay=0.95,
        reduction=reduction,
    )
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.update_cov()
    return {name: (blk.A.detach().clone(), blk.G.detach().clone()) for name, blk in opt.blocks.items()}


def library_preconditioned(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    reduction: str,
    damping: float,
    enable_pi_correction: bool,
    **options,
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Run ``KFACPreconditioner.step`` once; return the preconditioned gradients of all
    parameters (by qualified name) and the blocks' factors. ``options`` are passed on."""
    pre = KFACPreconditioner(
        model,
        damping=damping,
        reduction=reduction,
        enable_pi_correction=enable_pi_correction,
        **options,
    )
    loss = loss_fn(model(x), y)
    loss.backward()
    pre.step()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    factors = {n: (b.A.detach().clone(), b.G.detach().clone()) for n, b in pre.blocks.items()}
    return grads, factors


def assert_factors_match(
    actual: dict[str, tuple[Tensor, Tensor]],
    rec: Recording,
    reduction: str,
    names: Sequence[str] | None = None,
) -> None:
    """Library factors equal the reference factors for every recorded layer."""
    for name in names if names is not None else rec.layers:
        expected_a, expected_g = reference_factors(rec.layers[name], reduction)
        actual_a, actual_g = actual[name]
        assert actual_a.dtype == DTYPE and actual_g.dtype == DTYPE
        torch.testing.assert_close(actual_a, expected_a, **EXACT, msg=lambda m, n=name: f"A[{n}]: {m}")
        torch.testing.assert_close(actual_g, expected_g, **EXACT, msg=lambda m, n=name: f"G[{n}]: {m}")


def assert_factor_dicts_equal(
    first: dict[str, tuple[Tensor, Tensor]], second: dict[str, tuple[Tensor, Tensor]]
) -> None:
    """Two runs of the library produced the same blocks with the same (A, G)."""
    assert set(first) == set(second)
    for name, (big_a, big_g) in first.items():
        torch.testing.assert_close(second[name][0], big_a, **EXACT)
        torch.testing.assert_close(second[name][1], big_g, **EXACT)


# ---------------------------------------------------------------------------------------
# Per-example parameter gradients (embedding, normalization and transposed-conv blocks)
# ---------------------------------------------------------------------------------------


def per_example_gradients_vmap(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Gradients of each example's own loss ``loss_fn(model(x_n[None]), y_n[None])``, by
    ``torch.func.vmap(grad)``; keyed by qualified parameter name, shape (N, *param.shape).

    For the losses of ``make_loss`` this one-example loss is the per-example loss of both reductions
    (``N dL/dtheta`` restricted to example n for 'mean', ``dL/dtheta`` for 'sum'). Not valid for batch
    norm in training mode, whose output couples the examples.
    """
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def example_loss(theta: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(model, (theta, buffers), (xn.unsqueeze(0),))
        return loss_fn(out, yn.unsqueeze(0))

    return dict(vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y))


def per_example_gradients_loop(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, reduction: str, names: Sequence[str]
) -> dict[str, Tensor]:
    """Per-example gradients of the named modules' parameters by an explicit loop over examples.

    For example n, a forward hook makes only example n's output of each named module depend on the
    module's parameters: the other examples' outputs are recomputed by a copy of the module with
    detached parameters (same input, same mode, its own buffers). ``per_example_scale`` times the
    gradient of the batch loss is then example n's gradient, with the batch coupling of batch norm
    in training mode (its statistics) held as the forward pass computed them.
    """
    modules = dict(model.named_modules())
    batch_size = x.shape[0]
    names_params = [(f"{m}.{p}" if m else p, m, p) for m in names for p, _ in modules[m].named_parameters()]
    result: dict[str, list[Tensor]] = {full: [] for full, _, _ in names_params}
    for n in range(batch_size):

        def make_hook(name: str, example: int = n):
            frozen = _frozen_copy(modules[name])

            def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
                detached = frozen(*args)
                mask = torch.zeros(output.shape[0], dtype=torch.bool)
                mask[example] = True
                return torch.where(mask.reshape(-1, *([1] * (output.dim() - 1))), output, detached)

            return hook

        saved = [(b, b.detach().clone()) for b in model.buffers()]
        handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
        try:
            loss = loss_fn(model(x), y)
            params = [getattr(modules[m], p) for _, m, p in names_params]
            grads = torch.autograd.grad(loss, params)
        finally:
            for handle in handles:
                handle.remove()
            # Running statistics as they were (batch norm's backward needs them untouched until here).
            with torch.no_grad():
                for buf, value in saved:
                    buf.copy_(value)
        for (full, _, _), g in zip(names_params, grads, strict=True):
            result[full].append(g * per_example_scale(batch_size, reduction))
    return {k: torch.stack(v) for k, v in result.items()}


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are constants (its buffers are its own copies)."""
    frozen = copy.deepcopy(module)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def scale_shift_rows(per_example: dict[str, Tensor], name: str) -> Tensor:
    """(N, C, k): per-example (scale, shift) gradient pairs of norm layer ``name`` (k = 1 without shift)."""
    weight = per_example[f"{name}.weight"]
    columns = [weight.reshape(weight.shape[0], -1)]
    bias = per_example.get(f"{name}.bias")
    if bias is not None:
        columns.append(bias.reshape(bias.shape[0], -1))
    return torch.stack(columns, dim=-1)


def norm_factor(rows: Tensor) -> Tensor:
    """Reference F: (C, k, k), ``F_c = 1/N sum_n v_nc v_nc^T`` by explicit accumulation."""
    batch_size, channels, k = rows.shape
    factor = torch.zeros(channels, k, k, dtype=rows.dtype)
    for n in range(batch_size):
        factor += rows[n, :, :, None] * rows[n, :, None, :]
    return factor / batch_size


def norm_dense_curvature(factor: Tensor, damping: float = 0.0) -> Tensor:
    """The block-diagonal (C k, C k) matrix of per-channel F_c in column-stacking order of (C, k)."""
    channels, k = factor.shape[0], factor.shape[-1]
    dense = torch.zeros(k * channels, k * channels, dtype=factor.dtype)
    for c in range(channels):
        for i in range(k):
            for j in range(k):
                dense[i * channels + c, j * channels + c] = factor[c, i, j]
    return dense + damping * torch.eye(k * channels, dtype=factor.dtype)


def norm_gradient_matrix(param_grads: dict[str, Tensor], name: str) -> Tensor:
    """(C, k): the norm layer's scale gradient and (if any) shift gradient as columns."""
    columns = [param_grads[f"{name}.weight"].reshape(-1)]
    if f"{name}.bias" in param_grads:
        columns.append(param_grads[f"{name}.bias"].reshape(-1))
    return torch.stack(columns, dim=-1)


def norm_dense_preconditioned(factor: Tensor, matrix: Tensor, damping: float) -> Tensor:
    """Solve ``(blockdiag(F) + d I) vec(P) = vec(M)`` densely; P in the (C, k) layout."""
    solution = torch.linalg.solve(norm_dense_curvature(factor, damping), vec(matrix))
    return unvec(solution, *matrix.shape)


def embedding_factors(rec: LayerRecord, reduction: str) -> tuple[Tensor, Tensor]:
    """Reference (A, G) of ``nn.Embedding`` on ids (N, *): A dense (V, V) from explicit one-hot
    vectors (all zero for ``padding_idx``), G (d, d) from the recorded output gradients."""
    module = rec.module
    assert isinstance(module, nn.Embedding)
    batch_size = rec.input.shape[0] if rec.input.dim() > 0 else 1
    ids = rec.input.reshape(batch_size, -1)
    onehot = F.one_hot(ids, module.num_embeddings).to(DTYPE)
    if module.padding_idx is not None:
        onehot[ids == module.padding_idx] = 0.0
    g = rec.grad_output.reshape(batch_size, -1, 1, module.embedding_dim)
    g = g * per_example_scale(batch_size, reduction)
    big_a, big_g = _covariances(onehot.unsqueeze(2), g)
    return big_a[0], big_g[0]


def conv_transpose_equivalent(rec: LayerRecord) -> LayerRecord:
    """The recorded transposed convolution as a stride-1 ``nn.ConvNd`` on the stride-dilated,
    padded (or cropped) input, with the flipped, in/out-swapped kernel; same output and gradient.

    The padding on the right is read off the recorded output size, so ``output_padding`` and
    ``output_size`` need not be known here.
    """
    module = rec.module
    assert isinstance(module, nn.modules.conv._ConvTransposeNd)
    ndim = len(module.kernel_size)
    x = rec.input
    batch_size, c_in = x.shape[:2]
    sizes = [(size - 1) * s + 1 for size, s in zip(x.shape[2:], module.stride, strict=True)]
    dilated = torch.zeros(batch_size, c_in, *sizes, dtype=x.dtype)
    for position in itertools.product(*(range(size) for size in x.shape[2:])):
        target = tuple(p * s for p, s in zip(position, module.stride, strict=True))
        dilated[(slice(None), slice(None), *target)] = x[(slice(None), slice(None), *position)]
    for dim in range(ndim):
        span = module.dilation[dim] * (module.kernel_size[dim] - 1)
        left = span - module.padding[dim]
        right = rec.output.shape[2 + dim] + span - left - dilated.shape[2 + dim]
        axis = 2 + dim
        if left < 0:
            dilated = dilated.narrow(axis, -left, dilated.shape[axis] + left)
        if right < 0:
            dilated = dilated.narrow(axis, 0, dilated.shape[axis] + right)
        zeros = list(dilated.shape)
        parts = []
        if left > 0:
            zeros[axis] = left
            parts.append(torch.zeros(zeros, dtype=x.dtype))
        parts.append(dilated)
        if right > 0:
            zeros[axis] = right
            parts.append(torch.zeros(zeros, dtype=x.dtype))
        dilated = torch.cat(parts, dim=axis)
    conv_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    groups, c_out = module.groups, module.out_channels
    conv = conv_type(
        c_in,
        c_out,
        module.kernel_size,
        dilation=module.dilation,
        groups=groups,
        bias=module.bias is not None,
    ).to(DTYPE)
    with torch.no_grad():
        conv.weight.copy_(conv_transpose_equivalent_weight(module.weight.detach(), groups))
        if module.bias is not None:
            conv.bias.copy_(module.bias.detach())
    return LayerRecord(conv, dilated, rec.output, rec.grad_output)


def conv_transpose_equivalent_weight(weight: Tensor, groups: int) -> Tensor:
    """(C_in, C_out/g, k...) -> (C_out, C_in/g, k...): per group, swap in/out and flip the kernel."""
    c_in, c_out_g = weight.shape[:2]
    c_in_g = c_in // groups
    spatial = tuple(range(2, weight.dim()))
    out = torch.zeros(c_out_g * groups, c_in_g, *weight.shape[2:], dtype=weight.dtype)
    for j in range(groups):
        block = weight[j * c_in_g : (j + 1) * c_in_g]  # (C_in/g, C_out/g, k...)
        out[j * c_out_g : (j + 1) * c_out_g] = block.transpose(0, 1).flip(spatial)
    return out


def library_step(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    reduction: str,
    damping: float,
    enable_pi_correction: bool,
    **options,
) -> tuple[dict[str, Tensor], KFACPreconditioner]:
    """Run ``KFACPreconditioner.step`` once; the preconditioned gradients by qualified parameter
    name and the preconditioner (for its blocks, whatever their factors)."""
    pre = KFACPreconditioner(
        model,
        damping=damping,
        reduction=reduction,
        enable_pi_correction=enable_pi_correction,
        **options,
    )
    loss_fn(model(x), y).backward()
    pre.step()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return grads, pre


def library_blocks(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, reduction: str, **options):
    """``torch_kfac.KFAC``'s blocks after one forward/backward and one ``update_cov``."""
    opt = KFAC(model, lr=0.1, damping=1e-3, momentum=0.0, reduction=reduction, **options)
    loss_fn(model(x), y).backward()
    opt.update_cov()
    return opt.blocks


# ---------------------------------------------------------------------------------------
# The identity-preconditioner baseline of the "K-FAC trains" tests
# ---------------------------------------------------------------------------------------


class IdentityPreconditioned(torch.optim.Optimizer):
    """K-FAC's update rule with the curvature replaced by the identity: momentum SGD.

    v <- mu v + c g and theta <- theta - lr v, with K-FAC's norm constraint c = min(1, sqrt(C /
    (lr^2 g^T g))) when `norm_constraint` is given (c = 1 otherwise: torch's SGD with momentum).
    A test that claims K-FAC trains must beat this run, from the same start with the same lr and
    momentum, by a clear margin: with every preconditioner replaced by the identity it cannot.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, norm_constraint: float | None = None):
        super().__init__(params, {"lr": lr, "momentum": momentum, "norm_constraint": norm_constraint})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr, mu, bound = group["lr"], group["momentum"], group["norm_constraint"]
            coeff = 1.0
            if bound is not None and params:
                sq_norm = lr**2 * sum(p.grad.double().square().sum() for p in params)
                coeff = min(1.0, math.sqrt(bound / sq_norm)) if sq_norm > 0 else 1.0
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = coeff * p.grad.clone()
                else:
                    state["velocity"].mul_(mu).add_(p.grad, alpha=coeff)
                p.add_(state["velocity"], alpha=-lr)


def identity_preconditioned_loss(
    model: nn.Module,
    loss_of: Callable[[nn.Module], Tensor],
    steps: int,
    lr: float,
    momentum: float = 0.0,
    norm_constraint: float | None = None,
) -> float:
    """The loss at the last of `steps` full-batch `IdentityPreconditioned` steps (trains `model`)."""
    opt = IdentityPreconditioned(model.parameters(), lr, momentum, norm_constraint)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        opt.step()
    return loss.item()
