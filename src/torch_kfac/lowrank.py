"""Preconditioning an `nn.Linear` gradient from its rows (option `low_rank_gradients`).

A Linear layer's gradient is M = sum_r g_r a~_r^T over the rows r (examples times positions) of
its inputs a~ = [a, 1] and output gradients g, in every call whose backward pass reached it. With
K-FAC's Cholesky inverses, G^-1 M A^-1 = (R_g G^-1)^T (R_a A^-1) for the stacked rows R_g
(rows x d_out) and R_a (rows x d_in): rows (d_out^2 + d_in^2 + d_out d_in) multiply-adds instead
of d_out d_in (d_out + d_in), fewer when the rows are fewer than the widths (small batches, wide
layers; benchmarks/README.md, "Low-rank preconditioning").

`RowCapture` keeps the rows of the user's passes until the step; `verified_rows` uses them only
where they reproduce the gradient the step preconditions: it compares M v with R_g^T (R_a v) for
random v, for every layer at once with one host read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from torch_kfac.blocks.base import CurvatureBlock, KroneckerBlock
from torch_kfac.blocks.kronecker import KroneckerFactors
from torch_kfac.blocks.linear import LinearBlock

#: Random directions of the probe: a difference D = M - c R_g^T R_a escapes it only if |D v| is
#: far below |D| for both, which for Gaussian v has probability below 1e-4 at a 100-fold margin.
_PROBES = 2

#: What `verified_rows` does with a layer: precondition from its rows, drop it for good (its rows
#: do not reproduce its gradient), or use the dense product this step (a non-finite gradient: the
#: step is skipped anyway).
_USE, _DROP, _SKIP = 0, 1, 2


def cheaper(rows: int, d_out: int, d_in: int) -> bool:
    """Whether preconditioning from `rows` rows takes fewer multiply-adds than the dense product."""
    return rows * (d_out * d_out + d_in * d_in + d_out * d_in) < d_out * d_in * (d_out + d_in)


def _widths(block: KroneckerBlock) -> tuple[int, int]:
    """(d_out, d_in) of a Linear block's gradient matrix, the bias column counted in d_in."""
    weight = block.weight
    return int(weight.shape[0]), int(weight.shape[1]) + (block.bias is not None)


class RowCapture:
    """Keeps the input and output-gradient rows of the eligible Linear layers' calls until the step.

    A layer is eligible with the 'kfac' approximation (plain `KroneckerFactors`: EKFAC's eigenbasis
    scaling cannot precondition from rows); it stops being watched once its rows failed to
    reproduce its gradient (`drop`). A layer whose rows of one step outnumber those at which the
    dense product is cheaper keeps none for that step.
    """

    def __init__(self, blocks: Iterable[CurvatureBlock]) -> None:
        self.blocks = {b for b in blocks if isinstance(b, LinearBlock) and type(b.approx) is KroneckerFactors}
        #: Per layer, the (inputs, output gradients) rows of each call since the last step; None:
        #: too many rows this step.
        self.rows: dict[CurvatureBlock, list[tuple[Tensor, Tensor]] | None] = {}

    def watch(self, block: CurvatureBlock, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """Pair a forward call's input rows with its output gradient, when its backward pass comes."""
        if block not in self.blocks or self.rows.get(block, []) is None:
            return
        assert isinstance(block, LinearBlock)
        a_rows = block.activation_rows(inputs).detach()
        a_rows = a_rows.reshape(-1, a_rows.shape[-1])
        if cheaper(a_rows.shape[0], *_widths(block)):
            output.register_hook(partial(self._pair, block, a_rows))

    def _pair(self, block: LinearBlock, a_rows: Tensor, grad: Tensor) -> None:
        kept = self.rows.setdefault(block, [])
        if kept is None:
            return
        kept.append((a_rows, block.output_grad_rows(grad.detach()).reshape(a_rows.shape[0], -1)))
        if not cheaper(sum(a.shape[0] for a, _ in kept), *_widths(block)):
            self.rows[block] = None

    def drop(self, block: CurvatureBlock) -> None:
        """Stop watching a layer (its rows did not reproduce its gradient)."""
        self.blocks.discard(block)

    def clear(self) -> None:
        """Forget the rows kept since the last step."""
        self.rows = {}


@dataclass
class GradientRows:
    """A gradient matrix `mat` (1, d_out, d_in) and rows with mat = g_rows^T a_rows (leading 1s)."""

    mat: Tensor
    g_rows: Tensor
    a_rows: Tensor


def verified_rows(
    capture: RowCapture,
    mats: dict[str, Tensor],
    blocks: dict[str, CurvatureBlock],
    dtype: torch.dtype,
    generator: torch.Generator,
) -> dict[CurvatureBlock, GradientRows]:
    """The layers whose kept rows reproduce their gradient matrix in `mats`, up to one factor.

    The probe runs in `dtype` (the factors'). The factor c (a loss scale, clipping by norm,
    reduction='sum''s 1/N) is fitted on it; a relative residual above sqrt(eps) of the gradient's
    dtype (its roundoff is far below that) drops the layer from `capture` for good. Consumes the
    kept rows. A zero gradient passes with zero rows.
    """
    candidates = []
    for name, mat in mats.items():
        kept = capture.rows.get(blocks[name])
        if kept and blocks[name] in capture.blocks:
            candidates.append((name, mat, kept))
    capture.clear()
    if not candidates:
        return {}
    verdicts, fitted = [], []
    for name, mat, kept in candidates:
        tolerance = torch.finfo(mat.dtype).eps ** 0.5  # the gradient's own precision
        a_rows = torch.cat([a for a, _ in kept]).to(dtype)
        g_rows = torch.cat([g for _, g in kept]).to(dtype)
        if blocks[name].bias is not None:
            a_rows = torch.cat([a_rows, a_rows.new_ones(a_rows.shape[0], 1)], dim=1)
        m = mat[0].to(dtype)
        v = torch.randn(m.shape[1], _PROBES, generator=generator, device=m.device, dtype=dtype)
        mv, rv = m @ v, g_rows.mT @ (a_rows @ v)
        rr = (rv * rv).sum()
        c = torch.where(rr > 0, (mv * rv).sum() / rr, 1.0)
        residual = torch.linalg.vector_norm(mv - c * rv)
        exact = residual <= tolerance * torch.linalg.vector_norm(mv)
        finite = torch.isfinite(mv).all() & torch.isfinite(rv).all()
        verdicts.append(torch.where(finite, torch.where(exact, _USE, _DROP), _SKIP))
        fitted.append((name, mat, c * g_rows, a_rows))
    verified = {}
    read = torch.stack(verdicts).tolist()  # the one host read
    for verdict, (name, mat, g_rows, a_rows) in zip(read, fitted, strict=True):
        block = blocks[name]
        if verdict == _USE:
            verified[block] = GradientRows(mat, g_rows.unsqueeze(0), a_rows.unsqueeze(0))
        elif verdict == _DROP:
            capture.drop(block)
    return verified
