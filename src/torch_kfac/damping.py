"""Levenberg-Marquardt damping (Martens & Grosse 2015, section 6.5) as pure tensor functions.

rho = (L(theta + delta) - L(theta)) / q(delta) compares the loss change of a step with the change
its quadratic model predicted; the damping shrinks by omega where the model is good and grows by
1/omega where it is bad. Everything stays on the device: no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def levenberg_marquardt(
    damping: Tensor,
    loss_change: Tensor,
    model_change: Tensor,
    omega: float,
    thresholds: tuple[float, float],
    bounds: tuple[float, float],
) -> tuple[Tensor, Tensor]:
    """(new damping, rho): damping * omega if rho > high for a step the model predicted to lower
    the loss (or a gain the model did not predict), damping / omega if rho < low or if the loss did
    not fall after a step the model predicted not to lower it, else unchanged; clamped to `bounds`.

    The model predicts no decrease (q >= 0) only for fixed coefficients (a fixed learning rate or
    momentum that overshoots the model's minimum); rho > high there means the predicted rise came
    true, which calls for more damping, not less. A NaN rho (a NaN loss) leaves the damping as it
    was.
    """
    rho = loss_change / model_change
    low, high = thresholds
    decrease = ((loss_change < 0) & (model_change > 0)) | ((rho > high) & (model_change < 0))
    increase = (rho < low) | ((loss_change >= 0) & (model_change >= 0))
    new = torch.where(decrease, damping * omega, torch.where(increase, damping / omega, damping))
    return new.clamp(min=bounds[0], max=bounds[1]), rho


def model_change(linear: Tensor, curvature: Tensor, model_damping: Tensor | float, sq_norm: Tensor) -> Tensor:
    """q(delta) = g^T delta + 1/2 (delta^T C delta + c |delta|^2), from its three inner products."""
    return linear + 0.5 * (curvature + model_damping * sq_norm)


def step_rejected(loss: Tensor, new_loss: Tensor) -> Tensor:
    """Whether a step made the loss on the same batch larger or NaN (a boolean 0-d tensor)."""
    return ~(new_loss <= loss)


def rejected_damping(damping: Tensor, omega: float, max_damping: float) -> Tensor:
    """The damping after a rejected step: raised by 1/omega, at most `max_damping`."""
    return (damping / omega).clamp(max=max_damping)
