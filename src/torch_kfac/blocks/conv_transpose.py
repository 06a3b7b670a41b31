"""Curvature block for `nn.ConvTranspose1d/2d/3d`, through the convolution it is equivalent to.

A transposed convolution with stride s, padding p, output padding o, dilation d and kernel size k
equals, per spatial dim, a stride-1 convolution with dilation d of

* the input dilated by the stride (s - 1 zeros between neighbouring elements),
* padded by d (k - 1) - p zeros on the left and d (k - 1) - p + o on the right (cropped where
  negative),

with the spatially flipped kernel whose input and output channels are swapped within each group:
W'[j C_out/g + o, i, kappa] = W[j C_in/g + i, o, k - 1 - kappa]. The block is the Kronecker block
of that convolution: A from the patches of the dilated, padded input, G from the output gradients,
and `to_matrix` maps the (C_in, C_out/g, k...) weight to W' as (g, C_out/g, C_in/g prod(k) [+1]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac.blocks.base import KroneckerBlock


def output_padding_of(module: nn.modules.conv._ConvTransposeNd, x: Tensor, output_size: object) -> list[int]:
    """The output padding of one call: the module's own, or what `output_size` (if given) implies."""
    spatial = len(module.kernel_size)
    if output_size is None:
        return [int(o) for o in module.output_padding]
    sizes = [int(s) for s in output_size][-spatial:]  # type: ignore[attr-defined]
    pads = []
    for dim in range(spatial):
        length = x.shape[x.dim() - spatial + dim]
        smallest = (
            (length - 1) * module.stride[dim]
            - 2 * int(module.padding[dim])  # type: ignore[index]
            + module.dilation[dim] * (module.kernel_size[dim] - 1)
            + 1
        )
        pads.append(sizes[dim] - smallest)
    return pads


def equivalent_conv_input(
    x: Tensor, module: nn.modules.conv._ConvTransposeNd, output_padding: Sequence[int]
) -> Tensor:
    """The input (N, C_in, ...) dilated by the stride and padded so that a stride-1 conv gives the output."""
    spatial = len(module.kernel_size)
    n, channels = x.shape[:2]
    if any(s > 1 for s in module.stride):
        sizes = [(size - 1) * s + 1 for size, s in zip(x.shape[2:], module.stride, strict=True)]
        dilated = x.new_zeros(n, channels, *sizes)
        dilated[(slice(None), slice(None), *(slice(None, None, s) for s in module.stride))] = x
        x = dilated
    pads: list[int] = []
    for dim in reversed(range(spatial)):
        left = module.dilation[dim] * (module.kernel_size[dim] - 1) - int(module.padding[dim])  # type: ignore[index]
        pads += [left, left + int(output_padding[dim])]
    # Negative amounts crop: padding beyond d (k - 1) removes border outputs of the transposed conv.
    return F.pad(x, pads) if any(pads) else x


