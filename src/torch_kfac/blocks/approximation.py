"""The protocol of a curvature approximation of a Kronecker block, and the helpers approximations share.

A `KroneckerBlock` says how a layer's inputs and output gradients become rows a~ and g; its
`Approximation` (chosen by `KroneckerBlock.configure`) says which statistics of those rows are
kept, how cached inverses are computed from them and how a gradient is preconditioned:

* `KroneckerFactors` ('kfac', `kronecker.py`): A (x) G;
* `EigenbasisDiagonal` ('ekfac', `ekfac.py`): A (x) G's eigenbasis with its diagonal re-estimated;
* `DiagonalFisher` ('diagonal', `diagonal.py`): the exact diagonal of the Fisher;
* `ForwardOnly` ('forward-only', `forward_only.py`): A (x) I, no backward statistics.

An approximation keeps no tensors itself: everything lives in its block's `state` (so the key names
of saved state dicts are the block's), and the approximation reads it through the block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from torch_kfac.linalg import damped_inverse, in_eigenbasis, kronecker_eigenvalues, pi_adjustment

if TYPE_CHECKING:
    from torch_kfac.blocks.base import KroneckerBlock


class Approximation(ABC):
    """Which statistics a Kronecker block keeps and how it preconditions with them."""

    #: The option value that selects it (`approximation=...`).
    NAME: ClassVar[str]
    #: Names of the running factors kept in the block's state (as `<name>_ema`, `<name>_weight`).
    FACTORS: ClassVar[tuple[str, ...]]
    #: Whether the block records statistics of output gradients.
    NEEDS_OUTPUT_GRADS: ClassVar[bool] = True

    def __init__(self, block: KroneckerBlock) -> None:
        self.block = block

    def factor(self, key: str) -> Tensor:
        """The block's zero-debiased running factor `key` (with its leading group dimension)."""
        return self.block._factor(key)

    def has_factors(self) -> bool:
        """Whether the factors the preconditioner is built from have been estimated."""
        return all(self.block.has_factor(k) for k in self.FACTORS)

    def joint_statistics(self) -> bool:
        """Whether a backward statistic pairs the output gradients with the same call's inputs.

        When it does, the block keeps each call's rows a~ until that call's backward pass and
        hands both to `record_joint`.
        """
        return False

    def record_joint(self, a_rows: Tensor, g_rows: Tensor, scale: float) -> None:  # noqa: B027 (optional)
        """Pend the statistic of one call's rows a~ (groups, N, T, d_in [+1]) and g (groups, N, T, d_out).

        `scale` is the loss reduction's second-moment scale; only approximations whose
        `joint_statistics()` is true receive calls.
        """

    @abstractmethod
    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Cache what `precondition` needs in the block's state (old caches are already dropped)."""

    @abstractmethod
    def has_inverses(self) -> bool:
        """Whether `precondition` can run."""

    @abstractmethod
    def precondition(self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str) -> Tensor:
        """The damped curvature raised to the block's `power` times matrices (groups, d_out, d_in)."""

    @abstractmethod
    def curvature_product(self, mat: Tensor) -> Tensor:
        """The undamped curvature times matrices (groups, d_out, d_in)."""

    @abstractmethod
    def dense_curvature(self) -> Tensor:
        """The undamped curvature of an ungrouped block as a dense matrix (vec = column stacking)."""


def factored_damping(a: Tensor, g: Tensor, damping: Tensor, pi_correction: bool) -> tuple[Tensor, Tensor]:
    """The diagonal shifts (pi sqrt(l), sqrt(l) / pi) of factored Tikhonov damping of A (x) G."""
    root = damping.sqrt()
    if not pi_correction:
        return root, root
    pi = pi_adjustment(a, g)
    return pi * root, root / pi


def damped_kronecker_inverses(
    a: Tensor, g: Tensor, damping: Tensor, pi_correction: bool
) -> tuple[Tensor, Tensor]:
    """(A + pi sqrt(l) I)^-1 and (G + sqrt(l) / pi I)^-1: factored damping baked into the inverses."""
    a_damp, g_damp = factored_damping(a, g, damping, pi_correction)
    return damped_inverse(a, a_damp), damped_inverse(g, g_damp)


def kronecker_power(
    mat: Tensor,
    factors: tuple[Tensor, Tensor],
    eigen: tuple[Tensor, Tensor, Tensor, Tensor],
    damping: Tensor,
    pi_correction: bool,
    damping_type: str,
    power: float,
) -> Tensor:
    """(A (x) G + damping)^power applied to M through the factors' eigendecompositions.

    `factors` is (A, G), `eigen` (l_A, Q_A, l_G, Q_G). Exact damping adds l to the Kronecker
    eigenvalues; factored damping (pi-adjusted when `pi_correction`) shifts each factor's.
    """
    la, qa, lg, qg = eigen
    shifts = None if damping_type == "exact" else factored_damping(*factors, damping, pi_correction)
    return in_eigenbasis(mat, qa, qg, kronecker_eigenvalues(la, lg, damping, shifts).pow(power))


def per_example_squares(
    a_rows: Tensor, g_rows: Tensor, qa: Tensor | None = None, qg: Tensor | None = None, chunk: int = 64
) -> Tensor:
    """sum_n (Q_G^T W_n Q_A)^2 with W_n = sum_t g_nt a_nt^T the per-example gradient matrices.

    a_rows (groups, N, T, d_in), g_rows (groups, N, T, d_out); without bases Q the squares of
    W_n themselves. Without shared positions (T = 1) this is one product of squared rows;
    otherwise per-example gradients are formed `chunk` examples at a time to bound memory.
    """
    if qa is not None and qg is not None:
        a_rows, g_rows = a_rows @ qa.unsqueeze(1), g_rows @ qg.unsqueeze(1)
    if a_rows.shape[2] == 1:
        return g_rows[:, :, 0].square().mT @ a_rows[:, :, 0].square()
    total = g_rows.new_zeros(g_rows.shape[0], g_rows.shape[-1], a_rows.shape[-1])
    for start in range(0, a_rows.shape[1], chunk):
        grads = g_rows[:, start : start + chunk].mT @ a_rows[:, start : start + chunk]
        total += grads.square().sum(1)
    return total
