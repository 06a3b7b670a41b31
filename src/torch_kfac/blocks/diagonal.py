"""The diagonal approximation: the exact diagonal of the Fisher, E[(per-example gradient)^2].

D = E_n[W_n * W_n] with W_n = sum_t g_nt a~_nt^T the per-example gradient matrix of the layer's
weight and bias. No Kronecker factors are kept; preconditioning divides elementwise by
(D + damping)^-power.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_kfac.blocks.approximation import Approximation, per_example_squares


class DiagonalFisher(Approximation):
    """'diagonal': F ~ diag(vec D), D the second moments of the per-example gradients' entries."""

    NAME = "diagonal"
    FACTORS = ("D",)

    def joint_statistics(self) -> bool:
        """Always: per-example gradients need each call's rows a~ and g together."""
        return True

    def record_joint(self, a_rows: Tensor, g_rows: Tensor, scale: float) -> None:
        """Pend the squared per-example gradients for D."""
        self.block.add_backward_statistic("D", per_example_squares(a_rows, g_rows) * scale, g_rows.shape[1])

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Nothing to cache: the damped diagonal is inverted when preconditioning."""

    def has_inverses(self) -> bool:
        """Whether D has been estimated."""
        return self.block.has_factor("D")

    def precondition(self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str) -> Tensor:
        """M * (D + damping)^power, elementwise."""
        return mat * (self.factor("D") + damping).pow(self.block.power)

    def curvature_product(self, mat: Tensor) -> Tensor:
        """D * M, elementwise."""
        return self.factor("D") * mat

    def dense_curvature(self) -> Tensor:
        """diag(vec D)."""
        return torch.diag(self.factor("D")[0].mT.reshape(-1))
