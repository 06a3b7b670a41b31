"""Damped inverses and pi-adjusted damping."""

from __future__ import annotations

import pytest
import torch

from torch_kfac.linalg import damped_inverse, pi_adjustment, symmetric_eigh

pytestmark = pytest.mark.usefixtures("float64")


def test_damped_inverse_of_a_batch() -> None:
    x = torch.randn(3, 10, 4)
    mats = x.mT @ x
    damping = torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1)
    expected = torch.linalg.inv(mats + damping * torch.eye(4))
    torch.testing.assert_close(damped_inverse(mats, damping), expected, rtol=1e-10, atol=1e-12)


def test_damped_inverse_falls_back_to_eigh_for_indefinite_input() -> None:
    mat = torch.diag(torch.tensor([1.0, -1e-3, 2.0]))
    inv = damped_inverse(mat, torch.tensor(1e-6))
    expected = torch.diag(1.0 / torch.tensor([1.0 + 1e-6, 1e-6, 2.0 + 1e-6]))
    torch.testing.assert_close(inv, expected, rtol=1e-10, atol=1e-12)


def test_pi_adjustment_and_its_guard() -> None:
    a, g = torch.diag(torch.tensor([4.0, 4.0])), torch.diag(torch.tensor([1.0, 1.0, 1.0]))
    assert pi_adjustment(a, g).item() == pytest.approx(2.0)
    assert pi_adjustment(a, torch.zeros(3, 3)).item() == 1.0


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
