"""EKFAC (George et al. 2018): K-FAC's eigenbasis with its diagonal re-estimated from per-example gradients.

With A = Q_A diag(l_A) Q_A^T and G = Q_G diag(l_G) Q_G^T, K-FAC's curvature is
(Q_A (x) Q_G) diag(l_A (x) l_G) (Q_A (x) Q_G)^T. EKFAC keeps the basis and replaces the diagonal by
S = E[(Q_G^T W_n Q_A)^2], the second moments of the per-example gradients W_n in that basis,
which is the best diagonal in that basis (in Frobenius norm). S restarts from l_G l_A^T whenever
the basis is recomputed, and is re-estimated from every later batch's per-example gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_kfac.blocks.approximation import per_example_squares
from torch_kfac.blocks.kronecker import KroneckerFactors
from torch_kfac.linalg import in_eigenbasis


class EigenbasisDiagonal(KroneckerFactors):
    """'ekfac': (Q_A (x) Q_G) diag(S) (Q_A (x) Q_G)^T with S re-estimated in the Kronecker eigenbasis."""

    NAME = "ekfac"
    FACTORS = ("A", "G", "S")

    def has_factors(self) -> bool:
        """A and G: S comes from their eigenvalues when the basis is first computed."""
        return all(self.block.has_factor(k) for k in ("A", "G"))

    def joint_statistics(self) -> bool:
        """Once there is a basis: S needs each example's gradient, i.e. its rows a~ and g together."""
        return "A_eigvecs" in self.block.state

    def record_joint(self, a_rows: Tensor, g_rows: Tensor, scale: float) -> None:
        """Pend the squared per-example gradients in the current eigenbasis for S."""
        state = self.block.state
        squares = per_example_squares(a_rows, g_rows, state["A_eigvecs"], state["G_eigvecs"])
        self.block.add_backward_statistic("S", squares * scale, g_rows.shape[1])

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """A new eigenbasis (whatever the method: S lives in it) and S restarted from l_G l_A^T.

        Rows kept and S statistics pending for the old basis are dropped.
        """
        self.eigendecompose()
        block, state = self.block, self.block.state
        block.drop_saved_rows()
        block.clear_pending(("S",))
        state["S_ema"] = state["G_eigvals"].unsqueeze(-1) * state["A_eigvals"].unsqueeze(-2)
        state["S_weight"] = state["S_ema"].new_ones(())

    def precondition(self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str) -> Tensor:
        """(S + damping)^power in the Kronecker eigenbasis (the damping is exact: added to S)."""
        state = self.block.state
        scale = (self.factor("S") + damping).pow(self.block.power)
        return in_eigenbasis(mat, state["A_eigvecs"], state["G_eigvecs"], scale)

    def curvature_product(self, mat: Tensor) -> Tensor:
        """Q_G [(Q_G^T M Q_A) * S] Q_A^T, or K-FAC's G M A before S exists."""
        if not self.block.has_factor("S"):
            return super().curvature_product(mat)
        qa, qg = self.block.state["A_eigvecs"], self.block.state["G_eigvecs"]
        return qg @ ((qg.mT @ mat @ qa) * self.factor("S")) @ qa.mT

    def dense_curvature(self) -> Tensor:
        """(Q_A (x) Q_G) diag(vec S) (Q_A (x) Q_G)^T, or kron(A, G) before S exists."""
        if not self.block.has_factor("S"):
            return super().dense_curvature()
        state = self.block.state
        basis = torch.kron(state["A_eigvecs"][0], state["G_eigvecs"][0])
        return basis @ torch.diag(self.factor("S")[0].mT.reshape(-1)) @ basis.T
