"""Curvature blocks and the registry that maps module types to them.

`register_block(MyModule, MyBlock)` is the extension point for a layer type of your own: subclass
`KroneckerBlock` (or `CurvatureBlock` for curvature of another shape), say how the module's inputs
and output gradients become rows, register it, and every optimizer built afterwards gives such
modules a curvature block.

Map: `base` (the protocols `CurvatureBlock`, `WeightBiasBlock`, `KroneckerBlock` and shared
helpers); `approximation` (the protocol of a Kronecker block's approximation) with one module per
approximation (`kronecker`, `ekfac`, `diagonal`, `forward_only`); one module per layer family
(`linear`, `conv`, `conv_transpose`, `embedding`, `norm`, `attention`, `rnn`); `tied` (a weight
shared by two modules) and `switched` (blocks that re-run their module's forward).
"""

from __future__ import annotations

from torch import nn

from torch_kfac.blocks.approximation import Approximation
from torch_kfac.blocks.attention import MultiheadAttentionBlock
from torch_kfac.blocks.base import CurvatureBlock, KroneckerBlock, WeightBiasBlock
from torch_kfac.blocks.conv import ConvBlock
from torch_kfac.blocks.conv_transpose import ConvTransposeBlock
from torch_kfac.blocks.embedding import EmbeddingBlock
from torch_kfac.blocks.linear import LinearBlock
from torch_kfac.blocks.norm import (
    BatchNormBlock,
    GroupNormBlock,
    InstanceNormBlock,
    LayerNormBlock,
    NormBlock,
    RMSNormBlock,
)
from torch_kfac.blocks.rnn import RNNBlock

_REGISTRY: dict[type[nn.Module], type[CurvatureBlock]] = {
    nn.Linear: LinearBlock,
    nn.Conv1d: ConvBlock,
    nn.Conv2d: ConvBlock,
    nn.Conv3d: ConvBlock,
    nn.ConvTranspose1d: ConvTransposeBlock,
    nn.ConvTranspose2d: ConvTransposeBlock,
    nn.ConvTranspose3d: ConvTransposeBlock,
    nn.Embedding: EmbeddingBlock,
    nn.BatchNorm1d: BatchNormBlock,
    nn.BatchNorm2d: BatchNormBlock,
    nn.BatchNorm3d: BatchNormBlock,
    nn.InstanceNorm1d: InstanceNormBlock,
    nn.InstanceNorm2d: InstanceNormBlock,
    nn.InstanceNorm3d: InstanceNormBlock,
    nn.GroupNorm: GroupNormBlock,
    nn.LayerNorm: LayerNormBlock,
    nn.MultiheadAttention: MultiheadAttentionBlock,
    nn.RNN: RNNBlock,
    nn.LSTM: RNNBlock,
    nn.GRU: RNNBlock,
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _REGISTRY[nn.RMSNorm] = RMSNormBlock


def register_block(module_type: type[nn.Module], block_type: type[CurvatureBlock]) -> None:
    """Use `block_type` for every module of `module_type` (and its subclasses)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (isinstance(block_type, type) and issubclass(block_type, CurvatureBlock)):
        raise TypeError(f"block_type must be a CurvatureBlock subclass, got {block_type!r}")
    _REGISTRY[module_type] = block_type


def block_type_for(module: nn.Module) -> type[CurvatureBlock] | None:
    """The block class registered for the module's type or its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


__all__ = [
    "Approximation",
    "BatchNormBlock",
    "ConvBlock",
    "ConvTransposeBlock",
    "CurvatureBlock",
    "EmbeddingBlock",
    "GroupNormBlock",
    "InstanceNormBlock",
    "KroneckerBlock",
    "LayerNormBlock",
    "LinearBlock",
    "MultiheadAttentionBlock",
    "NormBlock",
    "RMSNormBlock",
    "RNNBlock",
    "WeightBiasBlock",
    "block_type_for",
    "register_block",
]
