"""torch_kfac: K-FAC (Kronecker-factored approximate curvature) for PyTorch.

`KFAC` is a `torch.optim.Optimizer`; `KFACPreconditioner` puts the same curvature in front of any
torch optimizer. `register_block` adds a curvature block for a module type of your own.
`Arguments` holds a batch's inputs for a model called with keyword arguments.
"""

from torch_kfac import presets
from torch_kfac.blocks import ConvBlock, CurvatureBlock, KroneckerBlock, LinearBlock, register_block
from torch_kfac.optimizer import KFAC
from torch_kfac.preconditioner import KFACPreconditioner
from torch_kfac.utils import Arguments

__version__ = "0.2.0"

__all__ = [
    "KFAC",
    "Arguments",
    "ConvBlock",
    "CurvatureBlock",
    "KFACPreconditioner",
    "KroneckerBlock",
    "LinearBlock",
    "__version__",
    "presets",
    "register_block",
]
