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


#: 16-bit dtypes, which LAPACK and cuSOLVER do not factorise.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a decomposition runs in: float32 for 16-bit matrices, else their own."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def damped_inverse(matrix: Tensor, damping: Tensor) -> Tensor:
    """(M + damping I)^-1 of symmetric positive semi-definite matrices, through Cholesky.

    No host synchronisation: where rounding made M + damping I indefinite (Cholesky fails), that
    matrix's result is NaN, and the preconditioner, which checks new inverses for finiteness,
    takes the block through `symmetric_eigh` instead (eigenvalues clamped at zero before damping).
    16-bit matrices are inverted (and returned) in float32.
    """
    inverse, ok = cholesky_damped_inverse(matrix, damping)
    return torch.where(ok[..., None, None], inverse, torch.full_like(inverse, float("nan")))


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix with eigenvalues clamped at zero.

    When the solver does not converge in single precision (ill-conditioned factors), it is
    retried in float64; a failure there (e.g. a NaN entry) raises `torch.linalg.LinAlgError`.
    16-bit matrices are decomposed (and the results returned) in float32.
    """
    matrix = matrix.to(solver_dtype(matrix.dtype))
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


def cholesky_damped_inverse(matrix: Tensor, damping: Tensor | float) -> tuple[Tensor, Tensor]:
    """(M + damping I)^-1 through Cholesky, and whether each matrix's factorisation succeeded.

    No host synchronisation: where M + damping I is not positive definite (in floating point)
    the inverse is garbage and the flag, a boolean tensor of the batch shape, is False; the caller
    decides on the device (`torch.where`) what to use instead. 16-bit matrices: as `damped_inverse`.
    """
    matrix = matrix.to(solver_dtype(matrix.dtype))
    chol, info = torch.linalg.cholesky_ex(add_to_diagonal(matrix, damping))
    if chol.is_cuda:  # `torch.cholesky_inverse` reads its error codes on the host: a synchronisation
        return triangular_inverse(chol), info == 0
    return torch.cholesky_inverse(chol), info == 0


def triangular_inverse(chol: Tensor) -> Tensor:
    """(L L^T)^-1 = L^-T L^-1 from lower-triangular Cholesky factors L, by triangular solves.

    Unlike `torch.cholesky_inverse` it checks no error codes, so on a GPU it runs without a host
    synchronisation (a failed factorisation gives garbage, which the caller masks).
    """
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    inverse_factor = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return inverse_factor.mT @ inverse_factor
