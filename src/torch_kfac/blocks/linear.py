"""Curvature block for `nn.Linear` (any number of leading dimensions)."""

from __future__ import annotations

from torch import Tensor

from torch_kfac.blocks.base import KroneckerBlock


class LinearBlock(KroneckerBlock):
    """K-FAC block of `nn.Linear`; inputs (N, *, d_in) share the weight over the middle dims."""

    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """N = dim 0 of the input; 1 for an unbatched vector."""
        x = inputs[0]
        return int(x.shape[0]) if x.dim() > 1 else 1

    def activation_rows(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """Inputs as (1, N, T, d_in), T the product of the middle dimensions."""
        x = inputs[0]
        if x.dim() == 1:  # unbatched input
            x = x.unsqueeze(0)
        return x.reshape(1, x.shape[0], -1, x.shape[-1])

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Output gradients as (1, N, T, d_out)."""
        g = grad_output if grad_output.dim() > 1 else grad_output.unsqueeze(0)
        return g.reshape(1, g.shape[0], -1, g.shape[-1])
