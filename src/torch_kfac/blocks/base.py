"""The Kronecker-factored curvature block shared by every weight-matrix layer.

A block approximates the per-example-loss Fisher of one layer's weight (and bias) as A (x) G:
A is the second moment of the layer's inputs a~ = [a, 1] (the 1 only with a bias) and G that of
the per-example gradients g of the loss with respect to the layer's outputs. A layer family only
says how its inputs and output gradients become rows of a~ and g (`activation_rows`,
`output_grad_rows`); the statistics, the factors' running averages, the damped inverses and the
preconditioning live here.

Weight sharing (sequence positions, convolution locations) follows the `expand` convention of
Eschenhagen et al. (2023) and Grosse & Martens (2016): with T shared positions per example,
A = 1/(N T) sum_{n,t} a~ a~^T and G = 1/N sum_{n,t} g g^T.

Grouped layers are block-diagonal: every tensor carries a leading group dimension internally;
`A` and `G` drop it when there is a single group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from torch_kfac.linalg import (
    add_to_diagonal,
    damped_inverse,
    in_eigenbasis,
    kronecker_eigenvalues,
    pi_adjustment,
    symmetric_eigh,
)

#: How the loss was reduced: 'mean' over the batch, 'sum', or 'mean_positions' (averaged over the
#: batch and over each example's T loss terms, e.g. tokens of a sequence or pixels of a mask).
REDUCTIONS = ("mean", "sum", "mean_positions")


def second_moment_scale(reduction: str, batch_size: int, loss_terms: int = 1) -> float:
    """s with G = s * sum g g^T over the rows g of dL/d(output) of one call.

    The factors are second moments of per-loss-term gradients: with N examples, a 'mean' loss
    has per-example gradients N g, so G = (1/N) sum (N g)(N g)^T; 'sum' has G = (1/N) sum g g^T;
    'mean_positions' has N T loss terms with gradients N T g, so G = (1/(N T)) sum (N T g)(N T g)^T.
    """
    if reduction == "sum":
        return 1.0 / batch_size
    if reduction == "mean":
        return float(batch_size)
    return float(batch_size * loss_terms)


def _graph_task_id() -> int | None:
    """Id of the backward pass now running (None where PyTorch does not expose it)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    task = current() if current is not None else -1
    return None if task < 0 else int(task)


