"""Curvature blocks for normalization layers with an affine scale and shift.

A normalization layer computes y = gamma * xhat + beta with xhat the normalized input. Scale gamma_c
and shift beta_c of one channel (BatchNorm, InstanceNorm, GroupNorm) or of one normalized element
(LayerNorm, RMSNorm) act on the positions that share them, so the per-example gradients are

    dl_n/dgamma_c = sum_{positions} g * xhat,    dl_n/dbeta_c = sum_{positions} g,

with g the per-example gradient of the loss with respect to the layer's output. The block keeps,
for each c, the exact 2x2 second moment F_c = E_n[v_n v_n^T] of v_n = (dl_n/dgamma_c, dl_n/dbeta_c)
(1x1 without a shift): the exact empirical Fisher of the layer's parameters with the couplings
between channels dropped. Preconditioning solves (F_c + damping I) x_c = m_c for every channel.
A module called several times in one forward pass gets the exact per-example gradient of its
shared parameters, the sum of the calls' v_n, before the second moment is taken.

xhat is recomputed in the forward hook from the module's input exactly as the module normalizes it
(batch statistics for batch norm in training mode, running statistics in eval mode, x / rms for
RMSNorm), kept on the block until the output gradient of that call arrives, and then dropped.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac.blocks.base import Factor, WeightBiasBlock, pooled, second_moment_scale
from torch_kfac.linalg import damped_inverse, symmetric_eigh


class NormBlock(WeightBiasBlock):
    """Exact per-channel (scale, shift) Fisher of a normalization layer, block-diagonal over channels.

    Subclasses say how the module normalizes (`normalize`) and which output positions share a
    parameter element (`parameter_sums`). The gradient layout (`to_matrix`) is (C, 2): column 0
    the scale, column 1 the shift (C, 1 without a shift).
    """

    FACTORS = ("F",)
    #: The statistic needs the output gradient, so nothing is a forward factor; the forward pass
    #: only caches the normalized input for the backward pass of the same call.
    FORWARD_FACTORS = ()

    def __init__(self, module: nn.Module, name: str = "") -> None:
        if not isinstance(getattr(module, "weight", None), Tensor):
            raise TypeError(f"{type(module).__name__} {name!r} has no affine scale (weight) for K-FAC")
        super().__init__(module, name)
        self.configure()
        #: Normalized inputs of the calls recorded since the last fold, in call order.
        self._normalized: list[Tensor] = []
        #: Index after the next cached call that an output gradient pairs with (counts down).
        self._cursor = 0
        #: Whether a backward pass has used every cached call (a new forward pass then replaces them).
        self._consumed = False

    # ----------------------------------------------------------------- layer-specific hooks
    def batched(self, x: Tensor) -> Tensor:
        """The input or output with a leading batch dimension (added for an unbatched tensor)."""
        return x

    @abstractmethod
    def normalize(self, x: Tensor) -> Tensor:
        """xhat of a batched input, computed as the module computes it (without scale and shift)."""

    @abstractmethod
    def parameter_sums(self, t: Tensor) -> Tensor:
        """Sum an output-shaped batched tensor over the positions sharing each parameter: (N, C)."""

    # -------------------------------------------------------------------- statistics
    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """N = dim 0 of the batched input."""
        return int(self.batched(inputs[0]).shape[0])

    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """Cache the normalized input of this call for the statistic of its backward pass."""
        x = self.batched(inputs[0].detach())
        self.batch_size = int(x.shape[0])
        if self._consumed:
            # The previous forward pass has had its backward pass: its inputs are no longer needed.
            self._normalized = []
            self._consumed = False
        with torch.no_grad():
            self._normalized.append(self.normalize(x))
        self._cursor = len(self._normalized)

    def record_output_grad(self, grad_output: Tensor, reduction: str, center: bool = False) -> None:
        """Pend one call's per-example (scale, shift) gradients v_n for F = 1/N sum_n v_n v_n^T.

        Output gradients pair with the cached calls in reverse call order (backward visits the
        latest call first); a further backward pass through the same forward pass (several
        sampled labels, Fisher columns) starts again from the latest call.
        """
        if not self._normalized:
            return  # statistics folded or discarded between this call's forward and backward
        if self._cursor == 0:
            self._cursor = len(self._normalized)
        self._cursor -= 1
        self._consumed = self._cursor == 0
        xhat = self._normalized[self._cursor]
        g = self.batched(grad_output.detach())
        if g.shape != xhat.shape:
            raise RuntimeError(
                f"K-FAC {type(self).__name__} {self.name!r}: an output gradient of shape {tuple(g.shape)} "
                f"does not match the recorded call's normalized input {tuple(xhat.shape)}"
            )
        # Per-example gradients v_n (up to the reduction's scale): scale sum(g xhat), shift sum(g).
        columns = [self.parameter_sums(g * xhat)]
        if self.bias is not None:
            columns.append(self.parameter_sums(g))
        v = torch.stack(columns, dim=-1)  # (N, C, k)
        if center:
            v = v - v.mean(dim=0, keepdim=True)
        # F = s sum_n v_n v_n^T = sum_n (sqrt(s) v_n)(sqrt(s) v_n)^T. The rows, not their moments,
        # are pending: the calls of one backward pass add up to the shared parameters' per-example
        # gradients, and `pending` takes the second moments.
        scale = second_moment_scale(reduction, int(g.shape[0]), self.loss_terms)
        self.add_backward_statistic("F", v * math.sqrt(scale), int(g.shape[0]))

    def pending(self, key: str) -> Tensor:
        """The pending F: per-channel second moments of each backward pass's rows, pooled over passes."""
        return pooled(
            [replace(s, value=torch.einsum("nci,ncj->cij", s.value, s.value)) for s in self._pending[key]]
        )

    def clear_pending(self, keys: tuple[str, ...] | None = None) -> None:
        """Drop pending statistics; clearing the forward factors (a new forward pass) drops the cache."""
        super().clear_pending(keys)
        # `track_forward()` clears FORWARD_FACTORS (none here) as a new forward pass starts, and
        # `discard_statistics()` clears everything: in both cases the cached inputs are stale.
        if keys is None or all(k in self.FORWARD_FACTORS for k in keys):
            self._drop_cache()

    def fold_pending(self, decay: float, taken: Tensor | None = None) -> None:
        """Fold the pending statistics into the running average and drop the cached inputs."""
        super().fold_pending(decay, taken)
        self._drop_cache()

    def _drop_cache(self) -> None:
        self._normalized = []
        self._cursor = 0
        self._consumed = False

    # ----------------------------------------------------------------------- factors
    F = Factor("Per-channel second moments of the per-example (scale, shift) gradients, (C, k, k).")

    # ---------------------------------------------------------------- preconditioning
    def configure(
        self, approximation: str = "kfac", power: float = -1.0, kfac_approx: str = "expand"
    ) -> None:
        """Set the matrix power (-1: natural gradient, -1/2: square root) of the preconditioner.

        `approximation` and `kfac_approx` choose among approximations of Kronecker blocks; this
        block is exact per channel (positions are summed into exact per-example gradients), so
        they leave it unchanged.
        """
        self.power = float(power)

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Refresh (F_c + damping I)^-1 ('cholesky') or the eigendecompositions of F_c ('eigh').

        There is a single factor, so factored and exact damping coincide and pi does not apply.
        A power other than -1 always goes through the eigendecompositions.
        """
        f = self._factor("F")
        self.drop_state(("F_inv", "F_eigvals", "F_eigvecs"))
        if method == "cholesky" and self.power == -1.0:
            self.state["F_inv"] = damped_inverse(f, damping)
        else:
            self.state["F_eigvals"], self.state["F_eigvecs"] = symmetric_eigh(f)

    def has_inverses(self) -> bool:
        """Whether cached inverses or eigendecompositions are available."""
        return "F_inv" in self.state or "F_eigvecs" in self.state

    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """(F_c + damping I)^power m_c for every channel c of a (C, k) gradient."""
        col = mat.unsqueeze(-1)
        if "F_inv" in self.state:
            return (self.state["F_inv"] @ col).squeeze(-1)
        q, lam = self.state["F_eigvecs"], self.state["F_eigvals"]
        rotated = (q.mT @ col).squeeze(-1) * (lam + damping).pow(self.power)
        return (q @ rotated.unsqueeze(-1)).squeeze(-1)

    def curvature_product(self, mat: Tensor) -> Tensor:
        """F_c m_c for every channel, undamped."""
        return (self._factor("F") @ mat.unsqueeze(-1)).squeeze(-1)

    def dense_curvature(self, damping: float = 0.0) -> Tensor:
        """The block as a dense (C k, C k) matrix over vec of the (C, k) layout (column stacking).

        Entry (i C + c, j C + c) is F_c[i, j]: scales first, then shifts, channels in order.
        """
        f = self.F
        channels, k = f.shape[0], f.shape[-1]
        dense = f.new_zeros(k * channels, k * channels)
        for i in range(k):
            for j in range(k):
                dense[i * channels : (i + 1) * channels, j * channels : (j + 1) * channels] = torch.diag(
                    f[:, i, j]
                )
        return dense + damping * torch.eye(k * channels, dtype=f.dtype, device=f.device)

    # ------------------------------------------------------------------------- layout
    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """Scale- and shift-shaped tensors stacked as (C, 2) (C, 1 without a shift)."""
        columns = [weight_like.reshape(-1)]
        if self.bias is not None:
            columns.append(bias_like.reshape(-1) if bias_like is not None else torch.zeros_like(columns[0]))
        return torch.stack(columns, dim=-1)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of `to_matrix`: the scale-shaped and shift-shaped columns."""
        weight = mat[..., 0].reshape(self.weight.shape)
        if self.bias is None:
            return weight, None
        return weight, mat[..., 1].reshape(self.bias.shape)

    def extra_repr(self) -> str:
        """Factor shapes and memory, for the registration report."""
        channels = self.weight.numel()
        k = 1 + (self.bias is not None)
        size = channels * k * k * self.weight.element_size()
        return f"F {channels} x {k}x{k} (scale{', shift' if k == 2 else ''}), {size / 2**20:.2f} MiB"


