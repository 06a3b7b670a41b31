"""Curvature block for `nn.Embedding`: a Linear layer on one-hot inputs, with a diagonal input factor.

Looking up token v is multiplying its one-hot vector by W^T, W the (V, d) weight. As a Kronecker
block the "in" side is the V one-hot features and the "out" side the d embedding features:

* A = 1/(N T) sum_{n,t} onehot onehot^T is diagonal (the token frequencies) and is kept as a
  vector of length V, never as a V x V matrix;
* G = 1/N sum_{n,t} g g^T (d x d) is the usual second moment of the per-example output gradients,
  summed over the T positions that share the table (the `expand` convention).

The gradient matrix is M = grad^T (d, V), so (A (x) G + damping)^-1 vec(M) is
(G + d_G I)^-1 M diag(1 / (a + d_A)) and costs O(d^3 + d^2 V).

Tokens equal to `padding_idx` never touch the weight (their row's gradient is zero): they count as
all-zero one-hot vectors, i.e. they are left out of the token counts but not out of N T.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_kfac.blocks.base import Factor, WeightBiasBlock, centered, second_moment_scale
from torch_kfac.linalg import add_to_diagonal, damped_inverse, symmetric_eigh


class EmbeddingBlock(WeightBiasBlock):
    """K-FAC block of `nn.Embedding`; ids (N, *) share the table over the dims after the first.

    A 1-D tensor of ids is a batch of N single tokens. `sparse=True`, `max_norm` and
    `scale_grad_by_freq=True` are refused: their gradients are not the loss gradient that the
    curvature describes (or not dense). List such a module in `skip_modules` instead.
    """

    FACTORS = ("A", "G")
    FORWARD_FACTORS = ("A",)

    module: nn.Embedding

    def __init__(self, module: nn.Module, name: str = "") -> None:
        refusals = {
            "sparse": (
                bool(getattr(module, "sparse", False)),
                "sparse=True gives sparse gradients; K-FAC preconditions dense ones",
            ),
            "max_norm": (
                getattr(module, "max_norm", None) is not None,
                "max_norm renormalises looked-up rows in place during the forward pass, which the "
                "linear model of the lookup that K-FAC's curvature describes does not include",
            ),
            "scale_grad_by_freq": (
                bool(getattr(module, "scale_grad_by_freq", False)),
                "scale_grad_by_freq=True rescales the gradient by in-batch token counts, so it is "
                "no longer the loss gradient that the curvature describes",
            ),
        }
        for option, (refused, why) in refusals.items():
            if refused:
                raise ValueError(
                    f"nn.Embedding {name!r}: K-FAC does not support {option}: {why}; "
                    f"build the embedding without it or pass skip_modules=[{name!r}]"
                )
        super().__init__(module, name)
        self.configure()

    # -------------------------------------------------------------------- statistics
    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """N = dim 0 of the ids; 1 for a single (0-d) id."""
        ids = inputs[0]
        return int(ids.shape[0]) if ids.dim() > 0 else 1

    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """Add one call's token frequencies counts / (N T) to the pending diagonal A."""
        ids = inputs[0].detach().reshape(-1)
        self.batch_size = n = self.num_examples(inputs)
        weight = self.weight
        # One per position, zero for padding tokens (whose one-hot input does not reach W).
        hits = torch.ones_like(ids, dtype=weight.dtype)
        if self.module.padding_idx is not None:
            hits = hits * (ids != self.module.padding_idx).to(weight.dtype)
        # index_add_ rather than bincount: no host synchronisation to size the result.
        counts = weight.new_zeros(weight.shape[0]).index_add_(0, ids, hits)
        freq = counts / max(ids.numel(), 1)
        if center:
            # Diagonal of the centered covariance E[x x^T] - mu mu^T of one-hot x with mean mu = freq.
            freq = freq - freq * freq
        self.add_forward_statistic("A", freq, n)

    def record_output_grad(self, grad_output: Tensor, reduction: str, center: bool = False) -> None:
        """Add one call's per-example-gradient second moment 1/N sum g g^T to the pending G."""
        g = grad_output.detach()
        n = int(g.shape[0]) if g.dim() > 1 else 1
        rows = g.reshape(-1, g.shape[-1])
        if center:
            rows = centered(rows)
        # Summed over the calls of one backward pass (a shared table counts like more positions).
        scale = second_moment_scale(reduction, n, self.loss_terms)
        self.add_backward_statistic("G", rows.mT @ rows * scale, n)

    # ----------------------------------------------------------------------- factors
    A = Factor("The diagonal input factor as a vector of V token frequencies.")
    G = Factor("Output-gradient factor E[g g^T] of the per-example loss, (d, d).")

    # ---------------------------------------------------------------- preconditioning
    def configure(
        self, approximation: str = "kfac", power: float = -1.0, kfac_approx: str = "expand"
    ) -> None:
        """Set the matrix power (-1: natural gradient, -1/2: square root) of the preconditioner.

        `approximation` chooses among approximations of Linear/Conv blocks and leaves this one
        unchanged. The expand rule is kept whatever `kfac_approx` says: under 'reduce' the
        averaged one-hot inputs would make A a dense V x V matrix.
        """
        self.power = float(power)

    @staticmethod
    def factored_damping(a: Tensor, g: Tensor, damping: Tensor, pi_correction: bool) -> tuple[Tensor, Tensor]:
        """The shifts (pi sqrt(l), sqrt(l) / pi) of factored damping, tr A / dim A = mean of the vector a."""
        root = damping.sqrt()
        if not pi_correction:
            return root, root
        ratio = a.mean() / g.diagonal().mean()
        # As `linalg.pi_adjustment`: pi = 1 where the ratio is not a positive finite number.
        ok = torch.isfinite(ratio) & (ratio > 0)
        pi = torch.where(ok, ratio, torch.ones_like(ratio)).sqrt()
        return pi * root, root / pi

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Refresh 1/(a + d_A) and (G + d_G I)^-1 ('cholesky', power -1) or G's eigendecomposition."""
        a, g = self._factor("A"), self._factor("G")
        self.drop_state(("A_inv", "G_inv", "A_eigvals", "G_eigvals", "G_eigvecs"))
        if method == "cholesky" and self.power == -1.0:
            a_damp, g_damp = self.factored_damping(a, g, damping, pi_correction)
            self.state["A_inv"] = 1.0 / (a + a_damp)
            self.state["G_inv"] = damped_inverse(g, g_damp)
        else:
            # A is diagonal: its eigenvalues are its entries, its eigenvectors the identity.
            self.state["A_eigvals"] = a.clamp(min=0.0)
            self.state["G_eigvals"], self.state["G_eigvecs"] = symmetric_eigh(g)

    def has_inverses(self) -> bool:
        """Whether cached inverses or an eigendecomposition are available."""
        return "A_inv" in self.state or "G_eigvecs" in self.state

    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """(A (x) G + damping)^power applied to M (d, V), with A diagonal: no V x V matrix is formed."""
        if "A_inv" in self.state:
            return self.state["G_inv"] @ mat * self.state["A_inv"]
        qg, lg, la = self.state["G_eigvecs"], self.state["G_eigvals"], self.state["A_eigvals"]
        rotated = qg.mT @ mat
        if damping_type == "exact":
            denom = lg.unsqueeze(-1) * la + damping
        else:
            a_damp, g_damp = self.factored_damping(
                self._factor("A"), self._factor("G"), damping, pi_correction
            )
            denom = (lg.unsqueeze(-1) + g_damp) * (la + a_damp)
        return qg @ (rotated * denom.pow(self.power))

    def curvature_product(self, mat: Tensor) -> Tensor:
        """(A (x) G) vec(M) as a matrix: G M diag(a), undamped."""
        return self._factor("G") @ mat * self._factor("A")

    def dense_curvature(self, damping: float = 0.0) -> Tensor:
        """kron(diag(a), G) as a dense (V d, V d) matrix (vec = column stacking), for tests and tiny V."""
        return add_to_diagonal(torch.kron(torch.diag(self.A), self.G), damping)

    # ------------------------------------------------------------------------- layout
    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """The (V, d) weight-shaped tensor as M = W^T, (d, V): output features by one-hot inputs."""
        return weight_like.mT

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of `to_matrix`: the (V, d) weight-shaped tensor; an embedding has no bias."""
        return mat.mT, None

    def extra_repr(self) -> str:
        """Factor shapes and memory, for the registration report."""
        vocab, dim = self.weight.shape
        size = (vocab + dim * dim) * self.weight.element_size()
        return f"A diagonal {vocab}, G {dim}x{dim}, {size / 2**20:.2f} MiB per factor set"
