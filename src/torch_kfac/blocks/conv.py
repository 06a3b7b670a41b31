"""Curvature block for `nn.Conv1d/2d/3d` (Grosse & Martens, 2016).

Patches are extracted from the input padded exactly as the convolution pads it (integer, 'same'
with torch's asymmetric split, 'valid', and every `padding_mode`), honouring stride, dilation and
groups. The block is block-diagonal over groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac.blocks.base import KroneckerBlock, centered, input_second_moment


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


def patch_view(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """The input padded as `conv` pads it, unfolded into its patches: (N, C, O_1..O_s, K_1..K_s).

    A view of the padded input (the patches overlap; nothing is copied but the padding).
    """
    pads = conv_padding(conv)
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    for dim in range(len(conv.kernel_size)):
        span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        # unfold appends a window axis of length `span`; keep every dilation-th element.
        x = x.unfold(2 + dim, span, conv.stride[dim])[..., :: conv.dilation[dim]]
    return x


def extract_patches(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """Input patches of a convolution, shape (groups, N, positions, C_in/groups * prod(kernel))."""
    n, channels = x.shape[:2]
    x = patch_view(x, conv)
    spatial = len(conv.kernel_size)
    # x: (N, C, O_1..O_s, K_1..K_s) -> (groups, N, O_1*..*O_s, C/groups * K_1*..*K_s)
    out_shape = x.shape[2 : 2 + spatial]
    groups = conv.groups
    x = x.reshape(n, groups, channels // groups, *out_shape, *conv.kernel_size)
    perm = [1, 0, *range(3, 3 + spatial), 2, *range(3 + spatial, 3 + 2 * spatial)]
    x = x.permute(perm)
    return x.reshape(groups, n, math.prod(out_shape), -1)


def patch_count(view: Tensor) -> int:
    """The patches of a `patch_view`: examples times output positions."""
    spatial = (view.dim() - 2) // 2
    return view.shape[0] * math.prod(view.shape[2 : 2 + spatial])


def sample_patches(view: Tensor, groups: int, count: int, generator: torch.Generator) -> Tensor:
    """`count` patches of a `patch_view`, drawn uniformly with replacement over examples x positions.

    Returns (groups, count, C_in/groups * prod(kernel)), the layout of `extract_patches` with the
    drawn patches as rows.
    """
    spatial = (view.dim() - 2) // 2
    out_shape = view.shape[2 : 2 + spatial]
    flat = torch.randint(patch_count(view), (count,), generator=generator, device=generator.device)
    flat = flat.to(view.device)
    index: list[Tensor] = []
    for size in reversed(out_shape):  # unravel the flat (example, O_1, .., O_s) index
        index.append(flat % size)
        flat = flat // size
    # Advanced indices around a slice: the drawn patches come first, (count, C, K_1..K_s).
    picked = view[(flat, slice(None), *reversed(index))]
    return picked.reshape(count, groups, -1).transpose(0, 1)


class ConvBlock(KroneckerBlock):
    """K-FAC block of `nn.Conv1d/2d/3d`: output locations share the kernel."""

    module: nn.modules.conv._ConvNd

    #: Option `patches_per_dim`: A from at most this many drawn patches per row (None: all).
    patches_per_dim: float | None = None
    _patch_generator: torch.Generator | None = None
    #: The seed of the next draw (`seed_patches`), applied at that draw when `_reseed` is set.
    _patch_seed: int = 0
    _reseed: bool = True

    def seed_patches(self, seed: int) -> None:
        """Draw the next patches from the block's generator seeded with `seed` (later draws continue
        its stream)."""
        self._patch_seed, self._reseed = seed, True

    def _batched(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """The call's input with its batch dimension (an unbatched input gets one of size 1)."""
        x = inputs[0]
        return x.unsqueeze(0) if x.dim() == len(self.module.kernel_size) + 1 else x

    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """N = dim 0 of the input; 1 for an unbatched input."""
        return int(self._batched(inputs).shape[0])

    def activation_rows(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """Patches as (groups, N, locations, C_in/groups * prod(kernel))."""
        return extract_patches(self._batched(inputs), self.module)

    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """The call's A statistic; from `patches_per_dim * d` drawn patches where that is fewer than all."""
        if (
            self.patches_per_dim is None
            or self.kfac_approx != "expand"
            or self.approximation not in ("kfac", "forward-only")  # EKFAC, the diagonal: joint rows
        ):
            super().record_inputs(inputs, center)
            return
        x = self._batched(inputs).detach()
        view = patch_view(x, self.module)
        groups = self.module.groups
        dim = view.shape[1] // groups * math.prod(self.module.kernel_size) + (self.bias is not None)
        count = math.ceil(self.patches_per_dim * dim)
        if count >= patch_count(view):
            super().record_inputs(inputs, center)  # no fewer than all patches: the exact average
            return
        generator = self._patch_generator
        if generator is None or generator.device.type != x.device.type:
            # Its own stream: the user's random draws are untouched.
            generator = self._patch_generator = torch.Generator(device=x.device)
            self._reseed = True
        if self._reseed:
            generator.manual_seed(self._patch_seed)
            self._reseed = False
        rows = sample_patches(view, groups, count, generator)
        if center:
            rows = centered(rows)
        self.batch_size = x.shape[0]
        self.add_forward_statistic("A", input_second_moment(rows, self.bias is not None), x.shape[0])

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Output gradients as (groups, N, locations, C_out/groups)."""
        g = grad_output
        if g.dim() == len(self.module.kernel_size) + 1:
            g = g.unsqueeze(0)
        n, c = g.shape[:2]
        groups = self.groups
        g = g.reshape(n, groups, c // groups, -1)  # (N, groups, C_out/g, locations)
        return g.permute(1, 0, 3, 2)
