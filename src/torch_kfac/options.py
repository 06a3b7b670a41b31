"""Every option of `KFACPreconditioner` and `KFAC`: declared, defaulted, documented and validated once.

`PreconditionerOptions` holds the curvature options, `KFACOptions` adds the optimizer's. Each
option's check is declared once in `CHECKS` and applied on construction, to every value a schedule
returns (`value_at`) and to values set later (the damping, the learning rate). Choices are string
enums that accept plain strings in any case. Every bad value raises a ValueError naming the option.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from torch_kfac.losses import loss_curvature

Schedule = Callable[[int], float]
C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A string option's allowed values; a member equals, hashes and prints as its plain string."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:
        return hash(self.value)

    @classmethod
    def parse(cls: type[C], name: str, value: object) -> C:
        """The member named by `value` (a member or a string, case-insensitive)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class Reduction(Choice):
    """How the training loss was reduced over the batch (and over positions)."""

    MEAN = "mean"
    SUM = "sum"
    MEAN_POSITIONS = "mean_positions"


class Accumulation(Choice):
    """How the losses of several backward passes before one step (gradient accumulation) are scaled."""

    WHOLE_BATCH = "whole-batch"
    MICRO_BATCH = "micro-batch"


class AccumulatedPasses(Choice):
    """What a step called without its batch takes after several training passes (accumulation)."""

    RAISE = "raise"
    LAST = "last"


class FisherType(Choice):
    """Which Fisher the factors estimate."""

    EMPIRICAL = "empirical"
    MC = "mc"
    TYPE2 = "type-2"


class Approximation(Choice):
    """The curvature approximation of the Linear/Conv blocks."""

    KFAC = "kfac"
    EKFAC = "ekfac"
    DIAGONAL = "diagonal"
    FORWARD_ONLY = "forward-only"