class ChannelNormBlock(NormBlock):
    """A norm with one (scale, shift) per channel of an (N, C, *) input: positions are the spatial dims."""

    def parameter_sums(self, t: Tensor) -> Tensor:
        """Sum over the spatial dims: (N, C, *) -> (N, C)."""
        return t.flatten(2).sum(-1) if t.dim() > 2 else t


class BatchNormBlock(ChannelNormBlock):
    """`nn.BatchNorm1d/2d/3d`: batch statistics in training mode (or without running stats), else running."""

    module: nn.modules.batchnorm._BatchNorm

    def normalize(self, x: Tensor) -> Tensor:
        """F.batch_norm without affine, using the statistics the module's forward used."""
        m = self.module
        if m.training or (m.running_mean is None and m.running_var is None):
            # The batch's own statistics; no running buffers passed, so none is updated again.
            return F.batch_norm(x, None, None, training=True, eps=m.eps)
        return F.batch_norm(x, m.running_mean, m.running_var, training=False, eps=m.eps)


class InstanceNormBlock(ChannelNormBlock):
    """`nn.InstanceNorm1d/2d/3d` with `affine=True`: per-example statistics (running ones in eval)."""

    module: nn.modules.instancenorm._InstanceNorm

    def batched(self, x: Tensor) -> Tensor:
        """Add the batch dimension of an unbatched (C, *) input."""
        return x.unsqueeze(0) if x.dim() == self.module._get_no_batch_dim() else x

    def normalize(self, x: Tensor) -> Tensor:
        """F.instance_norm without affine, using the statistics the module's forward used."""
        m = self.module
        if m.training or not m.track_running_stats:
            return F.instance_norm(x, None, None, use_input_stats=True, eps=m.eps)
        return F.instance_norm(x, m.running_mean, m.running_var, use_input_stats=False, eps=m.eps)