class CurvatureBlock:
    """What the optimizer needs from a curvature block: statistics in, preconditioning out.

    A block handles the parameters (`weight`, optional `bias`) of one module. It records
    statistics from the module's inputs (forward) and output gradients (backward), folds them into
    zero-debiased running factors named in `FACTORS` (kept in `state` as `<name>_ema` and
    `<name>_weight`), refreshes cached inverses, and multiplies gradients laid out by `to_matrix`
    by its damped inverse curvature.
    """

    #: Names of the running factors.
    FACTORS: ClassVar[tuple[str, ...]] = ()
    #: The factors fed by the forward pass (cleared when `track_forward()` starts a new pass).
    FORWARD_FACTORS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, module: nn.Module, name: str = "") -> None:
        self.module = module
        self.name = name
        self.groups = int(getattr(module, "groups", 1))
        #: Running factors and cached inverses; the optimizer stores this dict in its `state`.
        self.state: dict[str, Tensor] = {}
        self._pending: dict[str, list[Tensor]] = {k: [] for k in self.FACTORS}
        self._pending_task: dict[str, int | None] = {}
        #: Number of examples in the last batch seen by the layer (dim 0 of its input).
        self.batch_size: int | None = None
        #: Loss terms per example (for reduction='mean_positions'), set by the preconditioner.
        self.loss_terms = 1
        #: The loss's reduction and centering, set by the preconditioner.
        self.reduction = "mean"
        self.center = False
        #: Set by the capture: whether backward statistics are recorded right now (blocks that
        #: hook tensors themselves check it in their hooks).
        self.backward_gate: Callable[[], bool] | None = None

    # --------------------------------------------------------------------- to implement
    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """Record the forward statistics of one call."""
        raise NotImplementedError

    def record_output_grad(self, grad_output: Tensor, reduction: str, center: bool = False) -> None:
        """Record the backward statistics of one call (`reduction` of the loss over the batch)."""
        raise NotImplementedError

    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Refresh the cached inverses from the current factors."""
        raise NotImplementedError

    def has_inverses(self) -> bool:
        """Whether `precondition` can run."""
        raise NotImplementedError

    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """Damped inverse curvature times a gradient in `to_matrix` layout."""
        raise NotImplementedError

    def curvature_product(self, mat: Tensor) -> Tensor:
        """Undamped curvature times a tensor in `to_matrix` layout."""
        raise NotImplementedError

    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """Weight- and bias-shaped tensors in the block's layout."""
        raise NotImplementedError

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of `to_matrix`: the weight-shaped and bias-shaped parts."""
        raise NotImplementedError

    def pack(self, tensors: list[Tensor]) -> Tensor:
        """One tensor per parameter (in `parameters()` order) in the block's layout.

        Blocks of modules with other parameters than weight and bias override `parameters`,
        `pack` and `unpack`.
        """
        return self.to_matrix(tensors[0], tensors[1] if len(tensors) > 1 else None)

    def unpack(self, mat: Tensor) -> list[Tensor]:
        """Inverse of `pack`: one tensor per parameter, in `parameters()` order."""
        return [t for t in self.from_matrix(mat) if t is not None]

    def configure(
        self, approximation: str = "kfac", power: float = -1.0, kfac_approx: str = "expand"
    ) -> None:
        """Apply the preconditioner's approximation options; blocks use what applies to them."""
        self.power = float(power)

    def unhandled_parameters(self) -> dict[str, str]:
        """Parameters of the module (names relative to it) left to the plain update, with the reason."""
        return {}

    def hooked(self) -> list[CurvatureBlock]:
        """The blocks whose modules the capture hooks: this one, or the members of a composite."""
        return [self]

    def before_forward(self, recording: bool, keep: list[Tensor] | None) -> None:
        """Called before each forward call of the module, for blocks that record internally.

        Such a block records its statistics itself during the call when `recording` (it has the
        `reduction`, `center` and `loss_terms` attributes for that), and appends the tensors at
        which its backward statistics are taken to `keep` when that is a list: the
        preconditioner's own Fisher passes backpropagate to them.
        """

    def remove(self) -> None:
        """Undo anything the block attached to its module (called by `close()`)."""

    @property
    def needs_output_grads(self) -> bool:
        """Whether the block records statistics in the backward pass."""
        return True

    def extra_repr(self) -> str:
        """Factor shapes and memory, for the registration report."""
        parts = [f"{k} {tuple(self.state[f'{k}_ema'].shape)}" for k in self.FACTORS if self.has_factor(k)]
        return ", ".join(parts) or "no factors yet"

    # ------------------------------------------------------------------------ shared
    def num_examples(self, inputs: tuple[Tensor, ...]) -> int:
        """Number of examples N in a call's inputs (dim 0 of the first input)."""
        return int(inputs[0].shape[0])

    # ----------------------------------------------------------------------- parameters
    @property
    def weight(self) -> Tensor:
        """The weight parameter."""
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        """The bias parameter, if the layer has one."""
        bias = getattr(self.module, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    def parameters(self) -> list[Tensor]:
        """The parameters this block preconditions."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def grad_matrix(self) -> Tensor | None:
        """The current gradient in the block's layout, or None if no parameter has one."""
        params = self.parameters()
        if all(p.grad is None for p in params):
            return None
        return self.pack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])

    def add_backward_statistic(self, key: str, value: Tensor) -> None:
        """Pend a backward statistic: summed within one backward pass, averaged across passes.

        A module called several times in one forward pass shares its weight like positions of
        a sequence (the expand convention), so its output-gradient statistics add up; separate
        backward passes (micro-batches, Monte-Carlo samples) are averaged.
        """
        task = _graph_task_id()
        pending = self._pending[key]
        if pending and task is not None and self._pending_task.get(key) == task:
            pending[-1] = pending[-1] + value
        else:
            pending.append(value)
            self._pending_task[key] = task

    def has_pending(self, key: str) -> bool:
        """Whether statistics for factor `key` wait to be folded in."""
        return bool(self._pending[key])

    def pending(self, key: str) -> Tensor:
        """The pending statistics of factor `key`, averaged over the calls recorded."""
        items = self._pending[key]
        return items[0] if len(items) == 1 else torch.stack(items).mean(0)

    def clear_pending(self, keys: tuple[str, ...] | None = None) -> None:
        """Drop pending statistics (of the given factors, or all)."""
        for k in self.FACTORS if keys is None else keys:
            self._pending[k] = []

    def fold_pending(self, decay: float) -> None:
        """Fold the pending statistics into the zero-debiased running averages."""
        for key in self.FACTORS:
            if not self._pending[key]:
                continue
            batch = self.pending(key)
            ema, weight = self.state.get(f"{key}_ema"), self.state.get(f"{key}_weight")
            if ema is None or weight is None:
                ema = torch.zeros_like(batch)
                weight = batch.new_zeros(())
            self.state[f"{key}_ema"] = ema.lerp_(batch, 1.0 - decay)
            self.state[f"{key}_weight"] = weight.mul_(decay).add_(1.0 - decay)
            self._pending[key] = []

    def follow_weight(self) -> None:
        """Move the state to the parameters' device and dtype (after `model.to(...)`)."""
        w = self.parameters()[0]
        for key, value in self.state.items():
            if value.device != w.device or (value.is_floating_point() and value.dtype != w.dtype):
                self.state[key] = value.to(device=w.device, dtype=w.dtype)

    def has_factors(self) -> bool:
        """Whether every factor has been estimated at least once."""
        return all(self.has_factor(k) for k in self.FACTORS)

    def has_factor(self, key: str) -> bool:
        """Whether factor `key` has been estimated at least once."""
        return f"{key}_ema" in self.state

    def _factor(self, key: str) -> Tensor:
        return self.state[f"{key}_ema"] / self.state[f"{key}_weight"]


