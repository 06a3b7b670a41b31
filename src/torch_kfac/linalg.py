"""Damped inverses, eigendecompositions and pi-adjusted damping for Kronecker factors.

Every function works on batches of matrices (leading dimensions are batch dimensions), so a
block that is block-diagonal over convolution groups is handled in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor


def trace_mean(matrix: Tensor) -> Tensor:
    """tr(M) / dim(M) for each matrix in a batch, shape (..., 1, 1)."""
    return matrix.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]


def pi_adjustment(a_factor: Tensor, g_factor: Tensor) -> Tensor:
    """The pi of factored Tikhonov damping: sqrt((tr A / dim A) / (tr G / dim G)).

    Martens & Grosse (2015), section 6.3. Where the ratio is not a positive finite number (a
    factor that is still all zeros), pi falls back to 1 so that the damping stays finite.
    """
    ratio = trace_mean(a_factor) / trace_mean(g_factor)
    ok = torch.isfinite(ratio) & (ratio > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio)).sqrt()


def add_to_diagonal(matrix: Tensor, value: Tensor | float) -> Tensor:
    """M + value * I for a batch of square matrices (value broadcasts per matrix)."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return matrix + value * eye


def damped_inverse(matrix: Tensor, damping: Tensor) -> Tensor:
    """(M + damping I)^-1 of symmetric positive semi-definite matrices.

    Cholesky where it succeeds; where rounding made M + damping I indefinite, the inverse is taken
    through an eigendecomposition with the eigenvalues clamped at zero before damping.
    """
    damped = add_to_diagonal(matrix, damping)
    chol, info = torch.linalg.cholesky_ex(damped)
    if bool((info == 0).all()):
        return torch.cholesky_inverse(chol)
    eigvals, eigvecs = symmetric_eigh(matrix)
    inv_vals = 1.0 / (eigvals + damping.squeeze(-1))
    return (eigvecs * inv_vals.unsqueeze(-2)) @ eigvecs.mT


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix with eigenvalues clamped at zero.

    When the solver does not converge in single precision (ill-conditioned factors), it is
    retried in float64; a failure there (e.g. a NaN entry) raises `torch.linalg.LinAlgError`.
    """
    sym = 0.5 * (matrix + matrix.mT)
    try:
        eigvals, eigvecs = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        if sym.dtype == torch.float64:
            raise
        eigvals, eigvecs = (t.to(sym.dtype) for t in torch.linalg.eigh(sym.double()))
    return eigvals.clamp(min=0.0), eigvecs


def kronecker_eigenvalues(
    a_eigvals: Tensor, g_eigvals: Tensor, damping: Tensor, shifts: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Eigenvalues of the damped A (x) G on the (d_out, d_in) grid of eigenbasis coordinates.

    Exact damping: l_G l_A^T + damping. Factored damping with `shifts` (a, g):
    (l_G + g)(l_A + a)^T, the eigenvalues of (A + a I) (x) (G + g I).
    """
    if shifts is None:
        return g_eigvals.unsqueeze(-1) * a_eigvals.unsqueeze(-2) + damping
    a_shift, g_shift = shifts
    return (g_eigvals.unsqueeze(-1) + g_shift) * (a_eigvals.unsqueeze(-2) + a_shift)


def in_eigenbasis(mat: Tensor, a_eigvecs: Tensor, g_eigvecs: Tensor, scale: Tensor) -> Tensor:
    """Q_G [(Q_G^T M Q_A) * scale] Q_A^T: a function of A (x) G applied to a gradient matrix."""
    return g_eigvecs @ ((g_eigvecs.mT @ mat @ a_eigvecs) * scale) @ a_eigvecs.mT
