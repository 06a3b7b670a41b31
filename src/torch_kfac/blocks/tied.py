"""A weight shared by two modules (tied embedding and output projection, tied Linear layers).

Each use of the shared weight W (rows x cols) contributes its own Kronecker term to the Fisher:
in the layout X = [W | biases] it is X -> R_i X C_i, with R_i over W's rows and C_i over its
columns (and that member's bias column). A Linear layer (out x in weight) has R = G, C = A; an
embedding (V x d table) has R = diag(token frequencies), C = G. The block preconditions with
the exact inverse of the sum of the two damped terms,

    R1 X C1 + R2 X C2 = M  <=>  X = L_R U [(U^T L_R M L_C V) / (1 + s t^T)] V^T L_C,

with L_R = R1^-1/2, L_C = C1^-1/2 and the eigendecompositions L_R R2 L_R = U diag(s) U^T,
L_C C2 L_C = V diag(t) V^T (both damped terms are positive definite).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch
from torch import Tensor

from torch_kfac.blocks.base import CurvatureBlock, KroneckerBlock
from torch_kfac.blocks.embedding import EmbeddingBlock
from torch_kfac.linalg import add_to_diagonal, pi_adjustment, symmetric_eigh


class PrefixedState(MutableMapping[str, Tensor]):
    """A member block's view of its keys, stored with a prefix in the shared block's state."""

    def __init__(self, parent: dict[str, Tensor], prefix: str) -> None:
        self.parent, self.prefix = parent, prefix

    def __getitem__(self, key: str) -> Tensor:
        return self.parent[self.prefix + key]

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.parent[self.prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self.parent[self.prefix + key]

    def __iter__(self) -> Iterator[str]:
        return (k[len(self.prefix) :] for k in list(self.parent) if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def supports_tying(block: CurvatureBlock) -> bool:
    """Whether a block can be a member of a `TiedBlock` (ungrouped Linear-like or embedding)."""
    if isinstance(block, EmbeddingBlock):
        return True
    return (
        isinstance(block, KroneckerBlock)
        and block.groups == 1
        and block.approximation == "kfac"
        and block.weight.dim() == 2
    )


class TiedBlock(CurvatureBlock):
    """Curvature of a weight shared by two modules: the sum of their Kronecker terms."""

    def __init__(self, first: CurvatureBlock, second: CurvatureBlock) -> None:
        if first.weight is not second.weight:
            raise ValueError("TiedBlock members must share their weight tensor")
        self.members = [first, second]
        super().__init__(first.module, f"{first.name}+{second.name}")
        self.FACTORS = tuple(f"{i}:{k}" for i, m in enumerate(self.members) for k in m.FACTORS)  # type: ignore[misc]
        self.FORWARD_FACTORS = tuple(  # type: ignore[misc]
            f"{i}:{k}" for i, m in enumerate(self.members) for k in m.FORWARD_FACTORS
        )

    # The optimizer re-binds `state`; the members follow as prefixed views.
    @property
    def state(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Shared state: the members' factors (prefixed) and the cached solve."""
        return self._state

    @state.setter
    def state(self, value: dict[str, Tensor]) -> None:
        self._state = value
        for i, member in enumerate(self.members):
            member.state = PrefixedState(value, f"{i}:")  # type: ignore[assignment]

    def configure(
        self, approximation: str = "kfac", power: float = -1.0, kfac_approx: str = "expand"
    ) -> None:
        """Members keep the Kronecker approximation; only power -1 has an exact two-term solve."""
        if power != -1.0:
            raise ValueError(f"a tied weight ({self.name}) supports inverse_power=-1 only, got {power}")
        for member in self.members:
            member.configure("kfac", -1.0, kfac_approx)

    def hooked(self) -> list[CurvatureBlock]:
        """The members record their own statistics from their own modules."""
        return list(self.members)

    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """Nothing: the capture hooks the members (`hooked`), which record their own inputs."""

    def record_output_grad(self, grad_output: Tensor, reduction: str, center: bool = False) -> None:
        """Nothing: the members record their own output gradients."""

    # ----------------------------------------------------------------------- parameters
    @property
    def weight(self) -> Tensor:
        """The shared weight."""
        return self.members[0].weight

    def _biases(self) -> list[Tensor]:
        return [m.bias for m in self.members if m.bias is not None]

    def parameters(self) -> list[Tensor]:
        """The shared weight, then each member's bias."""
        return [self.weight, *self._biases()]

    def pack(self, tensors: list[Tensor]) -> Tensor:
        """X = [W | b_1 | b_2] (rows x (cols + biases))."""
        return torch.cat([tensors[0], *(b.unsqueeze(-1) for b in tensors[1:])], dim=-1)

    def unpack(self, mat: Tensor) -> list[Tensor]:
        """Inverse of `pack`."""
        cols = self.weight.shape[1]
        return [mat[:, :cols], *(mat[:, cols + i] for i in range(len(self._biases())))]

    # -------------------------------------------------------------------- statistics
    def _member(self, key: str) -> tuple[CurvatureBlock, str]:
        index, sub = key.split(":", 1)
        return self.members[int(index)], sub

    def has_pending(self, key: str) -> bool:
        """Delegated to the member."""
        member, sub = self._member(key)
        return member.has_pending(sub)

    def pending(self, key: str) -> Tensor:
        """Delegated to the member."""
        member, sub = self._member(key)
        return member.pending(sub)

    def clear_pending(self, keys: tuple[str, ...] | None = None) -> None:
        """Delegated to the members."""
        for i, member in enumerate(self.members):
            mine = None if keys is None else tuple(k.split(":", 1)[1] for k in keys if k.startswith(f"{i}:"))
            member.clear_pending(mine)

    def fold_pending(self, decay: float, taken: Tensor | None = None) -> None:
        """Both members fold their statistics."""
        for member in self.members:
            member.fold_pending(decay, taken)

    def has_factors(self) -> bool:
        """Both uses have been estimated."""
        return all(m.has_factors() for m in self.members)

    def follow_weight(self, dtype: torch.dtype) -> None:
        """Move the members' and the cached state to the weight's device and to `dtype`."""
        w = self.weight
        for key, value in list(self._state.items()):
            if value.device != w.device or (value.is_floating_point() and value.dtype != dtype):
                self._state[key] = value.to(device=w.device, dtype=dtype)

    # ------------------------------------------------------------------- the two terms
    def _terms(self) -> list[tuple[Tensor, Tensor]]:
        """(R_i, C_i) of both uses in the layout X = [W | biases], C_i embedded in all columns."""
        cols = self.weight.shape[1]
        width = cols + len(self._biases())
        terms, bias_col = [], cols
        for member in self.members:
            if isinstance(member, EmbeddingBlock):
                rows, inner = torch.diag(member.A), member.G
            else:
                rows, inner = member.G, member.A  # type: ignore[attr-defined]
            full = inner.new_zeros(width, width)
            full[:cols, :cols] = inner[:cols, :cols]
            if member.bias is not None:
                idx = [*range(cols), bias_col]
                full[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = inner
                bias_col += 1
            terms.append((rows, full))
        return terms

    def _damped_terms(self, damping: Tensor, pi_correction: bool) -> list[tuple[Tensor, Tensor]]:
        """Each term with factored damping lambda / 2 (pi-adjusted), so both are definite."""
        root = (damping / len(self.members)).sqrt()
        damped = []
        for rows, cols in self._terms():
            pi = pi_adjustment(rows, cols) if pi_correction else torch.ones((), dtype=rows.dtype)
            damped.append((add_to_diagonal(rows, pi * root), add_to_diagonal(cols, root / pi)))
        return damped

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Whiten by the first damped term, diagonalise the second (see the module docstring)."""
        (r1, c1), (r2, c2) = self._damped_terms(damping, pi_correction)
        l_r, l_c = _inverse_sqrt(r1), _inverse_sqrt(c1)
        s, u = symmetric_eigh(l_r @ r2 @ l_r)
        t, v = symmetric_eigh(l_c @ c2 @ l_c)
        self._state.update(
            tied_lr=l_r @ u, tied_lc=l_c @ v, tied_denom=1.0 + s.unsqueeze(-1) * t.unsqueeze(-2)
        )

    def has_inverses(self) -> bool:
        """Whether the whitened eigenbases are cached."""
        return "tied_denom" in self._state

    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """The exact solve of (R1 (x) C1 + R2 (x) C2) vec(X) = vec(M) with the damped terms."""
        left, right = self._state["tied_lr"], self._state["tied_lc"]
        return left @ ((left.mT @ mat @ right) / self._state["tied_denom"]) @ right.mT

    def curvature_product(self, mat: Tensor) -> Tensor:
        """R1 X C1 + R2 X C2, undamped."""
        return sum(rows @ mat @ cols for rows, cols in self._terms())  # type: ignore[return-value]

    def dense_curvature(self, damping: float = 0.0) -> Tensor:
        """sum_i kron(C_i, R_i) (vec = column stacking), for tests."""
        dense = sum(torch.kron(cols, rows) for rows, cols in self._terms())
        return add_to_diagonal(dense, damping)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        """The members and their factors."""
        parts = [f"{m.name}: {type(m).__name__} ({m.extra_repr()})" for m in self.members]
        return "tied weight; " + "; ".join(parts)


def _inverse_sqrt(matrix: Tensor) -> Tensor:
    """M^-1/2 of a symmetric positive definite matrix."""
    vals, vecs = torch.linalg.eigh(matrix)
    return (vecs * vals.rsqrt().unsqueeze(-2)) @ vecs.mT