class GroupNormBlock(ChannelNormBlock):
    """`nn.GroupNorm`: statistics per example and group of channels, scale and shift per channel."""

    module: nn.GroupNorm

    def normalize(self, x: Tensor) -> Tensor:
        """F.group_norm without affine."""
        return F.group_norm(x, self.module.num_groups, None, None, self.module.eps)


class LastDimsNormBlock(NormBlock):
    """A norm over the trailing `normalized_shape` dims of (N, *, *normalized_shape): one (scale, shift)
    per normalized element, shared by the positions in the middle dims."""

    def batched(self, x: Tensor) -> Tensor:
        """Add the batch dimension of an input that is just one normalized_shape tensor."""
        return x.unsqueeze(0) if x.dim() == len(self.module.normalized_shape) else x

    def parameter_sums(self, t: Tensor) -> Tensor:
        """Sum over the middle dims: (N, *, *normalized_shape) -> (N, prod(normalized_shape))."""
        elements = math.prod(self.module.normalized_shape)
        return t.reshape(t.shape[0], -1, elements).sum(1)


class LayerNormBlock(LastDimsNormBlock):
    """`nn.LayerNorm` with `elementwise_affine=True` (with or without bias)."""

    module: nn.LayerNorm

    def normalize(self, x: Tensor) -> Tensor:
        """F.layer_norm without affine."""
        return F.layer_norm(x, self.module.normalized_shape, None, None, self.module.eps)


class RMSNormBlock(LastDimsNormBlock):
    """`nn.RMSNorm` (scale only): xhat = x / rms(x)."""

    def normalize(self, x: Tensor) -> Tensor:
        """F.rms_norm without a scale (eps None: torch's default for the dtype, as the module)."""
        m = self.module
        return F.rms_norm(x, list(m.normalized_shape), None, m.eps)
