"""The forward-only approximation (Benzing 2022): F ~ A (x) I, from the layer inputs alone.

G is replaced by the identity, so no statistics are taken in the backward pass (the capture does
not hook the layer's outputs) and a gradient matrix M is preconditioned as M (A + damping I)^power.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_kfac.blocks.approximation import Approximation
from torch_kfac.linalg import damped_inverse, symmetric_eigh


class ForwardOnly(Approximation):
    """'forward-only': F ~ A (x) I, preconditioned as M (A + damping I)^power."""

    NAME = "forward-only"
    FACTORS = ("A",)
    NEEDS_OUTPUT_GRADS = False

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """(A + damping I)^-1 ('cholesky') or A's eigendecomposition ('eigh'); no pi without a G."""
        state, a = self.block.state, self.factor("A")
        if method == "cholesky":
            state["A_inv"] = damped_inverse(a, damping)
        else:
            state["A_eigvals"], state["A_eigvecs"] = symmetric_eigh(a)

    def has_inverses(self) -> bool:
        """Whether A's inverse or eigendecomposition is cached."""
        return "A_inv" in self.block.state or "A_eigvecs" in self.block.state

    def precondition(self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str) -> Tensor:
        """M (A + damping I)^power."""
        state = self.block.state
        if "A_inv" in state:
            return mat @ state["A_inv"]
        qa, la = state["A_eigvecs"], state["A_eigvals"]
        return ((mat @ qa) * (la + damping).pow(self.block.power).unsqueeze(-2)) @ qa.mT

    def curvature_product(self, mat: Tensor) -> Tensor:
        """M A."""
        return mat @ self.factor("A")

    def dense_curvature(self) -> Tensor:
        """kron(A, I)."""
        a = self.block.A
        return torch.kron(a, torch.eye(self.block.weight.shape[0], dtype=a.dtype, device=a.device))