def transposed_conv_patches(
    x: Tensor, module: nn.modules.conv._ConvTransposeNd, output_padding: Sequence[int]
) -> Tensor:
    """Patches of the equivalent convolution, (groups, N, output positions, C_in/groups * prod(k))."""
    x = equivalent_conv_input(x, module, output_padding)
    n, channels = x.shape[:2]
    spatial = len(module.kernel_size)
    for dim in range(spatial):
        span = module.dilation[dim] * (module.kernel_size[dim] - 1) + 1
        # A stride-1 window of `span` elements, keeping every dilation-th one.
        x = x.unfold(2 + dim, span, 1)[..., :: module.dilation[dim]]
    out_shape = x.shape[2 : 2 + spatial]
    groups = module.groups
    x = x.reshape(n, groups, channels // groups, *out_shape, *module.kernel_size)
    perm = [1, 0, *range(3, 3 + spatial), 2, *range(3 + spatial, 3 + 2 * spatial)]
    return x.permute(perm).reshape(groups, n, math.prod(out_shape), -1)


class ConvTransposeBlock(KroneckerBlock):
    """K-FAC block of `nn.ConvTranspose1d/2d/3d`: output locations share the (equivalent) kernel.

    An `output_size` argument is honoured when passed positionally (`module(x, output_size)`); one
    passed by keyword is invisible to forward hooks, and the mismatch is reported when the output
    gradient arrives.
    """

    module: nn.modules.conv._ConvTransposeNd

    def __init__(self, module: nn.Module, name: str = "") -> None:
        super().__init__(module, name)
        #: Output spatial shapes that the recorded input statistics assumed (since the last fold).
        self._expected_shapes: set[tuple[int, ...]] = set()

    def _unbatched(self, x: Tensor) -> bool:
        return x.dim() == len(self.module.kernel_size) + 1

    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """N = dim 0 of the input; 1 for an unbatched input."""
        x = inputs[0]
        return 1 if self._unbatched(x) else int(x.shape[0])

    def activation_rows(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """Patches of the equivalent convolution, (groups, N, locations, C_in/groups * prod(kernel))."""
        x = inputs[0]
        output_padding = output_padding_of(self.module, x, inputs[1] if len(inputs) > 1 else None)
        if self._unbatched(x):
            x = x.unsqueeze(0)
        patches = transposed_conv_patches(x, self.module, output_padding)
        m = self.module
        self._expected_shapes.add(
            tuple(
                (size - 1) * m.stride[d]
                - 2 * int(m.padding[d])  # type: ignore[index]
                + m.dilation[d] * (m.kernel_size[d] - 1)
                + output_padding[d]
                + 1
                for d, size in enumerate(x.shape[2:])
            )
        )
        return patches

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Output gradients as (groups, N, locations, C_out/groups)."""
        g = grad_output
        if self._unbatched(g):
            g = g.unsqueeze(0)
        if self._expected_shapes and tuple(g.shape[2:]) not in self._expected_shapes:
            raise ValueError(
                f"K-FAC ConvTransposeBlock {self.name!r}: output of spatial size {tuple(g.shape[2:])}, but "
                f"the input statistics assumed {sorted(self._expected_shapes)}; pass output_size "
                "positionally (module(x, output_size)) so that the forward hook sees it"
            )
        n, c = g.shape[:2]
        g = g.reshape(n, self.groups, c // self.groups, -1)  # (N, groups, C_out/g, locations)
        return g.permute(1, 0, 3, 2)

    def fold_pending(self, decay: float, taken: Tensor | None = None) -> None:
        """Fold the pending statistics and forget the output shapes they assumed."""
        super().fold_pending(decay, taken)
        self._expected_shapes.clear()

    def clear_pending(self, keys: tuple[str, ...] | None = None) -> None:
        """Drop pending statistics (and, with the input statistics, the output shapes they assumed)."""
        super().clear_pending(keys)
        if keys is None or "A" in keys:
            self._expected_shapes.clear()

    # ------------------------------------------------------------------------- layout
    def _spatial_dims(self) -> tuple[int, ...]:
        return tuple(range(3, 3 + len(self.module.kernel_size)))

    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """(C_in, C_out/g, k...) -> the equivalent conv's (g, C_out/g, C_in/g * prod(k) [+1])."""
        groups = self.groups
        c_in, c_out_g = weight_like.shape[:2]
        kernel = weight_like.shape[2:]
        w = weight_like.reshape(groups, c_in // groups, c_out_g, *kernel)
        # Flip the kernel and swap input/output channels within each group.
        mat = w.flip(self._spatial_dims()).transpose(1, 2).reshape(groups, c_out_g, -1)
        if bias_like is not None:
            mat = torch.cat([mat, bias_like.reshape(groups, c_out_g, 1)], dim=-1)
        return mat

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of `to_matrix`: the transposed convolution's weight-shaped and bias-shaped parts."""
        groups = self.groups
        c_in, c_out_g = self.weight.shape[:2]
        kernel = self.weight.shape[2:]
        w = mat[..., :-1] if self.bias is not None else mat
        w = w.reshape(groups, c_out_g, c_in // groups, *kernel).transpose(1, 2).flip(self._spatial_dims())
        bias = mat[..., -1].reshape(self.bias.shape) if self.bias is not None else None
        return w.reshape(self.weight.shape), bias

    def extra_repr(self) -> str:
        """Factor shapes and memory, for the registration report."""
        c_in, c_out_g = self.weight.shape[:2]
        d_in = c_in // self.groups * math.prod(self.weight.shape[2:]) + (self.bias is not None)
        numel = self.groups * (d_in * d_in + c_out_g * c_out_g)
        size = numel * self.weight.element_size()
        grp = f" x {self.groups} groups" if self.groups > 1 else ""
        return f"A {d_in}x{d_in}, G {c_out_g}x{c_out_g}{grp}, {size / 2**20:.2f} MiB per factor set"
