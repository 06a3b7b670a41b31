"""The block protocols: `CurvatureBlock` (what the optimizer needs), `KroneckerBlock` (weight matrices).

A block approximates the per-example-loss Fisher of one layer's parameters. `CurvatureBlock` is the
abstract protocol: statistics in (`record_inputs`, `record_output_grad`), running factors folded
into zero-debiased averages, cached inverses refreshed, gradients preconditioned.

`KroneckerBlock` is the base of every weight-matrix layer (Linear, Conv, ConvTranspose, your own):
a layer family only says how its inputs and output gradients become rows a~ = [a, 1] (the 1 only
with a bias) and g (`activation_rows`, `output_grad_rows`); the block turns the rows into
statistics, and its `Approximation` (K-FAC's A (x) G, EKFAC, the diagonal, forward-only; see
`approximation.py`) says which statistics are kept and how they precondition.

Weight sharing (sequence positions, convolution locations) follows the `expand` convention of
Eschenhagen et al. (2023) and Grosse & Martens (2016): with T shared positions per example,
A = 1/(N T) sum_{n,t} a~ a~^T and G = 1/N sum_{n,t} g g^T.

Grouped layers are block-diagonal: every tensor carries a leading group dimension internally;
`A` and `G` drop it when there is a single group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from torch_kfac.blocks.approximation import Approximation
from torch_kfac.blocks.diagonal import DiagonalFisher
from torch_kfac.blocks.ekfac import EigenbasisDiagonal
from torch_kfac.blocks.forward_only import ForwardOnly
from torch_kfac.blocks.kronecker import KroneckerFactors
from torch_kfac.linalg import add_to_diagonal, solver_dtype

#: How the loss was reduced: 'mean' over the batch, 'sum', or 'mean_positions' (averaged over the
#: batch and over each example's T loss terms, e.g. tokens of a sequence or pixels of a mask).
REDUCTIONS = ("mean", "sum", "mean_positions")

#: The approximation classes of Kronecker blocks by option value.
APPROXIMATIONS: dict[str, type[Approximation]] = {
    cls.NAME: cls for cls in (KroneckerFactors, EigenbasisDiagonal, DiagonalFisher, ForwardOnly)
}

#: Inverses and eigendecompositions a Kronecker block may cache; dropped before each refresh.
_CACHES = ("A_inv", "G_inv", "A_eigvals", "A_eigvecs", "G_eigvals", "G_eigvecs")


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


@dataclass
class Statistic:
    """A pending statistic (one forward call's or one backward pass's) and the examples it covers."""

    value: Tensor
    examples: int
    #: Whether its loss was multiplied by its share n / N of the step's examples (a backward
    #: statistic under accumulation='whole-batch' with reduction 'mean' or 'mean_positions').
    share_scaled: bool = False
    #: Backward statistics of one group are passes through one forward pass (the same examples);
    #: None: a group of its own.
    group: int | None = None


def pooled(stats: list[Statistic]) -> Tensor:
    """The statistic of the union of the passes' examples, as if they had been one batch.

    Passes through one forward pass (several backward passes: Monte-Carlo samples, Fisher
    columns) are averaged first. Each resulting statistic is an average over its own n_i
    examples (a second moment times the reduction's scale), so the union of N = sum n_i examples
    weights it by n_i / N. A backward statistic whose loss was scaled by its share n_i / N holds
    (n_i / N)^2 times its own second moment, and is weighted by (n_i / N) / (n_i / N)^2 = N / n_i.
    """
    groups: dict[object, list[Statistic]] = {}
    for s in stats:
        groups.setdefault(id(s) if s.group is None else s.group, []).append(s)
    means = [_mean(group) for group in groups.values()]
    if len(means) == 1:
        return means[0].value
    total = sum(s.examples for s in means)
    weights = [total / s.examples if s.share_scaled else s.examples / total for s in means]
    if len(set(weights)) == 1 and not means[0].share_scaled:
        return _mean(means).value  # equal shares (a module called twice in one forward pass)
    return torch.tensordot(means[0].value.new_tensor(weights), torch.stack([s.value for s in means]), dims=1)


def _mean(stats: list[Statistic]) -> Statistic:
    """The average of statistics of equally many examples."""
    if len(stats) == 1:
        return stats[0]
    return replace(stats[0], value=torch.stack([s.value for s in stats]).mean(0))


def centered(rows: Tensor) -> Tensor:
    """Rows (..., K, d) minus their mean over the K rows."""
    return rows - rows.mean(dim=-2, keepdim=True)


def input_second_moment(rows: Tensor, bias: bool) -> Tensor:
    """1/K sum_k a~_k a~_k^T over rows (..., K, d), a~ = [a, 1] with a bias, else a.

    The bias column is not appended to the rows (a copy of all of them): the moment is assembled
    as [[sum a a^T, sum a], [sum a^T, K]].
    """
    count = rows.shape[-2]
    moment = rows.mT @ rows
    if bias:
        col = rows.sum(dim=-2).unsqueeze(-1)
        corner = col.new_full((*rows.shape[:-2], 1, 1), float(count))
        moment = torch.cat([torch.cat([moment, col], -1), torch.cat([col.mT, corner], -1)], -2)
    return moment / count


def _graph_task_id() -> int | None:
    """Id of the backward pass now running (None where PyTorch does not expose it)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    task = current() if current is not None else -1
    return None if task < 0 else int(task)


def _unchanged(grad: Tensor) -> Tensor:
    """The gradient as it is."""
    return grad


class CurvatureBlock(ABC):
    """What the optimizer needs from a curvature block: statistics in, preconditioning out.

    A block handles the parameters (`weight`, optional `bias`, or those `parameters()` lists) of
    one module. It records statistics from the module's inputs (forward) and output gradients
    (backward), folds them into zero-debiased running factors named in `FACTORS` (kept in `state`
    as `<name>_ema` and `<name>_weight`), refreshes cached inverses, and multiplies gradients laid
    out by `pack` by its damped inverse curvature.
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
        self._pending: dict[str, list[Statistic]] = {k: [] for k in self.FACTORS}
        self._pending_task: dict[str, int | None] = {}
        #: Number of examples in the last batch seen by the layer (dim 0 of its input).
        self.batch_size: int | None = None
        #: Loss terms per example (for reduction='mean_positions'), set by the preconditioner.
        self.loss_terms = 1
        #: The loss's reduction and centering, set by the preconditioner.
        self.reduction = "mean"
        self.center = False
        #: Set by the preconditioner: whether the loss of each recorded backward pass was scaled by
        #: its share n / N of the step's examples (`Statistic.share_scaled`).
        self.share_scaled = False
        #: Set by the capture when a recorded forward call ran: the next backward statistic
        #: starts a new group of examples (`Statistic.group`).
        self.new_examples = False
        self._group = 0
        #: Set by the capture: whether backward statistics are recorded right now (blocks that
        #: hook tensors themselves check it in their hooks).
        self.backward_gate: Callable[[], bool] | None = None
        #: Set by the capture: an output gradient as statistics take it (in the factor dtype, the
        #: loss scale removed), for blocks that hook tensors themselves.
        self.statistics_grad: Callable[[Tensor], Tensor] = _unchanged

    # --------------------------------------------------------------------- to implement
    @abstractmethod
    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """Record the forward statistics of one call."""

    @abstractmethod
    def record_output_grad(self, grad_output: Tensor, reduction: str, center: bool = False) -> None:
        """Record the backward statistics of one call (`reduction` of the loss over the batch)."""

    @abstractmethod
    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Refresh the cached inverses from the current factors."""

    @abstractmethod
    def has_inverses(self) -> bool:
        """Whether `precondition` can run."""

    @abstractmethod
    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """Damped inverse curvature times a gradient in `pack` layout."""

    @abstractmethod
    def curvature_product(self, mat: Tensor) -> Tensor:
        """Undamped curvature times a tensor in `pack` layout."""

    @abstractmethod
    def pack(self, tensors: list[Tensor]) -> Tensor:
        """One tensor per parameter (in `parameters()` order) in the block's layout."""

    @abstractmethod
    def unpack(self, mat: Tensor) -> list[Tensor]:
        """Inverse of `pack`: one tensor per parameter, in `parameters()` order."""

    # ------------------------------------------------------------------------ optional
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

    def before_forward(self, recording: bool, keep: list[Tensor] | None) -> None:  # noqa: B027 (optional)
        """Called before each forward call of the module, for blocks that record internally.

        Such a block records its statistics itself during the call when `recording` (it has the
        `reduction`, `center` and `loss_terms` attributes for that), and appends the tensors at
        which its backward statistics are taken to `keep` when that is a list: the
        preconditioner's own Fisher passes backpropagate to them.
        """

    def remove(self) -> None:  # noqa: B027 (optional: most blocks attach nothing)
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

    def add_forward_statistic(self, key: str, value: Tensor, examples: int) -> None:
        """Pend one forward call's statistic, an average over its `examples` examples."""
        self._pending[key].append(Statistic(value, examples))

    def add_backward_statistic(self, key: str, value: Tensor, examples: int) -> None:
        """Pend a backward statistic of `examples` examples: summed within one backward pass,
        pooled per example across passes (`pooled`).

        A module called several times in one forward pass shares its weight like positions of
        a sequence (the expand convention), so its output-gradient statistics add up; backward
        passes through one forward pass (Monte-Carlo samples) are averaged, and those of separate
        forward passes (micro-batches) pooled per example.
        """
        if self.new_examples:  # the first backward statistic after a forward pass: new examples
            self._group += 1
            self.new_examples = False
        task = _graph_task_id()
        pending = self._pending[key]
        if pending and task is not None and self._pending_task.get(key) == task:
            pending[-1].value = pending[-1].value + value
        else:
            pending.append(Statistic(value, examples, self.share_scaled, self._group))
            self._pending_task[key] = task

    def has_pending(self, key: str) -> bool:
        """Whether statistics for factor `key` wait to be folded in."""
        return bool(self._pending[key])

    def pending(self, key: str) -> Tensor:
        """The pending statistics of factor `key`, pooled over the calls and passes recorded."""
        return pooled(self._pending[key])

    def pending_examples(self) -> set[int]:
        """The example counts of the pending statistics (one per recorded call or pass)."""
        return {s.examples for stats in self._pending.values() for s in stats}

    def clear_pending(self, keys: tuple[str, ...] | None = None) -> None:
        """Drop pending statistics (of the given factors, or all)."""
        for k in self.FACTORS if keys is None else keys:
            self._pending[k] = []

    def fold_pending(self, decay: float, taken: Tensor | None = None) -> None:
        """Fold the pending statistics into the zero-debiased running averages (see `fold_statistic`)."""
        for key in self.FACTORS:
            if not self._pending[key]:
                continue
            self.fold_statistic(key, self.pending(key), decay, taken)
            self._pending[key] = []

    def fold_statistic(self, key: str, batch: Tensor, decay: float, taken: Tensor | None = None) -> None:
        """Fold one batch statistic (e.g. averaged over ranks) into factor `key`'s running average.

        With `taken`, a 0-d bool tensor, the factor is left as it was where it is False (decided on
        the device: a skipped step); a factor folded first in a skipped step has weight 0.
        """
        ema, weight = self.state.get(f"{key}_ema"), self.state.get(f"{key}_weight")
        if ema is None or weight is None:  # 16-bit statistics (autocast) average in float32
            ema = torch.zeros_like(batch, dtype=solver_dtype(batch.dtype))
            weight = ema.new_zeros(())
        if taken is None:
            self.state[f"{key}_ema"] = ema.lerp_(batch.to(ema.dtype), 1.0 - decay)
            self.state[f"{key}_weight"] = weight.mul_(decay).add_(1.0 - decay)
            return
        new_ema = ema.lerp(batch.to(ema.dtype), 1.0 - decay)
        self.state[f"{key}_ema"] = torch.where(taken, new_ema, ema)
        self.state[f"{key}_weight"] = torch.where(taken, weight.mul(decay).add(1.0 - decay), weight)

    def follow_weight(self, dtype: torch.dtype) -> None:
        """Move the state to the parameters' device and to `dtype`, the factor dtype (after `model.to`)."""
        w = self.parameters()[0]
        for key, value in self.state.items():
            if value.device != w.device or (value.is_floating_point() and value.dtype != dtype):
                self.state[key] = value.to(device=w.device, dtype=dtype)

    def has_factors(self) -> bool:
        """Whether every factor has been estimated at least once."""
        return all(self.has_factor(k) for k in self.FACTORS)

    def has_factor(self, key: str) -> bool:
        """Whether factor `key` has been estimated at least once."""
        return f"{key}_ema" in self.state

    def _factor(self, key: str) -> Tensor:
        return self.state[f"{key}_ema"] / self.state[f"{key}_weight"]

    def _read_factor(self, key: str) -> Tensor:
        """Factor `key` as the `Factor` attribute shows it."""
        return self._factor(key)

    def drop_state(self, keys: Iterable[str]) -> None:
        """Forget the given state entries where present (cached inverses before a refresh)."""
        for key in keys:
            self.state.pop(key, None)

    def _set_factor(self, key: str, value: Tensor) -> None:
        """Set factor `key` to `value` as if it were the only statistic seen (weight 1)."""
        self.state[f"{key}_ema"] = value.detach().clone()
        self.state[f"{key}_weight"] = value.new_ones(())


class Factor:
    """A running factor as an attribute: reading gives its zero-debiased average, writing sets it.

    Declared in a block class as `A = Factor("doc")`; the attribute name is the factor's key.
    Blocks with a leading group dimension override `_read_factor` / `_set_factor`.
    """

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, block: CurvatureBlock | None, owner: type | None = None) -> Tensor:
        if block is None:
            return self  # type: ignore[return-value]
        return block._read_factor(self.key)

    def __set__(self, block: CurvatureBlock, value: Tensor) -> None:
        block._set_factor(self.key, value)


