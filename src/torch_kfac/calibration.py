"""Automatic initial damping (`damping='auto'`): a damping in the units of the curvature at hand.

The damping lambda is added to the per-example-loss curvature, so a good value scales with it:
a cross-entropy over 10 classes and a loss summed over 784 pixels need dampings orders of
magnitude apart. At the first step, after the first factor update, the yardstick is the
curvature along the gradient, the Rayleigh quotient r = g^T K g / g^T g of the blocks' K-FAC
curvature K (1/r is the best learning rate of a gradient-descent step on the quadratic model).
The mean eigenvalue tr(K)/dim(K) is not a usable scale: it is dominated by the many directions
of almost no curvature (autoencoder 3.6e-4, convnet 1.7e-5, against r = 0.70 and 0.051).

No fixed multiple of r is a good damping everywhere: on the models of `tests/test_models.py`
the best fixed initial damping is 0.003 r to 0.1 r (LSTM, a flat optimum) and 10 to 14 r (tied
transformer, where 0.1 r diverged). With the loss and the batch at hand (`step(loss=...,
batch=...)` or a closure), the first step therefore searches: it tries the step itself at trial
dampings and keeps the smallest one whose step the quadratic model predicts well enough,
rho = (L(theta + delta) - L(theta)) / q(delta) >= `ACCEPTED_RHO`. Trials start at
`AUTO_DAMPING_FRACTION` r and move by factors of 10 (down while accepted, up until accepted)
within `SEARCH_RANGE` r, then one trial sqrt(10) below the accepted value refines it; they cost
2 to 6 step computations (inverses, quadratic model, one loss), once. Without the loss and the
batch the damping is `AUTO_DAMPING_FRACTION` r.

The threshold 0.15 is measured: the tied transformer's first steps at the dampings that
diverged have rho between -0.05 and 0.06, and the ResNet's at the small dampings that train it
best (1e-5 to 0.1 r) 0.07 to 0.24, so the Levenberg-Marquardt rule's own 1/4 would push the
ResNet to a damping 3 times larger, with which it no longer beats Adam in 100 steps. The floor
0.01 r: the LSTM accepts every trial, and its best fixed values are 0.003 r to 0.1 r. The
measurements are in benchmarks/README.md ("Initial damping") and
benchmarks/results/initial_damping.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from torch_kfac.options import FALLBACK_DAMPING

if TYPE_CHECKING:
    from torch_kfac.blocks import CurvatureBlock

#: lambda / r of the damping without a search, and of the search's first trial.
AUTO_DAMPING_FRACTION = 0.1
#: The smallest rho of an accepted trial step (measured; see the module docstring).
ACCEPTED_RHO = 0.15
#: Trial dampings stay within these multiples of r.
SEARCH_RANGE = (1e-2, 1e3)
#: The search's coarse step; one trial sqrt(SEARCH_STEP) below the accepted value refines it.
SEARCH_STEP = 10.0


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


def search_damping(start: float, rho_at: Callable[[float], float]) -> float:
    """The smallest trial damping whose step has rho >= `ACCEPTED_RHO` (see the module docstring).

    `start` is `AUTO_DAMPING_FRACTION` r; `rho_at(damping)` takes the first step with that damping,
    returns its rho and undoes it. A non-finite rho counts as rejected. When no trial within the
    range is accepted, the largest one tried is returned.
    """
    scale = start / AUTO_DAMPING_FRACTION
    low, high = scale * SEARCH_RANGE[0], scale * SEARCH_RANGE[1]

    def accepted(damping: float) -> bool:
        rho = rho_at(damping)
        return math.isfinite(rho) and rho >= ACCEPTED_RHO

    rejected: float | None = None
    if accepted(start):
        best = start
        while best / SEARCH_STEP >= low * (1 - 1e-9):
            if not accepted(best / SEARCH_STEP):
                rejected = best / SEARCH_STEP
                break
            best /= SEARCH_STEP
    else:
        rejected = best = start
        while best * SEARCH_STEP <= high * (1 + 1e-9):
            best *= SEARCH_STEP
            if accepted(best):
                break
            rejected = best
        else:
            return best
    if rejected is not None and accepted(best / math.sqrt(SEARCH_STEP)):
        best /= math.sqrt(SEARCH_STEP)
    return best
