"""damping.py: the Levenberg-Marquardt rule and step rejection as pure tensor functions."""

from __future__ import annotations

import math

import pytest
import torch

from torch_kfac.damping import levenberg_marquardt, model_change, rejected_damping, step_rejected

pytestmark = pytest.mark.usefixtures("float64")
OMEGA, THRESHOLDS, BOUNDS = 0.81, (0.25, 0.75), (1e-8, math.inf)


@pytest.mark.parametrize(
    ("loss_change", "q", "factor"),
    [
        (0.5, -1.0, 1 / OMEGA),  # the loss went up: rho < 0
        (-1.0, -1.0, OMEGA),  # rho = 1 > 3/4
        (-0.5, -1.0, 1.0),  # rho = 1/2 in between
        (-0.25, -1.0, 1.0),  # rho = 1/4 exactly: neither rule fires
        (-0.1, -1.0, 1 / OMEGA),  # rho = 0.1 < 1/4
        (-0.1, 1.0, OMEGA),  # a gain the model did not predict
        (float("nan"), -1.0, 1.0),  # a NaN loss leaves the damping alone
        # Boundaries found by the mutation run (benchmarks/results/mutation.md):
        (-0.75, -1.0, 1.0),  # rho = 3/4 exactly: neither rule fires
        (0.0, 1.0, 1 / OMEGA),  # no change where the model predicted a rise: rho = 0 < 1/4
        (0.01, 1.0, 1 / OMEGA),  # a small rise where the model predicted a larger one: rho < 1/4
        (-0.1, 0.0, 1 / OMEGA),  # a gain with a zero model change: rho = -inf, not "unpredicted gain"
        # A rise the model predicted (q > 0: fixed coefficients that overshoot) came true: more
        # damping, however large rho is; also for a rise where the model predicted no change.
        (1.0, 1.0, 1 / OMEGA),  # rho = 1 > 3/4
        (0.5, 1.0, 1 / OMEGA),  # rho = 1/2
        (2.0, 1.0, 1 / OMEGA),  # rho = 2
        (0.1, 0.0, 1 / OMEGA),  # rho = +inf
    ],
)
def test_rule_on_constructed_cases(loss_change: float, q: float, factor: float) -> None:
    damping = torch.tensor(1e-2)
    new, rho = levenberg_marquardt(
        damping, torch.tensor(loss_change), torch.tensor(q), OMEGA, THRESHOLDS, BOUNDS
    )
    assert new.item() == pytest.approx(1e-2 * factor, rel=1e-15)
    torch.testing.assert_close(rho, torch.tensor(loss_change) / q, equal_nan=True)
    assert damping.item() == 1e-2  # the input is not modified


def test_rule_clamps_to_the_bounds() -> None:
    up, _ = levenberg_marquardt(
        torch.tensor(1.0), torch.tensor(1.0), torch.tensor(-1.0), 0.5, THRESHOLDS, (0.1, 1.5)
    )
    down, _ = levenberg_marquardt(
        torch.tensor(0.15), torch.tensor(-1.0), torch.tensor(-1.0), 0.5, THRESHOLDS, (0.1, 1.5)
    )
    assert (up.item(), down.item()) == (1.5, 0.1)


def test_rule_uses_the_given_thresholds() -> None:
    args = (torch.tensor(1.0), torch.tensor(-0.5), torch.tensor(-1.0), 0.5)
    assert levenberg_marquardt(*args, (0.1, 0.4), BOUNDS)[0].item() == 0.5
    assert levenberg_marquardt(*args, (0.6, 0.9), BOUNDS)[0].item() == 2.0


def test_rule_keeps_everything_on_the_device_and_batches() -> None:
    damping = torch.tensor([1.0, 1.0, 1.0])
    new, rho = levenberg_marquardt(
        damping, torch.tensor([1.0, -1.0, -0.5]), torch.tensor(-1.0), 0.5, THRESHOLDS, BOUNDS
    )
    assert isinstance(new, torch.Tensor) and isinstance(rho, torch.Tensor)
    torch.testing.assert_close(new, torch.tensor([2.0, 0.5, 1.0]), rtol=0, atol=0)


def test_model_change_from_inner_products() -> None:
    # q = g.d + 1/2 (d.C.d + c |d|^2) with g.d = -3, d.C.d = 4, c = 0.5, |d|^2 = 2
    assert model_change(torch.tensor(-3.0), torch.tensor(4.0), 0.5, torch.tensor(2.0)).item() == -0.5


@pytest.mark.parametrize(
    ("new_loss", "rejected"), [(1.1, True), (1.0, False), (0.9, False), (float("nan"), True)]
)
def test_step_rejected(new_loss: float, rejected: bool) -> None:
    assert bool(step_rejected(torch.tensor(1.0), torch.tensor(new_loss))) is rejected


def test_rejected_damping_rises_by_one_over_omega_up_to_the_maximum() -> None:
    assert rejected_damping(torch.tensor(0.81), 0.81, math.inf).item() == pytest.approx(1.0, rel=1e-15)
    assert rejected_damping(torch.tensor(0.81), 0.81, 0.9).item() == 0.9