class KFACApprox(Choice):
    """Weight sharing over sequence/spatial positions (Eschenhagen et al. 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class InverseMethod(Choice):
    """How the damped factors are inverted."""

    CHOLESKY = "cholesky"
    EIGH = "eigh"


class DampingType(Choice):
    """Where the damping enters: each factor (pi-adjusted) or the Kronecker product."""

    FACTORED = "factored"
    EXACT = "exact"


class MomentumType(Choice):
    """Whether momentum accumulates natural gradients ('regular') or raw gradients ('adam')."""

    REGULAR = "regular"
    ADAM = "adam"


class QModelCurvature(Choice):
    """The curvature of the quadratic model q(delta) of the damping rule."""

    KFAC = "kfac"
    EXACT = "exact"


#: The reduction `loss_fn` must have for each of the preconditioner's reductions.
LOSS_REDUCTION = {Reduction.MEAN: "mean", Reduction.SUM: "sum", Reduction.MEAN_POSITIONS: "mean"}
INVERSE_POWERS = (-1.0, -0.5)


# ---------------------------------------------------------------------------- checks
def check_number(
    name: str,
    value: object,
    *,
    low: float = 0.0,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    finite: bool = True,
) -> float:
    """A real number in the interval [low, high] (ends open where asked); finite unless allowed."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]  # 0-d tensors, numpy scalars
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    value = float(value)
    if finite and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if math.isnan(value) or not (ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """A real `bool` (not a string such as 'False', which would be true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_count(name: str, value: Any, *, low: int = 0) -> int:
    """A whole number of steps or samples, at least `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive" if low == 1 else "a non-negative"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")
    return value


def check_interval(name: str, value: Any) -> int:
    """A positive whole number of steps."""
    return check_count(name, value, low=1)


def check_module_names(name: str, value: object) -> tuple[str, ...]:
    """An iterable of qualified module names (a single string is refused: it iterates characters)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be an iterable of module names, got {value!r}")
    names = tuple(value)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"{name} must contain module names (strings), got {names!r}")
    return names


def check_loss_fn(name: str, value: object) -> nn.Module | None:
    """None or a loss module."""
    if value is not None and not isinstance(value, nn.Module):
        raise ValueError(f"{name} must be a loss module such as nn.CrossEntropyLoss(), got {value!r}")
    return value


def check_thresholds(name: str, value: object, *, floor: float = 0.0) -> tuple[float, float]:
    """A pair (low, high) of finite numbers, both at least `floor`, with low < high."""
    if not isinstance(value, Iterable) or isinstance(value, str) or len(pair := tuple(value)) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = (check_number(name, t, low=floor) for t in pair)
    if not low < high:
        raise ValueError(f"{name} must be (low, high) with low < high, got {value}")
    return low, high


def check_inverse_power(name: str, value: object) -> float:
    if isinstance(value, bool) or value not in INVERSE_POWERS:
        raise ValueError(f"{name} must be -1 or -0.5, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_fraction(name: str, value: object) -> float:
    """A fraction in (0, 1] (`grad_worker_fraction`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_seed(name: str, value: object) -> int:
    """A non-negative int seed."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def check_factor_dtype(name: str, value: object) -> torch.dtype | None:
    """None (the default rule) or a dtype the decompositions run in: float32 or float64."""
    if value is not None and value not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be None, torch.float32 or torch.float64, got {value!r}")
    return value  # type: ignore[return-value]


def check_grad_scaler(name: str, value: object) -> torch.amp.GradScaler | None:
    """None or a `torch.amp.GradScaler`."""
    if value is not None and not isinstance(value, torch.amp.GradScaler):
        raise ValueError(f"{name} must be None or a torch.amp.GradScaler, got {value!r}")
    return value


def check_compile_step(name: str, value: object) -> bool | str:
    """False, True (inductor) or the name of a `torch.compile` backend."""
    if isinstance(value, bool):
        return value
    backends = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(value, str) or value not in backends:
        raise ValueError(
            f"{name} must be a bool or a torch.compile backend ({', '.join(backends)}), got {value!r}"
        )
    return value


#: Default bound on lr^2 g^T F^-1 g (the KL change of a step): without it 24 of 96 fixed
#: (lr, damping) settings of the test models diverged, with 1e-2 13, with 1e-3 none (docs/tuning.md).
DEFAULT_NORM_CONSTRAINT = 1e-3
#: The damping's value that asks for calibration at the first step (`torch_kfac.calibration`).
AUTO_DAMPING = "auto"
#: The damping used until then, and when nothing can be measured (the default damping).
FALLBACK_DAMPING = 1e-3


def check_damping(name: str, value: object) -> float | str:
    """A positive damping, or 'auto' (calibrated at the first step)."""
    if isinstance(value, str):
        if value.lower() != AUTO_DAMPING:
            raise ValueError(f"{name} must be a positive number or 'auto', got {value!r}")
        return AUTO_DAMPING
    return check_number(name, value, low_inclusive=False)


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _number(**bounds: Any) -> Callable[[str, Any], float]:
    return lambda name, value: check_number(name, value, **bounds)


#: Option name -> its check (a function of the name to report and the value); each declared once.
CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "damping": check_damping,
    "cov_ema_decay": _number(high=1.0, high_inclusive=False),
    "factor_update_steps": check_interval,
    "inverse_update_steps": check_interval,
    "warmup_steps": check_count,
    "reduction": Reduction.parse,
    "accumulation": Accumulation.parse,
    "accumulated_passes": AccumulatedPasses.parse,
    "enable_pi_correction": check_bool,
    "inverse_method": InverseMethod.parse,
    "damping_type": DampingType.parse,
    "center": check_bool,
    "update_factors_manually": check_bool,
    "skip_modules": check_module_names,
    "fisher_type": FisherType.parse,
    "mc_samples": check_interval,
    "fisher_batch_size": _optional(check_interval),
    "patches_per_dim": _optional(_number(low_inclusive=False)),
    "loss_fn": check_loss_fn,
    "approximation": Approximation.parse,
    "inverse_power": check_inverse_power,
    "kfac_approx": KFACApprox.parse,
    "grad_worker_fraction": check_fraction,
    "reduce_upper_triangle": _optional(check_bool),
    "mc_seed": _optional(check_seed),
    "factor_dtype": check_factor_dtype,
    "grad_scaler": check_grad_scaler,
    "max_skipped_steps": _optional(check_interval),
    "host_check_interval": _optional(check_interval),
    "low_rank_gradients": check_bool,
    "lr": _optional(check_number),
    "momentum": _number(high=1.0, high_inclusive=False),
    "momentum_type": MomentumType.parse,
    "norm_constraint": _optional(_number(low_inclusive=False, finite=False)),
    "weight_decay": lambda name, value: 0.0 if value is None else check_number(name, value),
    "adapt_damping": check_bool,
    "damping_adaptation_decay": _number(low_inclusive=False, high=1.0),
    "damping_adaptation_interval": check_interval,
    "include_damping_in_qmodel_change": check_bool,
    "min_damping": check_number,
    "max_damping": _number(finite=False),
    "l2_reg": check_number,
    "damping_rho_thresholds": check_thresholds,
    "qmodel_curvature": QModelCurvature.parse,
    "adaptive_learning_rate": check_bool,
    "adaptive_momentum": check_bool,
    "momentum_bounds": _optional(lambda name, value: check_thresholds(name, value, floor=-math.inf)),
    "qmodel_batch_size": _optional(check_interval),
    "reject_steps": check_bool,
    "burn_in_steps": check_count,
    "compile_step": check_compile_step,
}


def check_option(name: str, value: Any, label: str | None = None) -> Any:
    """`value` checked as option `name` (errors name `label`, default `name`)."""
    return CHECKS[name](label or name, value)


def resolve(value: Any, step: int) -> Any:
    """A hyperparameter's value at `step`: called with the step if it is a schedule (a callable)."""
    return value(step) if callable(value) else value


# --------------------------------------------------------------------------- options
@dataclass
class PreconditionerOptions:
    """The curvature options of `KFACPreconditioner` (and of `KFAC`, which builds one).

    Args:
        damping: Tikhonov damping lambda added to the curvature (per-example-loss scale), or
            'auto': chosen at the first step from the curvature along the gradient and, when the
            step has the loss and the batch, a search by trial steps (`torch_kfac.calibration`).
        cov_ema_decay: decay of the zero-debiased running average of the factors.
        factor_update_steps: record statistics and update the factors every this many steps
            (an int, or a callable of the step returning one).
        inverse_update_steps: recompute inverses/eigendecompositions every this many steps
            (an int or a callable of the step).
        warmup_steps: during the first this many steps, factors and inverses are refreshed every
            step whatever the intervals: the curvature changes fastest at the start of training
            (the output-gradient factors grow by orders of magnitude), and a stale inverse there
            makes steps far too large.
        reduction: how the loss was reduced: 'mean' over the batch, 'sum', or 'mean_positions'
            (averaged over the batch and over each example's sequence/spatial loss terms, e.g.
            `CrossEntropyLoss()` on (N, C, T) logits; needs `loss_fn`). With 'sum' the curvature
            is that of the summed loss (N times the per-example Fisher), so the preconditioned
            gradient equals that of the mean-reduced loss.
        accumulation: how the losses of several backward passes before one step (micro-batches
            of sizes n_1..n_k, N = their sum) are scaled; the factors are then those of one batch
            of all N examples, each micro-batch weighted by its examples. 'whole-batch' (default):
            the accumulated gradient is the whole batch's, i.e. with reduction 'mean' or
            'mean_positions' each micro-batch's loss is multiplied by n_i / N (by 1/k for k equal
            micro-batches), with 'sum' it is its plain sum. 'micro-batch': each backward pass is
            the gradient of its own micro-batch's loss, unscaled (the accumulated gradient is
            their sum: with 'mean', k times the whole batch's for k equal micro-batches). The
            two agree for reduction='sum' and for a single backward pass per step. Statistics of
            the preconditioner's own passes (fisher_type 'mc', 'type-2') do not depend on it.
        accumulated_passes: what a step called without the batch or loss it needs takes when
            several training passes ran since the last step (gradient accumulation,
            `torch_kfac.last_batch`): 'raise' (default: an error, since which batch the step is for
            is the caller's choice) or 'last' (the last pass's batch and loss: the quadratic
            model's curvature, the MC Fisher's own pass and the loss change of damping adaptation
            are then those of the last micro-batch; the gradient is the accumulated one).
        enable_pi_correction: pi-adjusted factored damping (Martens & Grosse, section 6.3).
        inverse_method: 'cholesky' (damped inverses, damping fixed until the next refresh) or
            'eigh' (eigendecompositions; damping applied at every step).
        damping_type: 'factored' ((A + pi sqrt(l) I) (x) (G + sqrt(l)/pi I)) or 'exact'
            ((A (x) G + l I), needs inverse_method='eigh').
        center: subtract the batch mean from inputs and output gradients (centered covariances).
        update_factors_manually: fold statistics into the factors only in `update_factors()`
            (`KFAC`'s `update_cov_manually`, folded by `update_cov()`).
        skip_modules: qualified names of modules to leave to the plain (fallback) update.
        fisher_type: 'empirical' (gradients of the loss on the data labels, recorded from your
            own backward pass), 'mc' (labels sampled from the model's predictive distribution,
            `mc_samples` of them) or 'type-2' (the exact Fisher/GGN, one backward pass per output
            class). 'mc' and 'type-2' need `loss_fn` and the batch, `step(batch=(inputs, targets))`
            or the training pass's (`torch_kfac.last_batch`): on factor-update steps the
            preconditioner runs its own forward and backward passes.
        mc_samples: number of sampled labels per example for fisher_type='mc'.
        fisher_batch_size: run the own pass of fisher_type 'mc' or 'type-2' on at most this many
            examples, the batch's first ones along dimension 0 of the targets and of every input
            tensor (None: the whole batch). The factors are per-example averages, so a sub-batch
            is an unbiased estimate of the whole batch's statistics that the moving average
            smooths over steps; the pass's forward and backward cost shrink with it (on
            convolutions, their patch statistics above all). Needs batch-first inputs (tensors,
            also in tuples, lists and dicts).
        patches_per_dim: estimate the input factor A (d x d) of each nn.Conv1d/2d/3d from at
            most `patches_per_dim * d` of the pass's patches (examples x output positions), drawn
            uniformly at random with replacement by the block's own generator, seeded per step
            and block (the global random stream is left alone; a run restored from `state_dict`
            draws what an uninterrupted one draws), instead of from all of them (None). The
            average over the drawn patches is an unbiased estimate of the average over all, at a
            fraction of its cost when the positions outnumber d; tensorflow/kfac's sub-sampling of
            outer products.
            Applies with kfac_approx='expand' and the 'kfac' and 'forward-only' approximations
            (EKFAC and the diagonal pair every patch with its output gradient).
        loss_fn: the loss module (e.g. `nn.CrossEntropyLoss()`), needed by 'mc', 'type-2' and
            'mean_positions'; see `torch_kfac.losses` for the supported ones. With
            `KFAC.step(batch=(x, y))` the optimizer also evaluates the loss after the update on
            the same batch and computes the exact curvature of its adaptive options.
        approximation: curvature of the Linear/Conv blocks: 'kfac' (A (x) G), 'ekfac' (the
            eigenbasis of A (x) G with a diagonal re-estimated from per-example gradients;
            George et al. 2018), 'diagonal' (the exact diagonal E[per-example gradient^2]) or
            'forward-only' (A (x) I, no backward statistics; Benzing 2022).
        inverse_power: -1 (natural gradient) or -0.5 (square-root preconditioning; needs
            inverse_method='eigh' unless the approximation is 'diagonal').
        kfac_approx: weight sharing over sequence/spatial positions (Eschenhagen et al. 2023):
            'expand' (positions count like examples) or 'reduce' (inputs averaged and output
            gradients summed over positions before the second moments).
        grad_worker_fraction: with `torch.distributed` initialized, the fraction of ranks that
            hold each block's inverses and precondition its gradient: 1 (every rank; no gradient
            broadcast), 1/world_size (only the block's owner, which broadcasts the preconditioned
            gradient; least memory) or in between. See docs/distributed.md.
        reduce_upper_triangle: in distributed runs, all-reduce only the upper triangle of
            symmetric statistics (half the bytes, for a pack and unpack); None: on GPUs only.
        mc_seed: seed of the labels sampled for fisher_type='mc' (re-seeded from it every step);
            None uses the global generator on one process, and rank 0's seed in distributed runs,
            where every rank draws for the whole global batch and keeps its own rows.
        factor_dtype: dtype of the factors, their inverses and the preconditioning: torch.float32
            or torch.float64; None (default): the parameters' dtype, float32 for 16-bit
            parameters. Statistics are computed in it with autocast off; the preconditioned
            gradient is cast back to the parameters' dtype.
        grad_scaler: the `torch.amp.GradScaler` that scales the loss: recorded output gradients
            are divided by its scale (on the device), so the factors are those of the unscaled
            loss. `KFAC` then unscales the gradients itself in `scaler.step(opt)` and skips the
            steps the scaler skips; in front of another optimizer call `scaler.unscale_(opt)`
            before `pre.step()`.
        max_skipped_steps: raise a RuntimeError once this many steps in a row were skipped for
            non-finite values (None: keep skipping, with a warning that counts them). Checked on
            the host in every step: one host read per step (see `host_check_interval`).
        host_check_interval: how often a step reads the device's decisions on the host. Whether a
            step is finite, and whether new inverses are, is decided on the device: a skipped step's
            changes are masked (`torch.where`), so a step needs no host synchronisation. The host
            learns of skipped steps and failed inverse refreshes (warnings, `skipped_in_a_row`,
            `last_stats['skipped']`) at a host check, one read: in every k-th step with k given
            (1: in every step, which then warns at once and does not count a skipped step), else
            (None, the default) only when you read `last_stats`, `skipped_in_a_row` or
            `state_dict()`. See docs/mixed-precision.md.
        low_rank_gradients: precondition an `nn.Linear` layer's gradient sum_r g_r a~_r^T row by
            row, as sum_r (G^-1 g_r)(A^-1 a~_r)^T, where that takes fewer operations than the
            dense product G^-1 M A^-1: when the batch's rows (examples times positions) are fewer
            than the layer's widths. The rows (the layer's inputs and output gradients in your
            forward and backward passes) are kept until the step and checked against `.grad` in
            every step (a random probe; one host read for all layers): a gradient that they
            reproduce only up to one factor (gradient clipping by norm, a loss scale) takes it,
            any other difference (autocast's 16-bit products, clipping by value, gradients from
            elsewhere) sends the layer to the dense product for the rest of training. Used with
            the Cholesky inverses of 'kfac', on one process; `KFAC(compile_step=...)` does not.
            The read is free on the CPU; on other devices the rows are used only in steps that
            make a host check anyway (see `host_check_interval`), so a fixed step stays free of
            synchronisations.
    """

    #: Options that may be a callable of the step.
    SCHEDULABLE: ClassVar[frozenset[str]] = frozenset({"factor_update_steps", "inverse_update_steps"})

    damping: float | str = 1e-3
    cov_ema_decay: float = 0.95
    factor_update_steps: int | Callable[[int], int] = 10
    inverse_update_steps: int | Callable[[int], int] = 10
    warmup_steps: int = 20
    reduction: Reduction | str = Reduction.MEAN
    accumulation: Accumulation | str = Accumulation.WHOLE_BATCH
    accumulated_passes: AccumulatedPasses | str = AccumulatedPasses.RAISE
    enable_pi_correction: bool = True
    inverse_method: InverseMethod | str = InverseMethod.CHOLESKY
    damping_type: DampingType | str = DampingType.FACTORED
    center: bool = False
    update_factors_manually: bool = False
    skip_modules: Iterable[str] = ()
    fisher_type: FisherType | str = FisherType.EMPIRICAL
    mc_samples: int = 1
    fisher_batch_size: int | None = None
    patches_per_dim: float | None = None
    loss_fn: nn.Module | None = None
    approximation: Approximation | str = Approximation.KFAC
    inverse_power: float = -1.0
    kfac_approx: KFACApprox | str = KFACApprox.EXPAND
    grad_worker_fraction: float = 1.0
    reduce_upper_triangle: bool | None = None
    mc_seed: int | None = None
    factor_dtype: torch.dtype | None = None
    grad_scaler: torch.amp.GradScaler | None = None
    max_skipped_steps: int | None = None
    host_check_interval: int | None = None
    low_rank_gradients: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (f.name in self.SCHEDULABLE and callable(value)):
                setattr(self, f.name, check_option(f.name, value))
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Options that are valid alone but not together."""
        if self.damping_type == DampingType.EXACT and self.inverse_method != InverseMethod.EIGH:
            raise ValueError("damping_type='exact' needs inverse_method='eigh'")
        if (
            self.inverse_power != -1.0
            and self.inverse_method == InverseMethod.CHOLESKY
            and self.approximation in (Approximation.KFAC, Approximation.FORWARD_ONLY)
        ):
            raise ValueError("inverse_power=-0.5 needs inverse_method='eigh'")
        if self.fisher_batch_size is not None and self.fisher_type == FisherType.EMPIRICAL:
            raise ValueError(
                "fisher_batch_size sets the size of the own pass of fisher_type 'mc' or 'type-2'; "
                "fisher_type='empirical' records your own pass"
            )
        if self.loss_fn is not None:
            reduction = loss_curvature(self.loss_fn).reduction
            wanted = LOSS_REDUCTION[self.reduction]  # type: ignore[index]
            if reduction != wanted:
                raise ValueError(
                    f"loss_fn reduces by {reduction!r}, which does not match "
                    f"reduction={self.reduction!r} (expected {wanted!r}): make them agree"
                )
        elif self.fisher_type != FisherType.EMPIRICAL or self.reduction == Reduction.MEAN_POSITIONS:
            what = (
                "reduction='mean_positions'"
                if self.fisher_type == FisherType.EMPIRICAL
                else f"fisher_type={self.fisher_type!r}"
            )
            raise ValueError(f"{what} needs loss_fn=... (e.g. nn.CrossEntropyLoss())")

    def value_at(self, name: str, step: int) -> Any:
        """Option `name` at `step`: a schedule's value, checked like the option itself."""
        value = getattr(self, name)
        return check_option(name, resolve(value, step)) if callable(value) else value

    @property
    def initial_damping(self) -> float:
        """The damping at step 0 (with 'auto', a placeholder until the first step calibrates it)."""
        value = self.value_at("damping", 0)
        return FALLBACK_DAMPING if value == AUTO_DAMPING else value


@dataclass
class KFACOptions(PreconditionerOptions):
    """The options of `KFAC`: the curvature options and those of the update and damping rules.

    Args:
        lr: learning rate (`learning_rate=` is accepted as an alias); None only with
            adaptive_learning_rate=True, which refuses a value (it would be ignored) and on which a
            learning-rate scheduler has no effect (a warning says so).
        damping: initial Tikhonov damping lambda (or a schedule, when not adapted), or 'auto'
            (calibrated at the first step, `torch_kfac.calibration`).
        momentum: momentum coefficient mu.
        momentum_type: 'regular' (v <- mu v + c F^-1 g, update = v) or 'adam' (v <- mu v + g,
            update = c F^-1 v), c the norm constraint's clip coefficient (see `torch_kfac.update`).
        norm_constraint: bound C on lr^2 g^T F^-1 g of the update (None: no constraint). The
            default 1e-3 is the guard against early blow-ups at fixed settings, chosen by
            measurement (docs/tuning.md); the adaptive learning rate does not use it.
        weight_decay: decoupled weight decay coefficient (None or 0: none).
        adapt_damping: Levenberg-Marquardt adaptation of the damping from the loss (needs
            `step(loss=...)` or a closure): rho = (L_new - L_old) / q(delta) pairs the loss change
            caused by a step with that step's quadratic-model change.
        damping_adaptation_decay: omega = decay ** interval is the damping's multiplier.
        damping_adaptation_interval: adapt the damping every this many steps.
        include_damping_in_qmodel_change: include the damping term in q(delta).
        min_damping: lower bound of the adapted damping (plus `l2_reg`).
        max_damping: upper bound of the adapted damping.
        l2_reg: coefficient of an L2 term already in the loss; floors the damping, enters q.
        damping_rho_thresholds: (low, high) of the Levenberg-Marquardt rule, default (1/4, 3/4).
        qmodel_curvature: curvature of q(delta) for the damping rule: 'kfac' (the K-FAC model) or
            'exact' (the GGN/Fisher of `loss_fn` on the batch; one forward-mode pass).
        adaptive_learning_rate, adaptive_momentum: choose them each step by minimising the exact
            quadratic model over the natural gradient and the previous change (a 2x2 solve).
        momentum_bounds: (low, high): the adaptive momentum minimises the model within these
            bounds, the learning rate chosen anew for a clipped momentum (the model is convex,
            so this is the constrained minimum). None: unbounded (Martens & Grosse, kfac-jax).
            On a small batch the unbounded momentum swings outside [0, 1] (measured 2.5 and -2.2),
            and such steps raise the held-out loss (docs/tuning.md).
        qmodel_batch_size: compute the exact curvature of the quadratic model on at most this
            many examples, the batch's first ones along dimension 0 (None: the whole batch); the
            gradient term and the loss change always use the whole batch. Its forward-mode pass is
            the adaptive step's largest cost on large batches; the default 64 keeps the adaptive
            step near 1.3x a plain one on the autoencoder at batch 250 (less at larger batches)
            with no measurable loss of progress per step (`benchmarks/README.md`).
        reject_steps: undo a step whose loss on the same batch is NaN or larger, and raise the
            damping by 1/omega.
        burn_in_steps: the first steps only accumulate factors; the parameters stay put.
        compile_step: run the fixed-hyperparameter step's tensor math (preconditioning, momentum,
            norm constraint, weight decay, the parameters' change) as one `torch.compile`d
            function: True (inductor) or a backend name ('aot_eager', 'eager', ...). The
            statistics, factor and inverse updates stay eager. Refused with the adaptive options
            (adapt_damping, adaptive_learning_rate/momentum, reject_steps), whose steps run passes
            of the model, and in distributed runs (the preconditioning broadcasts). The first steps
            compile (seconds to minutes); see docs/mixed-precision.md for the measured speedup.

    `lr`, `damping` (when not adapted), `momentum`, `weight_decay`, `norm_constraint`,
    `factor_update_steps` and `inverse_update_steps` also accept a callable of the step.
    """

    SCHEDULABLE: ClassVar[frozenset[str]] = PreconditionerOptions.SCHEDULABLE | {
        "lr",
        "momentum",
        "weight_decay",
        "damping",
        "norm_constraint",
    }

    damping: float | Schedule | str = 1e-3  # type: ignore[assignment]
    lr: float | Schedule | None = None
    momentum: float | Schedule = 0.9
    momentum_type: MomentumType | str = MomentumType.REGULAR
    norm_constraint: float | Schedule | None = DEFAULT_NORM_CONSTRAINT
    weight_decay: float | Schedule | None = None
    adapt_damping: bool = False
    damping_adaptation_decay: float = 0.99
    damping_adaptation_interval: int = 5
    include_damping_in_qmodel_change: bool = False
    min_damping: float = 1e-8
    max_damping: float = math.inf
    l2_reg: float = 0.0
    damping_rho_thresholds: tuple[float, float] = (0.25, 0.75)
    qmodel_curvature: QModelCurvature | str = QModelCurvature.KFAC
    adaptive_learning_rate: bool = False
    adaptive_momentum: bool = False
    momentum_bounds: tuple[float, float] | None = None
    qmodel_batch_size: int | None = 64
    reject_steps: bool = False
    burn_in_steps: int = 0
    compile_step: bool | str = False

    def _check_combinations(self) -> None:
        super()._check_combinations()
        if self.compile_step:
            adaptive = [
                n
                for n in ("adapt_damping", "adaptive_learning_rate", "adaptive_momentum", "reject_steps")
                if getattr(self, n)
            ]
            if adaptive:
                raise ValueError(
                    f"compile_step compiles the fixed-hyperparameter step; it does not support "
                    f"{', '.join(adaptive)} (their steps evaluate the model): turn one of them off"
                )
        if self.lr is None:
            if not self.adaptive_learning_rate:
                raise ValueError("lr (learning rate) is required unless adaptive_learning_rate=True")
            self.lr = 0.0
        if self.momentum_bounds is not None and not self.adaptive_momentum:
            raise ValueError("momentum_bounds bounds the adaptive momentum: it needs adaptive_momentum=True")
        self.max_damping = check_number("max_damping", self.max_damping, low=self.min_damping, finite=False)
        if self.uses_exact_curvature and self.loss_fn is None:
            raise ValueError(
                "loss_fn is required for adaptive_learning_rate, adaptive_momentum and "
                "qmodel_curvature='exact'"
            )
        if self.adaptive_learning_rate and (callable(self.lr) or self.lr != 0.0):
            raise ValueError(
                f"lr={self.lr!r} would be ignored: with adaptive_learning_rate=True the quadratic model "
                "chooses the learning rate at every step; leave lr unset (or turn the adaptive learning "
                "rate off)"
            )

    @property
    def uses_qmodel(self) -> bool:
        """Whether learning rate or momentum come from the exact quadratic model."""
        return self.adaptive_learning_rate or self.adaptive_momentum

    @property
    def uses_exact_curvature(self) -> bool:
        """Whether a step needs the exact curvature on the batch (and hence the batch)."""
        return self.uses_qmodel or self.qmodel_curvature == QModelCurvature.EXACT

    @property
    def omega(self) -> float:
        """The Levenberg-Marquardt factor decay ** interval."""
        return self.damping_adaptation_decay**self.damping_adaptation_interval

    @property
    def damping_bounds(self) -> tuple[float, float]:
        """(min_damping + l2_reg, max_damping), the range of the adapted damping."""
        return self.min_damping + self.l2_reg, self.max_damping


#: The original torch_kfac port's positional arguments of `KFAC`, after the model, in order.
ORIGINAL_POSITIONAL = (
    "lr",
    "damping",
    "adapt_damping",
    "damping_adaptation_decay",
    "damping_adaptation_interval",
    "include_damping_in_qmodel_change",
    "min_damping",
    "cov_ema_decay",
    "momentum",
    "momentum_type",
    "norm_constraint",
    "weight_decay",
    "l2_reg",
    "update_cov_manually",
    "center",
    "enable_pi_correction",
)
#: `KFAC` keyword -> option: the original port's names.
ALIASES = {"learning_rate": "lr", "update_cov_manually": "update_factors_manually"}


def kfac_options(args: tuple[Any, ...], kwargs: dict[str, Any]) -> KFACOptions:
    """`KFACOptions` from `KFAC`'s arguments: the original positional order and the aliases."""
    if len(args) > len(ORIGINAL_POSITIONAL):
        raise TypeError(f"KFAC takes at most {len(ORIGINAL_POSITIONAL) + 1} positional arguments")
    given = dict(zip(ORIGINAL_POSITIONAL, args, strict=False))
    for name in kwargs:
        if name in given:
            raise TypeError(f"KFAC got multiple values for argument {name!r}")
    given.update(kwargs)
    if given.get("lr") is not None and given.get("learning_rate") is not None:
        raise ValueError("pass the learning rate once: lr or learning_rate, not both")
    if "learning_rate" in given:
        lr = given.pop("learning_rate")
        given["lr"] = given.get("lr") if lr is None else lr
    if "update_factors_manually" in given and "update_cov_manually" in given:
        raise TypeError("pass update_cov_manually or update_factors_manually, not both")
    if "update_cov_manually" in given:
        given["update_factors_manually"] = given.pop("update_cov_manually")
    return KFACOptions(**given)


def signature(options: type[PreconditionerOptions], positional: tuple[str, ...] = ()) -> inspect.Signature:
    """The constructor signature shown for `options`' class: (self, model, <positional>, *, <rest>).

    With `positional` (KFAC's original argument list) the original names replace their options
    (`update_cov_manually`) and `learning_rate` is added; without it, an `options=` keyword.
    """
    P = inspect.Parameter
    defaults = {f.name: f.default for f in dataclasses.fields(options)}
    if positional:
        aliased = {option: alias for alias, option in ALIASES.items() if alias != "learning_rate"}
        defaults = {aliased.get(n, n): d for n, d in defaults.items()}
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("model", P.POSITIONAL_OR_KEYWORD, annotation=nn.Module)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=defaults[n]) for n in positional]
    extra = "learning_rate" if positional else "options"
    params.append(P(extra, P.KEYWORD_ONLY, default=None))
    params += [P(n, P.KEYWORD_ONLY, default=d) for n, d in defaults.items() if n not in positional]
    return inspect.Signature(params)
