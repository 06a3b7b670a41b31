"""Automatic initial damping (`damping='auto'`): a damping in the units of the curvature at hand.

The damping lambda is added to the per-example-loss curvature, so a good value scales with it:
a cross-entropy over 10 classes and a loss summed over 784 pixels need dampings orders of
magnitude apart. At the first step, after the first factor update, the yardstick is the
curvature along the gradient, the Rayleigh quotient r = g^T K g / g^T g of the blocks' K-FAC
curvature K (1/r is the best learning rate of a gradient-descent step on the quadratic model),
and the initial damping is `AUTO_DAMPING_FRACTION` times r: in directions of small curvature the
damped step is then a gradient step a few times shorter than that best one. The mean eigenvalue
tr(K)/dim(K) was tried first and is not a usable scale: it is dominated by the many directions
of almost no curvature (autoencoder 3.6e-4, convnet 1.7e-5, against r = 0.70 and 0.051).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import Tensor

from torch_kfac.options import FALLBACK_DAMPING

if TYPE_CHECKING:
    from torch_kfac.blocks import CurvatureBlock

#: lambda_0 / r, chosen by measurement (benchmarks/README.md, "The adaptive preset").
AUTO_DAMPING_FRACTION = 0.1


def curvature_along(blocks: dict[str, CurvatureBlock], mats: dict[str, Tensor]) -> Tensor | None:
    """g^T K g / g^T g over the blocks with factors, g their gradient matrices (`mats`, by block name)."""
    quad, norm = None, None
    for name, mat in mats.items():
        block = blocks[name]
        if not block.has_factors():
            continue
        q = (mat * block.curvature_product(mat)).sum()
        n = (mat * mat).sum()
        quad, norm = (q, n) if quad is None or norm is None else (quad + q, norm + n)
    if quad is None or norm is None:
        return None
    return quad / norm


def initial_damping(
    blocks: dict[str, CurvatureBlock], mats: dict[str, Tensor], fraction: float = AUTO_DAMPING_FRACTION
) -> float:
    """`fraction` times the curvature along the gradient (`FALLBACK_DAMPING` if it cannot be measured)."""
    r = curvature_along(blocks, mats)
    value = math.nan if r is None else float(r) * fraction
    return value if math.isfinite(value) and value > 0 else FALLBACK_DAMPING
