"""torch_kfac: K-FAC (Kronecker-factored approximate curvature) for PyTorch.

`KFAC` is a `torch.optim.Optimizer`; `KFACPreconditioner` puts the same curvature in front of any
torch optimizer. `register_block` adds a curvature block for a module type of your own.
"""

from torch_kfac import presets
from torch_kfac.blocks import ConvBlock, CurvatureBlock, KroneckerBlock, LinearBlock, register_block
from torch_kfac.optimizer import KFAC
from torch_kfac.preconditioner import KFACPreconditioner

__version__ = "0.2.0"

__all__ = [
    "KFAC",
    "ConvBlock",
    "CurvatureBlock",
    "KFACPreconditioner",
    "KroneckerBlock",
    "LinearBlock",
    "__version__",
    "presets",
    "register_block",
]
