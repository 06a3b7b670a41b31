"""Damped inverses and pi-adjusted damping."""

from __future__ import annotations

import pytest
import torch

from torch_kfac.linalg import (
    cholesky_damped_inverse,
    damped_inverse,
    pi_adjustment,
    symmetric_eigh,
    triangular_inverse,
)

pytestmark = pytest.mark.usefixtures("float64")


def test_damped_inverse_of_a_batch() -> None:
    x = torch.randn(3, 10, 4)
    mats = x.mT @ x
    damping = torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1)
    expected = torch.linalg.inv(mats + damping * torch.eye(4))
    torch.testing.assert_close(damped_inverse(mats, damping), expected, rtol=1e-10, atol=1e-12)


def test_damped_inverse_is_nan_where_cholesky_fails() -> None:
    """No host read to branch on: an indefinite matrix's result is NaN (the preconditioner then uses
    eigh), the other matrices of the batch are inverted."""
    good = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    bad = torch.diag(torch.tensor([1.0, -1e-3, 2.0]))
    inv = damped_inverse(torch.stack([good, bad]), torch.tensor(1e-6))
    torch.testing.assert_close(inv[0], torch.diag(1.0 / (torch.tensor([1.0, 2.0, 3.0]) + 1e-6)))
    assert inv[1].isnan().all()


def test_triangular_inverse_is_the_inverse_of_the_cholesky_product() -> None:
    """The GPU path of the damped inverse (no error codes read): L^-T L^-1 = (L L^T)^-1, batched."""
    x = torch.randn(2, 12, 5)
    mats = x.mT @ x + 0.1 * torch.eye(5)
    chol = torch.linalg.cholesky(mats)
    torch.testing.assert_close(triangular_inverse(chol), torch.linalg.inv(mats), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(triangular_inverse(chol), torch.cholesky_inverse(chol), rtol=1e-10, atol=1e-12)
    assert triangular_inverse(chol.float()).dtype == torch.float32  # its own dtype, not the default


def test_pi_adjustment_and_its_guard() -> None:
    a, g = torch.diag(torch.tensor([4.0, 4.0])), torch.diag(torch.tensor([1.0, 1.0, 1.0]))
    assert pi_adjustment(a, g).item() == pytest.approx(2.0)
    assert pi_adjustment(a, torch.zeros(3, 3)).item() == 1.0  # ratio inf
    assert pi_adjustment(torch.zeros(2, 2), g).item() == 1.0  # ratio 0: pi 0 would put all damping on G
    assert pi_adjustment(torch.zeros(2, 2), torch.zeros(3, 3)).item() == 1.0  # ratio nan


def test_symmetric_eigh_clamps_negative_rounding() -> None:
    vals, vecs = symmetric_eigh(torch.diag(torch.tensor([-1e-12, 3.0])))
    assert vals.min().item() == 0.0
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(2))


def test_eigh_that_fails_in_single_precision_is_retried_in_double(monkeypatch: pytest.MonkeyPatch) -> None:
    original = torch.linalg.eigh

    def float32_fails(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return original(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", float32_fails)
    gen = torch.Generator().manual_seed(0)
    root = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    matrix = root @ root.T
    vals, vecs = symmetric_eigh(matrix.float())
    assert vals.dtype == vecs.dtype == torch.float32
    torch.testing.assert_close((vecs * vals) @ vecs.T, matrix.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):
        symmetric_eigh(torch.full((3, 3), float("nan"), dtype=torch.float64))


def spd(n: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """A random symmetric positive semi-definite matrix of rank n - 1 (a batch of them)."""
    root = torch.randn(*batch, n, n - 1, generator=torch.Generator().manual_seed(seed))
    return root @ root.mT / n


def exact_inverse(matrix: torch.Tensor, damping: float | torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(matrix + damping * torch.eye(matrix.shape[-1]))


def test_cholesky_damped_inverse_flags_each_failure_without_raising() -> None:
    good, bad = spd(4, 0), -torch.eye(4)
    inverses, ok = cholesky_damped_inverse(torch.stack([good, bad]), torch.tensor(0.1))
    assert ok.tolist() == [True, False]
    torch.testing.assert_close(inverses[0], exact_inverse(good, 0.1), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_factors_are_decomposed_in_float32(dtype: torch.dtype) -> None:
    """LAPACK has no 16-bit Cholesky or eigh: they run, and return, in float32."""
    matrix = spd(6, 0).to(dtype)
    exact = exact_inverse(matrix.double(), 0.125)  # a damping exact in 16 bits
    inverse = damped_inverse(matrix, torch.tensor(0.125, dtype=dtype))
    flagged, ok = cholesky_damped_inverse(matrix, 0.125)
    vals, vecs = symmetric_eigh(matrix)
    assert inverse.dtype == flagged.dtype == vals.dtype == vecs.dtype == torch.float32 and bool(ok)
    torch.testing.assert_close(inverse.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flagged.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(((vecs * vals) @ vecs.mT).double(), matrix.double(), rtol=1e-5, atol=1e-6)
