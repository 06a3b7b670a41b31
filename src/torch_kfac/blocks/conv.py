"""Curvature block for `nn.Conv1d/2d/3d` (Grosse & Martens, 2016).

Patches are extracted from the input padded exactly as the convolution pads it (integer, 'same'
with torch's asymmetric split, 'valid', and every `padding_mode`), honouring stride, dilation and
groups. The block is block-diagonal over groups.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac.blocks.base import KroneckerBlock


def conv_padding(conv: nn.modules.conv._ConvNd) -> list[int]:
    """The (left, right) padding per spatial dim, last dim first, in F.pad's order."""
    pads: list[int] = []
    for dim in reversed(range(len(conv.kernel_size))):
        if conv.padding == "valid":
            left = right = 0
        elif conv.padding == "same":
            total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = int(conv.padding[dim])  # type: ignore[index]
        pads += [left, right]
    return pads


def extract_patches(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """Input patches of a convolution, shape (groups, N, positions, C_in/groups * prod(kernel))."""
    pads = conv_padding(conv)
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    n, channels = x.shape[:2]
    spatial = len(conv.kernel_size)
    for dim in range(spatial):
        span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        # unfold appends a window axis of length `span`; keep every dilation-th element.
        x = x.unfold(2 + dim, span, conv.stride[dim])[..., :: conv.dilation[dim]]
    # x: (N, C, O_1..O_s, K_1..K_s) -> (groups, N, O_1*..*O_s, C/groups * K_1*..*K_s)
    out_shape = x.shape[2 : 2 + spatial]
    groups = conv.groups
    x = x.reshape(n, groups, channels // groups, *out_shape, *conv.kernel_size)
    perm = [1, 0, *range(3, 3 + spatial), 2, *range(3 + spatial, 3 + 2 * spatial)]
    x = x.permute(perm)
    return x.reshape(groups, n, math.prod(out_shape), -1)


class ConvBlock(KroneckerBlock):
    """K-FAC block of `nn.Conv1d/2d/3d`: output locations share the kernel."""

    module: nn.modules.conv._ConvNd

    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """N = dim 0 of the input; 1 for an unbatched input."""
        x = inputs[0]
        return int(x.shape[0]) if x.dim() > len(self.module.kernel_size) + 1 else 1

    def activation_rows(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """Patches as (groups, N, locations, C_in/groups * prod(kernel))."""
        x = inputs[0]
        if x.dim() == len(self.module.kernel_size) + 1:  # unbatched input
            x = x.unsqueeze(0)
        return extract_patches(x, self.module)

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Output gradients as (groups, N, locations, C_out/groups)."""
        g = grad_output
        if g.dim() == len(self.module.kernel_size) + 1:
            g = g.unsqueeze(0)
        n, c = g.shape[:2]
        groups = self.groups
        g = g.reshape(n, groups, c // groups, -1)  # (N, groups, C_out/g, locations)
        return g.permute(1, 0, 3, 2)
