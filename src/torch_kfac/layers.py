"""Names of the original torch_kfac port's layer interface.

`Layer` was the class a custom layer implemented; here it is the Kronecker block base class.
Subclass it (implement `activation_rows` and `output_grad_rows`) and `register_block` it.
"""

from torch_kfac.blocks import ConvBlock, KroneckerBlock, LinearBlock, register_block

Layer = KroneckerBlock
FullyConnectedLayer = LinearBlock
ConvLayer = ConvBlock

__all__ = ["ConvLayer", "FullyConnectedLayer", "Layer", "register_block"]
