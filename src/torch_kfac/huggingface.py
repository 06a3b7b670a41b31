"""Curvature blocks for Hugging Face `transformers` layers (optional: transformers is imported lazily).

GPT-2 and its relatives build their attention and MLP projections from
`transformers.pytorch_utils.Conv1D`: a Linear layer whose weight is stored transposed, shape
(d_in, d_out), with y = x W + b. Its Fisher block is the Linear layer's A (x) G on the transpose;
`register_transformers_blocks()` gives every `Conv1D` that block. `nn.Linear`, `nn.Embedding`
and `nn.LayerNorm` (and an output head tied to the token embedding) have blocks already.

    from torch_kfac.huggingface import register_transformers_blocks
    register_transformers_blocks()  # before building KFAC / KFACPreconditioner
"""

from __future__ import annotations

from torch import Tensor

from torch_kfac.blocks import LinearBlock, register_block


class Conv1DBlock(LinearBlock):
    """K-FAC block of `transformers`' `Conv1D`: `LinearBlock` with the weight read as W^T (d_out, d_in)."""

    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """[W^T, b] as a (1, d_out, d_in [+1]) matrix from (d_in, d_out)- and (d_out,)-shaped tensors."""
        return super().to_matrix(weight_like.mT, bias_like)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """The (d_in, d_out) weight part and the bias part of a (1, d_out, d_in [+1]) matrix."""
        d_in = self.weight.shape[0]
        return mat[0, :, :d_in].mT, mat[0, :, d_in] if self.bias is not None else None

    def extra_repr(self) -> str:
        """Factor shapes, for the registration report."""
        d_in, d_out = self.weight.shape
        d_in += self.bias is not None
        size = (d_in * d_in + d_out * d_out) * self.weight.element_size()
        return f"A {d_in}x{d_in}, G {d_out}x{d_out}, {size / 2**20:.2f} MiB per factor set"


def register_transformers_blocks() -> None:
    """Register `Conv1DBlock` for `transformers.pytorch_utils.Conv1D` (needs `transformers`)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "register_transformers_blocks needs the transformers package: pip install 'torch-kfac[hf]'"
        ) from err
    register_block(Conv1D, Conv1DBlock)
