"""K-FAC's approximation F ~ A (x) G (Martens & Grosse 2015; Grosse & Martens 2016).

A = E[a~ a~^T] over the layer's input rows, G = E[g g^T] over its per-example output-gradient rows.
Inverses are either the damped factors' inverses (`inverse_method='cholesky'`, factored damping
baked in, power -1) or the factors' eigendecompositions ('eigh'), with the damping (factored or
exact) applied when a gradient is preconditioned, so that a new damping takes effect at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_kfac.blocks.approximation import Approximation, damped_kronecker_inverses, kronecker_power
from torch_kfac.linalg import symmetric_eigh


class KroneckerFactors(Approximation):
    """'kfac': F ~ A (x) G, preconditioned as (G + d_G I)^-1 M (A + d_A I)^-1 or in the eigenbasis."""

    NAME = "kfac"
    FACTORS = ("A", "G")

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Damped inverses of both factors ('cholesky') or their eigendecompositions ('eigh')."""
        if method == "cholesky":
            state = self.block.state
            state["A_inv"], state["G_inv"] = damped_kronecker_inverses(
                self.factor("A"), self.factor("G"), damping, pi_correction
            )
            return
        self.eigendecompose()

    def eigendecompose(self) -> None:
        """Cache the eigenvalues and eigenvectors of A and G."""
        state = self.block.state
        state["A_eigvals"], state["A_eigvecs"] = symmetric_eigh(self.factor("A"))
        state["G_eigvals"], state["G_eigvecs"] = symmetric_eigh(self.factor("G"))

    def has_inverses(self) -> bool:
        """Whether inverses or eigendecompositions are cached."""
        return "A_inv" in self.block.state or "A_eigvecs" in self.block.state

    def precondition(self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str) -> Tensor:
        """(G + d_G I)^-1 M (A + d_A I)^-1 (Cholesky) or (A (x) G + damping)^power in the eigenbasis."""
        state = self.block.state
        if "A_inv" in state:
            return state["G_inv"] @ (mat @ state["A_inv"])
        eigen = (state["A_eigvals"], state["A_eigvecs"], state["G_eigvals"], state["G_eigvecs"])
        factors = (self.factor("A"), self.factor("G"))
        return kronecker_power(mat, factors, eigen, damping, pi_correction, damping_type, self.block.power)

    def precondition_rows(self, g_rows: Tensor, a_rows: Tensor) -> Tensor | None:
        """(G + d_G I)^-1 M (A + d_A I)^-1 for M = g_rows^T a_rows, from the rows (1, rows, d):
        with Cholesky inverses (None with eigendecompositions)."""
        state = self.block.state
        if "A_inv" not in state:
            return None
        return (g_rows @ state["G_inv"]).mT @ (a_rows @ state["A_inv"])

    def curvature_product(self, mat: Tensor) -> Tensor:
        """(A (x) G) vec(M) = G M A."""
        return self.factor("G") @ mat @ self.factor("A")

    def dense_curvature(self) -> Tensor:
        """kron(A, G)."""
        return torch.kron(self.block.A, self.block.G)