class WeightBiasBlock(CurvatureBlock):
    """A block over a module's `weight` and optional `bias`, laid out by `to_matrix` / `from_matrix`."""

    @abstractmethod
    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """Weight- and bias-shaped tensors in the block's layout."""

    @abstractmethod
    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of `to_matrix`: the weight-shaped and bias-shaped parts."""

    def pack(self, tensors: list[Tensor]) -> Tensor:
        """The weight-shaped and (if any) bias-shaped tensor through `to_matrix`."""
        return self.to_matrix(tensors[0], tensors[1] if len(tensors) > 1 else None)

    def unpack(self, mat: Tensor) -> list[Tensor]:
        """Inverse of `pack`: one tensor per parameter, in `parameters()` order."""
        return [t for t in self.from_matrix(mat) if t is not None]


class KroneckerBlock(WeightBiasBlock):
    """Curvature block F ~ A (x) G for a module with a `weight` of shape (out, ...) and optional `bias`.

    Subclass it for a new module type, implement `activation_rows` and `output_grad_rows`, and
    register it with `torch_kfac.register_block`. The approximation (`configure`) decides what is
    done with the rows; `approx` is its object.
    """

    A = Factor("Input factor E[a~ a~^T] (bias folded in as the last row and column).")
    G = Factor("Output-gradient factor E[g g^T] of the per-example loss.")

    def __init__(self, module: nn.Module, name: str = "") -> None:
        if not isinstance(getattr(module, "weight", None), Tensor):
            raise TypeError(f"{type(module).__name__} {name!r} has no weight tensor for K-FAC")
        # Set before the base initialiser, which reads FACTORS (the approximation's); `configure`
        # then applies the defaults.
        self.approx: Approximation = KroneckerFactors(self)
        super().__init__(module, name)
        self.configure()

    # ----------------------------------------------------------------- layer-specific hooks
    @abstractmethod
    def activation_rows(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """The layer's inputs as rows a, shape (groups, N, T, d_in) without the bias column."""

    @abstractmethod
    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Output gradients as rows g, shape (groups, N, T, d_out)."""

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
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"approximation must be one of {sorted(APPROXIMATIONS)}, got {approximation!r}")
        self.approximation = approximation
        self.approx = APPROXIMATIONS[approximation](self)
        self.power = power
        self.kfac_approx = kfac_approx
        self._pending = {k: [] for k in self.FACTORS}
        self._saved_rows: list[Tensor] = []

    @property
    def FACTORS(self) -> tuple[str, ...]:  # type: ignore[override]
        """The running factors of the approximation."""
        return self.approx.FACTORS

    @property
    def FORWARD_FACTORS(self) -> tuple[str, ...]:  # type: ignore[override]
        """A, where the approximation keeps it."""
        return ("A",) if "A" in self.FACTORS else ()

    @property
    def needs_output_grads(self) -> bool:
        """Whether backward statistics are used (not for the forward-only approximation)."""
        return self.approx.NEEDS_OUTPUT_GRADS

    def record_inputs(self, inputs: tuple[Tensor, ...], center: bool = False) -> None:
        """Add one call's contribution 1/(N T) sum a~ a~^T to the pending A statistics.

        Approximations with joint statistics (EKFAC, the diagonal) also keep the call's rows until
        its backward pass.
        """
        rows = self.activation_rows(inputs).detach()
        if self.kfac_approx == "reduce":
            rows = rows.mean(dim=2, keepdim=True)
        groups, n, t, _ = rows.shape
        self.batch_size = n
        flat = rows.reshape(groups, n * t, -1)
        if center:
            flat = centered(flat)
        if self.approx.joint_statistics():
            kept = flat.reshape(groups, n, t, -1)
            if self.bias is not None:
                kept = torch.cat([kept, kept.new_ones(groups, n, t, 1)], dim=-1)
            self._saved_rows.append(kept)
        if "A" in self.FACTORS:
            self.add_forward_statistic("A", input_second_moment(flat, self.bias is not None), n)

    def record_output_grad(self, grad_output: Tensor, reduction: str, center: bool = False) -> None:
        """Add one call's per-example-gradient second moment 1/N sum g g^T to the pending G.

        With joint statistics the call's kept rows and these go to the approximation together.
        """
        if not self.needs_output_grads:
            return
        rows = self.output_grad_rows(grad_output).detach()
        if self.kfac_approx == "reduce":
            rows = rows.sum(dim=2, keepdim=True)
        groups, n, t, _ = rows.shape
        flat = rows.reshape(groups, n * t, -1)
        if center:
            flat = centered(flat)
        scale = second_moment_scale(reduction, n, self.loss_terms)
        if "G" in self.FACTORS:
            self.add_backward_statistic("G", flat.mT @ flat * scale, n)
        if self._saved_rows:
            # Backward runs in reverse order of the forward calls.
            self.approx.record_joint(self._saved_rows.pop(), flat.reshape(groups, n, t, -1), scale)

    def drop_saved_rows(self) -> None:
        """Forget the rows kept for joint statistics."""
        self._saved_rows = []

    def clear_pending(self, keys: tuple[str, ...] | None = None) -> None:
        """Drop pending statistics (of the given factors, or all) and rows kept for them."""
        super().clear_pending(keys)
        if keys is None or "A" in keys:
            self.drop_saved_rows()

    def has_factors(self) -> bool:
        """Whether the factors the preconditioner is built from have been estimated."""
        return self.approx.has_factors()

    def _read_factor(self, key: str) -> Tensor:
        factor = self._factor(key)
        return factor[0] if self.groups == 1 else factor

    def _set_factor(self, key: str, value: Tensor) -> None:
        super()._set_factor(key, value.unsqueeze(0) if value.dim() == 2 else value)

    # ---------------------------------------------------------------- preconditioning
    def update_inverses(self, damping: Tensor, pi_correction: bool, method: str) -> None:
        """Refresh the approximation's cached inverses ('cholesky') or eigendecompositions ('eigh').

        With 'cholesky' the damping is baked into the inverses; with 'eigh' it is applied at
        preconditioning time, so a new damping takes effect at once.
        """
        self.drop_state(_CACHES)
        self.approx.update_inverses(damping, pi_correction, method)

    def has_inverses(self) -> bool:
        """Whether a cached inverse, eigendecomposition or diagonal is available."""
        return self.approx.has_inverses()

    def precondition(
        self, mat: Tensor, damping: Tensor, pi_correction: bool, damping_type: str = "factored"
    ) -> Tensor:
        """Multiply gradient matrices by the damped curvature raised to `power` (-1 or -1/2)."""
        return self.approx.precondition(mat, damping, pi_correction, damping_type)

    def curvature_product(self, mat: Tensor) -> Tensor:
        """The undamped curvature of the chosen approximation applied to matrices."""
        return self.approx.curvature_product(mat)

    def dense_curvature(self, damping: float = 0.0) -> Tensor:
        """The block's curvature as a dense matrix (vec = column stacking), for tests and small layers."""
        if self.groups != 1:
            raise ValueError("dense_curvature is defined for ungrouped blocks only")
        return add_to_diagonal(self.approx.dense_curvature(), damping)

    def extra_repr(self) -> str:
        """Factor shapes and memory, for the registration report."""
        d_out = self.weight.shape[0] // self.groups
        d_in = self.weight[0].numel() + (self.bias is not None)
        numel = self.groups * (d_in * d_in + d_out * d_out)
        size = numel * self.weight.element_size()
        grp = f" x {self.groups} groups" if self.groups > 1 else ""
        return f"A {d_in}x{d_in}, G {d_out}x{d_out}{grp}, {size / 2**20:.2f} MiB per factor set"