class KroneckerBlock(CurvatureBlock):
    """Curvature block F ~ A (x) G for a module with a `weight` of shape (out, ...) and optional `bias`.

    Subclass it for a new module type, implement `activation_rows` and `output_grad_rows`, and
    register it with `torch_kfac.register_block`.
    """

    FACTORS = ("A", "G")
    FORWARD_FACTORS = ("A",)

    def __init__(self, module: nn.Module, name: str = "") -> None:
        if not isinstance(getattr(module, "weight", None), Tensor):
            raise TypeError(f"{type(module).__name__} {name!r} has no weight tensor for K-FAC")
        super().__init__(module, name)
        self.configure()

    # ----------------------------------------------------------------- layer-specific hooks
    def activation_rows(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """The layer's inputs as rows a, shape (groups, N, T, d_in) without the bias column."""
        raise NotImplementedError

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Output gradients as rows g, shape (groups, N, T, d_out)."""
        raise NotImplementedError

    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """Stack a weight-shaped and a bias-shaped tensor into matrices (groups, d_out, d_in [+1])."""
        out = weight_like.shape[0]
        mat = weight_like.reshape(self.groups, out // self.groups, -1)
        if bias_like is not None:
            mat = torch.cat([mat, bias_like.reshape(self.groups, -1, 1)], dim=-1)
        return mat

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of `to_matrix`: the weight-shaped and bias-shaped parts of a matrix."""
        if self.bias is None:
            return mat.reshape(self.weight.shape), None
        return mat[..., :-1].reshape(self.weight.shape), mat[..., -1].reshape(self.bias.shape)

    # -------------------------------------------------------------------- statistics
    def configure(
        self, approximation: str = "kfac", power: float = -1.0, kfac_approx: str = "expand"
    ) -> None:
        """Choose the curvature approximation, the matrix power and the weight-sharing rule.

        'kfac': A (x) G. 'ekfac' (George et al. 2018): the eigenbasis of A (x) G with its diagonal
        re-estimated from per-example gradients. 'diagonal': the exact diagonal of the Fisher,
        E[(per-example gradient)^2]. 'forward-only' (Benzing 2022): A (x) I, no backward
        statistics. `power` is -1 (natural gradient) or -1/2. `kfac_approx` (Eschenhagen et al.
        2023) for weights shared over T positions: 'expand' treats positions like examples
        (A averages a a^T over them, G sums g g^T); 'reduce' averages the inputs and sums the
        output gradients over positions first, then takes second moments over examples.
        """
        self.approximation = approximation
        self.power = power
        self.kfac_approx = kfac_approx
        factors = {"kfac": ("A", "G"), "ekfac": ("A", "G", "S"), "diagonal": ("D",), "forward-only": ("A",)}
        self.FACTORS = factors[approximation]  # type: ignore[misc]
        self.FORWARD_FACTORS = ("A",) if "A" in self.FACTORS else ()  # type: ignore[misc]
        self._pending = {k: [] for k in self.FACTORS}
        self._saved_rows: list[Tensor] = []

    @property
    def needs_output_grads(self) -> bool:
        """Whether backward statistics are used (not for the forward-only approximation)."""
        return self.approximation != "forward-only"

    def _joint_statistics(self) -> bool:
        """Whether a backward statistic pairs output gradients with that call's inputs."""
        return self.approximation == "diagonal" or (
            self.approximation == "ekfac" and "A_eigvecs" in self.state
        )

    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """Add one call's contribution 1/(N T) sum a~ a~^T to the pending A statistics.

        EKFAC and the diagonal also keep the call's rows until its backward pass.
        """
        rows = self.activation_rows(inputs).detach()
        if self.kfac_approx == "reduce":
            rows = rows.mean(dim=2, keepdim=True)
        groups, n, t, _ = rows.shape
        self.batch_size = n
        flat = rows.reshape(groups, n * t, -1)
        if center:
            flat = flat - flat.mean(dim=1, keepdim=True)
        if self._joint_statistics():
            kept = flat.reshape(groups, n, t, -1)
            if self.bias is not None:
                kept = torch.cat([kept, kept.new_ones(groups, n, t, 1)], dim=-1)
            self._saved_rows.append(kept)
        if "A" not in self.FACTORS:
            return
        moment = flat.mT @ flat
        if self.bias is not None:
            # [a, 1] without copying the rows: [[sum a a^T, sum a], [sum a^T, NT]].
            col = flat.sum(dim=1).unsqueeze(-1)
            corner = col.new_full((groups, 1, 1), float(n * t))
            moment = torch.cat([torch.cat([moment, col], -1), torch.cat([col.mT, corner], -1)], -2)
        self._pending["A"].append(moment / (n * t))

    def record_output_grad(self, grad_output: Tensor, reduction: str, center: bool = False) -> None:
        """Add one call's per-example-gradient second moment 1/N sum g g^T to the pending G.

        EKFAC adds the squared per-example gradients in the current eigenbasis to S, the
        diagonal approximation the squared per-example gradients to D.
        """
        if not self.needs_output_grads:
            return
        rows = self.output_grad_rows(grad_output).detach()
        if self.kfac_approx == "reduce":
            rows = rows.sum(dim=2, keepdim=True)
        groups, n, t, _ = rows.shape
        flat = rows.reshape(groups, n * t, -1)
        if center:
            flat = flat - flat.mean(dim=1, keepdim=True)
        scale = second_moment_scale(reduction, n, self.loss_terms)
        if "G" in self.FACTORS:
            self.add_backward_statistic("G", flat.mT @ flat * scale)
        if not self._saved_rows:
            return
        # Backward runs in reverse order of the forward calls.
        a_rows = self._saved_rows.pop()
        g_rows = flat.reshape(groups, n, t, -1)
        if self.approximation == "ekfac":
            squares = per_example_squares(a_rows, g_rows, self.state["A_eigvecs"], self.state["G_eigvecs"])
            self.add_backward_statistic("S", squares * scale)
        else:
            self.add_backward_statistic("D", per_example_squares(a_rows, g_rows) * scale)

    def clear_pending(self, keys: tuple[str, ...] | None = None) -> None:
        """Drop pending statistics (of the given factors, or all) and rows kept for them."""
        super().clear_pending(keys)
        if keys is None or "A" in keys:
            self._saved_rows = []

    def has_factors(self) -> bool:
        """Whether the factors the preconditioner is built from have been estimated."""
        return all(self.has_factor(k) for k in self.FACTORS if k != "S")

    @property
    def A(self) -> Tensor:
        """Input factor E[a~ a~^T] (bias folded in as the last row and column)."""
        a = self._factor("A")
        return a[0] if self.groups == 1 else a

    @A.setter
    def A(self, value: Tensor) -> None:
        self._set_factor("A", value)

    @property
    def G(self) -> Tensor:
        """Output-gradient factor E[g g^T] of the per-example loss."""
        g = self._factor("G")
        return g[0] if self.groups == 1 else g

    @G.setter
    def G(self, value: Tensor) -> None:
        self._set_factor("G", value)

    def _set_factor(self, key: str, value: Tensor) -> None:
        value = value.detach().clone()
        if value.dim() == 2:
            value = value.unsqueeze(0)
        self.state[f"{key}_ema"] = value
        self.state[f"{key}_weight"] = value.new_ones(())

    # ---------------------------------------------------------------- preconditioning
    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Refresh the cached inverses ('cholesky') or eigendecompositions ('eigh').

        With 'cholesky' the damping is baked into the inverses; with 'eigh' it is applied at
        preconditioning time, so a new damping takes effect at once. EKFAC restarts its
        eigenbasis diagonal S from the Kronecker eigenvalues whenever the basis changes.
        """
        for key in ("A_inv", "G_inv", "A_eigvals", "A_eigvecs", "G_eigvals", "G_eigvecs"):
            self.state.pop(key, None)
        if self.approximation == "diagonal":
            return
        a = self._factor("A")
        g = self._factor("G") if "G" in self.FACTORS else None
        if method == "cholesky" and self.approximation != "ekfac":
            if g is None:
                self.state["A_inv"] = damped_inverse(a, damping)
                return
            a_damp, g_damp = self.factored_damping(a, g, damping, pi_correction)
            self.state["A_inv"] = damped_inverse(a, a_damp)
            self.state["G_inv"] = damped_inverse(g, g_damp)
            return
        self.state["A_eigvals"], self.state["A_eigvecs"] = symmetric_eigh(a)
        if g is not None:
            self.state["G_eigvals"], self.state["G_eigvecs"] = symmetric_eigh(g)
        if self.approximation == "ekfac":
            self._saved_rows = []  # rows kept for the old basis
            self._pending["S"] = []
            self.state["S_ema"] = self.state["G_eigvals"].unsqueeze(-1) * self.state["A_eigvals"].unsqueeze(
                -2
            )
            self.state["S_weight"] = self.state["S_ema"].new_ones(())

    @staticmethod
    def factored_damping(a: Tensor, g: Tensor, damping: Tensor, pi_correction: bool) -> tuple[Tensor, Tensor]:
        """The diagonal shifts (pi sqrt(l), sqrt(l) / pi) of factored Tikhonov damping."""
        root = damping.sqrt()
        if not pi_correction:
            return root, root
        pi = pi_adjustment(a, g)
        return pi * root, root / pi

    def has_inverses(self) -> bool:
        """Whether a cached inverse, eigendecomposition or diagonal is available."""
        if self.approximation == "diagonal":
            return self.has_factor("D")
        return "A_inv" in self.state or "A_eigvecs" in self.state

    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """Multiply gradient matrices by the damped curvature raised to `power` (-1 or -1/2)."""
        power = self.power
        if self.approximation == "diagonal":
            return mat * (self._factor("D") + damping).pow(power)
        if "A_inv" in self.state:  # Cholesky inverses, power -1
            right = mat @ self.state["A_inv"]
            return self.state["G_inv"] @ right if "G_inv" in self.state else right
        qa, la = self.state["A_eigvecs"], self.state["A_eigvals"]
        if self.approximation == "forward-only":
            return ((mat @ qa) * (la + damping).pow(power).unsqueeze(-2)) @ qa.mT
        qg, lg = self.state["G_eigvecs"], self.state["G_eigvals"]
        if self.approximation == "ekfac":
            eigvals = self._factor("S") + damping
        else:
            shifts = None
            if damping_type != "exact":
                shifts = self.factored_damping(self._factor("A"), self._factor("G"), damping, pi_correction)
            eigvals = kronecker_eigenvalues(la, lg, damping, shifts)
        return in_eigenbasis(mat, qa, qg, eigvals.pow(power))

    def curvature_product(self, mat: Tensor) -> Tensor:
        """The undamped curvature of the chosen approximation applied to matrices."""
        if self.approximation == "diagonal":
            return self._factor("D") * mat
        if self.approximation == "forward-only":
            return mat @ self._factor("A")
        if self.approximation == "ekfac" and self.has_factor("S"):
            qa, qg = self.state["A_eigvecs"], self.state["G_eigvecs"]
            return qg @ ((qg.mT @ mat @ qa) * self._factor("S")) @ qa.mT
        return self._factor("G") @ mat @ self._factor("A")

    def dense_curvature(self, damping: float = 0.0) -> Tensor:
        """The block's curvature as a dense matrix (vec = column stacking), for tests and small layers."""
        if self.groups != 1:
            raise ValueError("dense_curvature is defined for ungrouped blocks only")
        d_out = self.weight.shape[0]
        if self.approximation == "diagonal":
            dense = torch.diag(self._factor("D")[0].mT.reshape(-1))
        elif self.approximation == "forward-only":
            dense = torch.kron(self.A, torch.eye(d_out, dtype=self.A.dtype, device=self.A.device))
        elif self.approximation == "ekfac" and self.has_factor("S"):
            basis = torch.kron(self.state["A_eigvecs"][0], self.state["G_eigvecs"][0])
            dense = basis @ torch.diag(self._factor("S")[0].mT.reshape(-1)) @ basis.T
        else:
            dense = torch.kron(self.A, self.G)
        return add_to_diagonal(dense, damping)

    def extra_repr(self) -> str:
        """Factor shapes and memory, for the registration report."""
        d_out = self.weight.shape[0] // self.groups
        d_in = self.weight[0].numel() + (self.bias is not None)
        numel = self.groups * (d_in * d_in + d_out * d_out)
        size = numel * self.weight.element_size()
        grp = f" x {self.groups} groups" if self.groups > 1 else ""
        return f"A {d_in}x{d_in}, G {d_out}x{d_out}{grp}, {size / 2**20:.2f} MiB per factor set"


def per_example_squares(
    a_rows: Tensor, g_rows: Tensor, qa: Tensor | None = None, qg: Tensor | None = None, chunk: int = 64
) -> Tensor:
    """sum_n (Q_G^T W_n Q_A)^2 with W_n = sum_t g_nt a_nt^T the per-example gradient matrices.

    a_rows (groups, N, T, d_in), g_rows (groups, N, T, d_out); without bases Q the squares of
    W_n themselves. Without shared positions (T = 1) this is one product of squared rows;
    otherwise per-example gradients are formed `chunk` examples at a time to bound memory.
    """
    if qa is not None and qg is not None:
        a_rows, g_rows = a_rows @ qa.unsqueeze(1), g_rows @ qg.unsqueeze(1)
    if a_rows.shape[2] == 1:
        return g_rows[:, :, 0].square().mT @ a_rows[:, :, 0].square()
    total = g_rows.new_zeros(g_rows.shape[0], g_rows.shape[-1], a_rows.shape[-1])
    for start in range(0, a_rows.shape[1], chunk):
        grads = g_rows[:, start : start + chunk].mT @ a_rows[:, start : start + chunk]
        total += grads.square().sum(1)
    return total
