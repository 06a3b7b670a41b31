"""KFACPreconditioner: K-FAC curvature and preconditioning in front of any torch optimizer.

It owns the curvature blocks, the hooks that feed them, the running factors and the cached
inverses. `KFAC` (the optimizer) is built on it; used on its own, `step()` replaces the `.grad`
of every supported layer with the natural gradient, and any `torch.optim` optimizer steps on that.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from itertools import combinations
from typing import Any

import torch
from torch import Tensor, nn

from torch_kfac.blocks import CurvatureBlock
from torch_kfac.blocks.conv import ConvBlock
from torch_kfac.blocks.embedding import EmbeddingBlock
from torch_kfac.blocks.kronecker import KroneckerFactors
from torch_kfac.calibration import initial_damping
from torch_kfac.capture import ModuleHooks, StatisticsCapture
from torch_kfac.distributed import LAYOUT_KEY, DistributedCurvature, check_model, is_distributed, unwrap
from torch_kfac.last_batch import LastBatch, TrainingPass, unavailable
from torch_kfac.linalg import LOW_PRECISION
from torch_kfac.losses import LossCurvature, loss_curvature
from torch_kfac.lowrank import GradientRows, RowCapture, verified_rows
from torch_kfac.options import (
    AUTO_DAMPING,
    AccumulatedPasses,
    Accumulation,
    FisherType,
    InverseMethod,
    PreconditionerOptions,
    Reduction,
    check_option,
    signature,
)
from torch_kfac.registration import make_blocks, report
from torch_kfac.update import per_parameter
from torch_kfac.utils import (
    autocast_off,
    call_model,
    deepcopy_sharing,
    leading_examples,
    own_backward,
    preserved_buffers,
)

#: 2^64 / golden ratio: spreads per-step seeds (MC labels, drawn patches) over the seed space.
_GOLDEN = 0x9E3779B97F4A7C15


class KFACPreconditioner:
    """Kronecker-factored natural-gradient preconditioner for a model's Linear and Conv layers.

    Typical loop::

        pre = KFACPreconditioner(model, damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            pre.step()   # .grad of supported layers <- (A (x) G + damping)^-1 .grad
            opt.step()

    Args:
        model: the network; every submodule with a registered block type gets a block.
        options: a `torch_kfac.options.PreconditionerOptions`, instead of the keywords.
        **kwargs: the options by name (`damping`, `fisher_type`, ...); each is documented and
            checked in `torch_kfac.options.PreconditionerOptions`.
    """

    def __init__(
        self, model: nn.Module, *, options: PreconditionerOptions | None = None, **kwargs: Any
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if options is not None and kwargs:
            raise TypeError("pass either options=... or the options as keywords, not both")
        self.options = opts = PreconditionerOptions(**kwargs) if options is None else options
        check_model(model)
        #: The user's last training pass, for a step called without the batch or loss it needs
        #: (hooks on the model as given: a DistributedDataParallel wrapper's own output).
        self.last_batch = None
        if opts.loss_fn is not None:
            take_last = opts.accumulated_passes == AccumulatedPasses.LAST
            self.last_batch = LastBatch(model, opts.loss_fn, self.own_pass, take_last)
        model = unwrap(model)  # DistributedDataParallel: blocks named without `module.`
        #: Communication with the other ranks (None on a single process; torch_kfac.distributed).
        self.distributed: DistributedCurvature | None = None
        self.mc_seed = opts.mc_seed
        self.loss_fn = opts.loss_fn
        self.loss_curvature: LossCurvature | None = (
            None if opts.loss_fn is None else loss_curvature(opts.loss_fn)
        )
        self.model = model
        self.blocks, self.fallback_reasons = make_blocks(model, opts.skip_modules)
        for block in self.blocks.values():
            block.configure(opts.approximation.value, opts.inverse_power, opts.kfac_approx.value)
        #: The convolution blocks that draw patches (`patches_per_dim`), seeded per step (`_seed_patches`).
        self._patch_blocks = [
            member
            for block in self.blocks.values()
            for member in block.hooked()
            if isinstance(member, ConvBlock) and opts.patches_per_dim is not None
        ]
        for member in self._patch_blocks:
            member.patches_per_dim = opts.patches_per_dim
        first = next(iter(model.parameters()), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
        device = first.device if first is not None else None
        #: Step counter and damping: the preconditioner's own state (`state_dict` saves it).
        self.global_state: dict[str, Any] = {
            "step": 0,
            "damping": torch.tensor(opts.initial_damping, dtype=factor_dtype(opts, dtype), device=device),
        }
        self._seed_patches()
        #: Steps skipped in a row for non-finite values, as of the last host check (`check`).
        self._skipped_in_a_row = 0
        #: Whether the latest step was taken, as of the last host check.
        self.latest_taken = True
        #: The current step's finiteness as a 0-d bool tensor while the host has not checked it
        #: (then every state change of the step is masked with it); None once known to be taken.
        self.taken: Tensor | None = None
        #: Whether `prepare` makes the host check (set by `KFAC` for its adaptive options).
        self.check_in_step = False
        self._unchecked: _Unchecked | None = None
        #: Blocks whose failed inverse refresh the host learnt of after the step: refreshed at the
        #: next step (with eigh where Cholesky failed).
        self._refresh_next: dict[str, str] = {}
        #: The initial damping damping='auto' chose (`torch_kfac.calibration`); None until then.
        self.calibrated_damping: float | None = None
        self._capture = StatisticsCapture(self.blocks, self._factors_due, opts.reduction.value, opts.center)
        self._capture.factor_dtype = opts.factor_dtype
        # Only Cholesky inverses precondition from the rows (eigenbases scale the rotated gradient).
        self.keep_gradient_rows(opts.low_rank_gradients and opts.inverse_method == InverseMethod.CHOLESKY)
        self.join_ranks()
        #: This step's gradient matrices that low-rank preconditioning may take from their rows.
        self._low_rank: dict[CurvatureBlock, GradientRows] = {}
        self._probe: torch.Generator | None = None
        # Gradient accumulation: whether the user's losses carry their micro-batch's share n / N
        # (`Statistic.share_scaled`). The preconditioner's own passes ('mc', 'type-2') never do,
        # and with those Fisher types the user's passes are not recorded.
        share_scaled = (
            opts.accumulation == Accumulation.WHOLE_BATCH
            and opts.reduction != Reduction.SUM
            and opts.fisher_type == FisherType.EMPIRICAL
        )
        for block in self._capture.hooked:
            block.share_scaled = share_scaled
        #: Examples of the backward passes since the last step (reduction='sum': the gradient is
        #: the sum of their losses' gradients), and how many passes they came in.
        self.examples = 0
        self.backward_passes = 0
        if opts.grad_scaler is not None:
            self._capture.loss_scale = partial(loss_scale, opts.grad_scaler)
        #: Embedding tables, whose lookups the root hook checks for outputs shared by the examples.
        self._embeddings = [b for b in self._capture.hooked if isinstance(b, EmbeddingBlock)]
        self._warned_shared: set[str] = set()
        self._warned_examples = False
        self._root_hooks = ModuleHooks()
        if opts.reduction in (Reduction.MEAN_POSITIONS, Reduction.SUM) or self._embeddings:
            self._root_hooks.add(model, self._observe_outputs)

    __init__.__signature__ = signature(PreconditionerOptions)  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        """For `copy.deepcopy` and pickling (the model is copied with it); refused in distributed runs."""
        if self.distributed is not None:
            raise TypeError(
                "K-FAC cannot be copied or pickled in a distributed run (its process group cannot): "
                "save and load its state_dict()"
            )
        return self.__dict__

    def __deepcopy__(self, memo: dict[int, Any]) -> KFACPreconditioner:
        return deepcopy_sharing(self, memo, (self.options.loss_fn, self.options.grad_scaler))

    def __getattr__(self, name: str) -> Any:
        """The options read as attributes (`pre.fisher_type`, `pre.reduction`, ...)."""
        options = self.__dict__.get("options")
        if options is not None and name in options.__dataclass_fields__:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _observe_outputs(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        """Count the loss terms per example from the model's outputs (reduction='mean_positions'),
        or the examples whose gradients the step will take (reduction='sum'); check the embedding
        lookups of the pass."""
        if self._embeddings:
            self._check_shared_lookups(outputs)
        if self.options.reduction == Reduction.SUM:
            output = _differentiable_output(outputs)
            if output is not None and not self._capture.own_pass():
                sizes = [b.batch_size for b in self._capture.hooked if b.batch_size is not None]
                if sizes:
                    output.register_hook(partial(self._count_examples, sizes[0]))
            return
        if (
            self.options.reduction == Reduction.MEAN_POSITIONS
            and isinstance(outputs, Tensor)
            and self.loss_curvature is not None
        ):
            terms = self.loss_curvature.terms_per_example(outputs)
            for block in self._capture.hooked:
                block.loss_terms = terms

    def _check_shared_lookups(self, outputs: Any) -> None:
        """Warn (once per table) about an embedding recorded in this pass with ids of fewer or more
        rows than the model's output has examples: a lookup shared by the examples (position ids
        `arange(T)` or `(1, T)`, broadcast over the batch) gets their summed gradient, not the
        per-example gradients its G needs."""
        recorded = [b for b in self._embeddings if b.new_examples and b.name not in self._warned_shared]
        batch = _leading_size(outputs) if recorded else None
        if batch is None or batch < 2:
            return
        for block in recorded:
            if block.batch_size != batch:
                self._warned_shared.add(block.name)
                warnings.warn(
                    f"K-FAC: nn.Embedding {block.name!r} was looked up with ids of {block.batch_size} "
                    f"row(s) for a batch of {batch} examples: its output is shared by the examples "
                    "(broadcast, as position embeddings of ids arange(T) or (1, T) are), so its block "
                    "sees their summed gradient, not the per-example gradients its factor G needs. "
                    "Look the table up with ids of shape (N, T) (positions.expand(N, T); Hugging Face "
                    "models: position_ids=torch.arange(T).expand(N, T)), or pass "
                    f"skip_modules=[{block.name!r}] to give it the plain update",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _count_examples(self, examples: int, grad: Tensor) -> None:
        """Tensor hook on the model's output: a backward pass of `examples` examples ran."""
        self.examples += examples
        self.backward_passes += 1

    def forget_examples(self) -> None:
        """Start counting the examples of the next step's backward passes."""
        self.examples = self.backward_passes = 0

    # ------------------------------------------------------------------- schedule
    @property
    def steps(self) -> int:
        """Number of steps so far, the counter of the factor and inverse schedules.

        A step skipped for non-finite values is not counted when the host check is made in the step
        (`host_check_interval`, `max_skipped_steps`, adaptive options): then it changes nothing.
        Without a check in the step the device masks the step's changes but the counter (a host
        number) advances.
        """
        return int(self.global_state["step"])

    @property
    def skipped_in_a_row(self) -> int:
        """Steps skipped in a row for non-finite values up to the latest step (a host check)."""
        self.check()
        return self._skipped_in_a_row

    @property
    def damping(self) -> Tensor:
        """The current damping, a 0-d tensor."""
        return self.global_state["damping"]

    @damping.setter
    def damping(self, value: float | Tensor) -> None:
        self.set_damping(self.damping.new_tensor(check_option("damping", value)))

    def set_damping(self, value: Tensor) -> None:
        """The one place the damping is written: checked values, or a damping computed on the
        device by a rule that keeps it in range (no host sync)."""
        self.global_state["damping"].copy_(value)

    def calibrate(self, damping: float, refresh: bool = True) -> None:
        """Set the damping damping='auto' chose, and the inverses that use it (`refresh=False`:
        the inverses in place already use it)."""
        self.calibrated_damping = damping
        self.set_damping(self.damping.new_tensor(damping))
        if refresh:
            self.update_inverses(force=True)

    def _factors_due(self) -> bool:
        """Whether the user's own passes should be recorded now (empirical Fisher only)."""
        return self.options.fisher_type == FisherType.EMPIRICAL and self._factor_step()

    def join_ranks(self) -> None:
        """Communicate with the other ranks once `torch.distributed` runs with more than one:
        called at construction and at the start of every step (`step`, `KFAC.step`), the first
        chance where the process group is initialized after the optimizer was built (the Hugging
        Face Trainer does it in `TrainingArguments`). Collective: every rank joins at the same step."""
        if self.distributed is not None or not is_distributed():
            return
        if self.steps > 0:
            raise RuntimeError(
                "K-FAC: torch.distributed was initialized after the optimizer's first step; the "
                "ranks' factors were estimated apart and would precondition differently. Initialize "
                "the process group before the first step (the optimizer may be built before it)"
            )
        opts = self.options
        self.distributed = DistributedCurvature(opts.grad_worker_fraction, opts.reduce_upper_triangle)
        if self.mc_seed is None and opts.fisher_type == FisherType.MC:
            self.mc_seed = self.distributed.shared_seed()
        # The rows are one process's; in distributed runs the gradient is the ranks' average.
        self.keep_gradient_rows(False)
        layouts = self.global_state.get(LAYOUT_KEY)
        if layouts:  # a checkpoint loaded before: owners, and only this rank's inverses
            self.distributed.after_load(self.blocks, layouts)

    def fisher_pass_due(self) -> bool:
        """Whether this step runs the own Fisher pass (fisher_type 'mc' or 'type-2' on a
        factor-update step), which needs the batch."""
        return self.options.fisher_type != FisherType.EMPIRICAL and self._factor_step()

    def fisher_batch_error(self, why: str = "") -> ValueError:
        """The error of a Fisher pass due without its batch (`why`: why no training pass gave one)."""
        return ValueError(
            f"fisher_type={self.options.fisher_type.value!r} needs step(batch=(inputs, targets)) on "
            f"factor-update steps{why}"
        )

    def _factor_step(self) -> bool:
        if self.options.update_factors_manually or self.steps < self.options.warmup_steps:
            return True
        return self.steps % self.options.value_at("factor_update_steps", self.steps) == 0

    def _inverses_due(self, name: str) -> bool:
        block = self.blocks[name]
        if not block.has_factors():
            return False
        if self.distributed is not None:  # DISTRIBUTED: not every rank holds the inverses
            ready = name in self.global_state.get(LAYOUT_KEY, {})
        else:
            ready = block.has_inverses()
        if self.steps < self.options.warmup_steps or not ready or name in self._refresh_next:
            return True
        return self.steps % self.options.value_at("inverse_update_steps", self.steps) == 0

    # -------------------------------------------------------------------- tracking
    def track_forward(self) -> AbstractContextManager[None]:
        """Context: record layer inputs only inside it (switches to explicit tracking)."""
        self._check_explicit()
        return self._capture.track_forward()

    def track_backward(self) -> AbstractContextManager[None]:
        """Context: record output gradients only inside it (switches to explicit tracking)."""
        self._check_explicit()
        return self._capture.track_backward()

    def _check_explicit(self) -> None:
        if self.options.fisher_type != FisherType.EMPIRICAL:
            raise ValueError(
                f"fisher_type={self.options.fisher_type!r} records its own passes in step(batch=...); "
                "the tracking contexts decide what is recorded only with fisher_type='empirical'"
            )

    def fisher_pass(self, batch: tuple[Any, Tensor]) -> None:
        """Record statistics from the preconditioner's own pass: sampled labels or Fisher columns.

        A forward pass on the batch, then backward passes that stop at the layers' outputs (no
        parameter gradient is computed or changed): `mc_samples` of the gradient of `loss_fn` on
        labels drawn from the model ('mc'), or one per column of the exact Fisher's square root
        ('type-2'). Model buffers (batch-norm statistics) are left as they were.
        """
        inputs, targets = batch
        if self.options.fisher_batch_size is not None:
            inputs, targets = leading_examples(inputs, targets, self.options.fisher_batch_size)
        sizes = [(block, block.batch_size) for block in self._capture.hooked]
        try:
            with own_backward(f"the {self.options.fisher_type.value!r} Fisher's own pass"):
                self._own_pass(inputs, targets)
        finally:  # the batch size of the user's pass (reduction='sum' reads it), not the sub-batch's
            for block, size in sizes:
                block.batch_size = size

    def _own_pass(self, inputs: Any, targets: Tensor) -> None:
        """The forward and backward passes of `fisher_pass` on (a sub-batch of) the batch."""
        assert self.loss_fn is not None and self.loss_curvature is not None
        with self._capture.forced() as layer_outputs, preserved_buffers(self.model), torch.enable_grad():
            outputs = call_model(self.model, inputs)
            if not layer_outputs or (isinstance(outputs, Tensor) and not all_finite([outputs])):
                return  # nothing to record; non-finite outputs: `prepare` skips the step
            if self.options.fisher_type == FisherType.MC:
                generator = None
                if self.mc_seed is not None:
                    generator = torch.Generator(device=outputs.device)
                    generator.manual_seed((self.mc_seed + self.steps * _GOLDEN) % 2**63)
                for i in range(self.options.mc_samples):
                    if self.distributed is not None:  # DISTRIBUTED: rows of the global batch's labels
                        assert generator is not None
                        sample = self.loss_curvature.sample_targets
                        sampled = self.distributed.sample_targets(sample, outputs, targets, generator)
                    else:
                        sampled = self.loss_curvature.sample_targets(outputs, targets, generator)
                    loss = self.loss_curvature.sampled_loss(outputs, targets, sampled)
                    torch.autograd.grad(
                        loss, layer_outputs, retain_graph=i + 1 < self.options.mc_samples, allow_unused=True
                    )
            else:
                columns = self.loss_curvature.fisher_columns(outputs, targets)
                # The pending statistics average over backward passes; the type-2 Fisher sums
                # over columns, hence the sqrt(K) on each of the K columns.
                columns = columns * columns.shape[0] ** 0.5
                for i, column in enumerate(columns):
                    torch.autograd.grad(
                        outputs, layer_outputs, column, retain_graph=i + 1 < len(columns), allow_unused=True
                    )

    def paused(self) -> AbstractContextManager[None]:
        """Context: record no statistics (extra forward passes of the optimizer itself)."""
        return self._capture.paused()

    def own_pass(self) -> bool:
        """Whether the pass running now is the optimizer's own (a Fisher pass, or a paused one)."""
        return self._capture.own_pass()

    def pending_statistics(self) -> list[Tensor]:
        """Statistics recorded since the last fold, for a finiteness check."""
        return [b.pending(k) for b in self.blocks.values() for k in b.FACTORS if b.has_pending(k)]

    def _statistics(self) -> dict[tuple[str, str], Tensor]:
        """(block, factor) -> the pending statistic; averaged over ranks in distributed runs."""
        if not self._warned_examples:
            self._check_example_counts()
        stats = {(n, k): b.pending(k) for n, b in self.blocks.items() for k in b.FACTORS if b.has_pending(k)}
        if self.distributed is not None and stats:  # DISTRIBUTED: one all-reduce per dtype
            stats = self.distributed.average_statistics(stats)
        return stats

    def _check_example_counts(self) -> None:
        """Warn (once) when two layers' pending statistics count disjoint numbers of examples.

        Each layer counts the examples of a call along dimension 0 of its input (recurrent layers
        and attention along their batch dimension) and scales its factor G by that count, so the
        layers of one pass must agree on it. A layer on sequence-first activations counts time
        steps, and one on flattened (N * T, d) rows counts positions: its curvature is then on
        another scale than the other layers'. Counts that merely differ (a layer called only in
        some micro-batches) are not disjoint. Embedding tables already reported as shared by the
        examples (`_check_shared_lookups`) are left out.
        """
        layers: dict[frozenset[int], str] = {}
        for block in self._capture.hooked:
            counts = frozenset(block.pending_examples())
            if counts and block.name not in self._warned_shared:
                layers.setdefault(counts, block.name)
        for (first, a), (second, b) in combinations(layers.items(), 2):
            if first.isdisjoint(second):
                self._warned_examples = True
                warnings.warn(
                    f"K-FAC: layers {a!r} and {b!r} count different numbers of examples in the same "
                    f"passes ({_counts(first)} and {_counts(second)}, along dimension 0 of their inputs; "
                    "recurrent layers and attention along their batch dimension). Each layer scales "
                    "its curvature by its count, so one of them is preconditioned on another scale "
                    "than the rest: a layer on sequence-first activations (T, N, d) counts time steps "
                    "and one on flattened (N * T, d) rows counts positions. Keep activations "
                    "batch-first, e.g. nn.LSTM(batch_first=True) with inputs (N, T, ...) and layers "
                    "applied to (N, T, d), or give the layer the plain update with skip_modules",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return

    def update_factors(self) -> bool:
        """Fold the recorded statistics into the running factors.

        Non-finite statistics are dropped with a warning and the factors are left as they were.
        Returns whether the factors changed.
        """
        stats = self._statistics()
        if not stats:
            return False
        if not all_finite(stats.values()):
            self.discard_statistics()
            warnings.warn(
                "K-FAC: non-finite layer statistics; the factors were not updated",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        self._fold(stats)
        return True

    def _fold(self, stats: dict[tuple[str, str], Tensor], taken: Tensor | None = None) -> None:
        """Fold the statistics into the running factors (masked with `taken`: a factor is left as it
        was where `taken` is False)."""
        decay = self.options.cov_ema_decay
        if self.distributed is None:
            for block in self.blocks.values():
                block.fold_pending(decay, taken)
            return
        # DISTRIBUTED: fold the statistics averaged over ranks, not the local ones.
        for (name, key), value in stats.items():
            self.blocks[name].fold_statistic(key, value, decay, taken)
        for block in self.blocks.values():
            block.clear_pending()

    def discard_statistics(self) -> None:
        """Drop statistics recorded since the last fold (the step's patch draws start again)."""
        for block in self.blocks.values():
            block.clear_pending()
        self._seed_patches()

    def _seed_patches(self) -> None:
        """Seed each drawing convolution block for the coming step from (step, block), like the MC
        labels' `mc_seed`: a run restored from a checkpoint draws the patches an uninterrupted run
        draws."""
        for i, block in enumerate(self._patch_blocks):
            block.seed_patches((self.steps * _GOLDEN + i) % 2**63)

    def reset_factors(self) -> None:
        """Forget the running factors, cached inverses and pending statistics."""
        for block in self.blocks.values():
            block.clear_pending()
            block.state.clear()
        self.global_state.pop(LAYOUT_KEY, None)

    def update_inverses(self, force: bool = False) -> None:
        """Refresh the inverses of blocks that are due (every block with factors if `force`), then
        make the host check (`check`).

        A block whose Cholesky inverses failed (rounding made a damped factor indefinite) is
        decomposed with eigh instead; a block whose new inverses cannot be computed (an
        eigendecomposition that does not converge) or are not finite keeps its previous ones (none:
        the raw gradient), with a warning.
        """
        self.check(self._refresh_inverses(force))

    def _refresh_inverses(
        self, force: bool = False, taken: Tensor | None = None
    ) -> dict[str, dict[str, Tensor]]:
        """Refresh the due inverses without a host read; returns each refreshed block's state before.

        Whether a block's new inverses are finite is decided on the device: where they are not, the
        block keeps its previous inverses (where it has none, identities: the raw gradient), and
        the host learns of it at the next `check`: not in a skipped step (`taken` False), whose
        factors may not be estimated yet.
        """
        due = [n for n, b in self.blocks.items() if b.has_factors() and (force or self._inverses_due(n))]
        here = due
        if self.distributed is not None:  # DISTRIBUTED: each block refreshed by its owner
            here = self.distributed.computes(self.blocks, due, self.global_state.setdefault(LAYOUT_KEY, {}))
        refreshed = {}
        before = {}
        pi = self.options.enable_pi_correction
        for name in here:
            block = self.blocks[name]
            previous = before[name] = dict(block.state)
            method = self._refresh_next.pop(name, self.options.inverse_method.value)
            try:
                block.update_inverses(self.damping, pi, method)
            except torch.linalg.LinAlgError as exc:
                if taken is not None and not bool(taken):  # a skipped step's factors: no failure
                    block.state.clear()
                    block.state.update(previous)
                    continue
                _keep_inverses(name, block, previous, str(exc).splitlines()[0])
                continue
            new = {k: t for k, t in block.state.items() if previous.get(k) is not t}
            ok = finite_flag(new.values(), self.damping.device)
            for key, value in new.items():
                kept = previous.get(key)
                if kept is None:
                    kept = _identity_like(value) if key.endswith("_inv") else value
                block.state[key] = torch.where(ok, value, kept)
            if taken is not None:
                ok = ok | ~taken
            flags = self._unchecked_flags().inverses_ok
            flags[name] = ok if name not in flags else flags[name] & ok
            refreshed[name] = previous
        if self.distributed is not None:  # DISTRIBUTED: owners broadcast to the blocks' grad workers
            self.distributed.share_inverses(self.blocks, due, before, self.global_state[LAYOUT_KEY])
        return refreshed

    def _retry_with_eigh(
        self, name: str, block: CurvatureBlock, previous: dict[str, Tensor], method: str
    ) -> None:
        """A block whose new inverses are not finite: decomposed with eigh if Cholesky failed, else
        (or if that fails too) its previous inverses are kept, with a warning."""
        why = "the result is not finite"
        if method == InverseMethod.CHOLESKY:
            try:
                block.update_inverses(
                    self.damping, self.options.enable_pi_correction, InverseMethod.EIGH.value
                )
                if all_finite(_new_tensors(block, previous)):
                    return
            except torch.linalg.LinAlgError as exc:
                why = str(exc).splitlines()[0]
        _keep_inverses(name, block, previous, why)

    # ------------------------------------------------------------------- host check
    def _unchecked_flags(self) -> _Unchecked:
        """The device flags gathered since the last host check (started on the damping's device)."""
        if self._unchecked is None:
            zero = torch.zeros((), dtype=torch.int64, device=self.damping.device)
            self._unchecked = _Unchecked(zero, zero + self._skipped_in_a_row, zero, zero - 1)
        return self._unchecked

    def _note_step(self, taken: Tensor) -> None:
        """Count the step on the device: skipped (not `taken`) steps, the run of them, the latest."""
        flags = self._unchecked_flags()
        skipped = (~taken).long()
        flags.skipped = flags.skipped + skipped
        flags.run = (flags.run + 1) * skipped
        flags.longest = torch.maximum(flags.longest, flags.run)
        flags.last = torch.where(taken, flags.last, self.steps)

    def _check_due(self) -> bool:
        """Whether `prepare` makes the host check in this step."""
        opts = self.options
        if self.check_in_step or opts.max_skipped_steps is not None:
            return True
        if opts.damping == AUTO_DAMPING and self.steps == 0:  # the calibration reads anyway
            return True
        interval = opts.host_check_interval
        return interval is not None and (self.steps + 1) % interval == 0

    def check(
        self, current: dict[str, dict[str, Tensor]] | None = None, extra: Tensor | None = None
    ) -> tuple[bool, bool]:
        """The host check: one read of what the device decided since the last check.

        Warns of skipped steps (and raises once `max_skipped_steps` were skipped in a row) and of
        failed inverse refreshes: those of the current step (`current`: the refreshed blocks'
        state before) are retried with eigh or undone now, a skipped current step's refreshes
        undone; earlier ones are refreshed again at the next step. `extra`, a 0-d bool tensor, is
        read in the same read. Returns (whether the latest step was taken, `extra`'s value).
        """
        flags, self._unchecked = self._unchecked, None
        if flags is None:
            return self.latest_taken, bool(extra) if extra is not None else False
        names = list(flags.inverses_ok)
        counts = [flags.skipped, flags.run, flags.longest, flags.last]
        more = [t.long() for t in flags.inverses_ok.values()] + ([extra.long()] if extra is not None else [])
        values = torch.stack(counts + more).tolist()
        skipped, run, longest, last = values[:4]
        self._skipped_in_a_row = run
        self.latest_taken = taken = run == 0
        current = current or {}
        if not taken:  # the current step changes nothing: its refreshed inverses are put back
            for name, previous in current.items():
                self.blocks[name].state.clear()
                self.blocks[name].state.update(previous)
        method = self.options.inverse_method.value
        for name, ok in zip(names, values[4 : 4 + len(names)], strict=True):
            if ok or (not taken and name in current):
                continue
            block = self.blocks[name]
            if name in current:
                block.state.clear()
                block.state.update(current[name])
                self._retry_with_eigh(name, block, current[name], method)
            else:
                self._refresh_next[name] = InverseMethod.EIGH.value if method == "cholesky" else method
                _warn_kept(name, "the result is not finite; refreshed again at the next step")
        if skipped and self.options.grad_scaler is None:  # else loss-scale overflows: the scaler skips too
            message = (
                f"K-FAC: non-finite gradient, statistic or loss at step {last}; the step was skipped "
                f"and parameters and factors left unchanged ({run} skipped in a row, {skipped} since "
                "the last host check)"
            )
            limit = self.options.max_skipped_steps
            if limit is not None and longest >= limit:
                raise RuntimeError(f"{message}: max_skipped_steps={limit} reached")
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return taken, bool(values[-1]) if extra is not None else False

    # ---------------------------------------------------------------- preconditioning
    def grad_scale(self) -> float:
        """Factor turning the gradient of the user's loss into that of the mean-reduced loss.

        With reduction='sum' that is 1/N, N the examples of every backward pass since the last
        step (gradient accumulation), or the last forward pass's where no output of the model
        requires grad (a backward pass that starts elsewhere).
        """
        if self.options.reduction != Reduction.SUM:
            return 1.0
        if self.examples:
            return 1.0 / self.examples
        sizes = [b.batch_size for b in self._capture.hooked if b.batch_size is not None]
        if not sizes:
            raise RuntimeError("reduction='sum' needs the batch size: run a forward pass first")
        return 1.0 / sizes[0]

    def batch_scale(self, targets: Tensor) -> float:
        """Factor turning a loss measured on a batch with these targets (and its curvature) into
        the mean-loss scale: `grad_scale`, except with reduction='sum' after several backward
        passes (gradient accumulation), where the batch may be one micro-batch of the N examples:
        then 1/its examples (dimension 0, as for `fisher_batch_size`)."""
        if self.options.reduction != Reduction.SUM or self.backward_passes < 2:
            return self.grad_scale()
        return 1.0 / (targets.shape[0] if targets.dim() > 0 else 1)

    def precondition(self, block: CurvatureBlock, mat: Tensor) -> Tensor:
        """Natural gradient of one block's gradient matrix; the raw matrix if no factors yet."""
        if not block.has_inverses():
            return mat
        rows = self._low_rank.get(block)
        if rows is not None and rows.mat is mat:
            assert isinstance(block.approx, KroneckerFactors)  # RowCapture takes no other
            natural = block.approx.precondition_rows(rows.g_rows, rows.a_rows)
            if natural is not None:
                return natural.to(mat.dtype)
        opts = self.options
        natural = block.precondition(
            mat.to(self.damping.dtype), self.damping, opts.enable_pi_correction, opts.damping_type.value
        )
        return natural.to(mat.dtype)

    def precondition_all(self, mats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Natural gradients of several blocks' gradient matrices (keyed by block name).

        In distributed runs each block's grad workers compute it and broadcast it to the others.
        """
        if self.distributed is None:
            return {name: self.precondition(self.blocks[name], mat) for name, mat in mats.items()}
        # DISTRIBUTED: computed where the inverses are, then broadcast.
        layouts = self.global_state.get(LAYOUT_KEY, {})
        return self.distributed.precondition(
            dict(mats), lambda name, mat: self.precondition(self.blocks[name], mat), layouts
        )

    def average_over_ranks(self, value: Tensor) -> Tensor:
        """The mean over ranks of a loss or Gram matrix (the value itself on one process)."""
        return value if self.distributed is None else self.distributed.average(value)

    def quadratic_form(self, part: Callable[[Tensor], Tensor | None]) -> Tensor:
        """delta^T C delta with C the K-FAC curvature of the blocks that have factors.

        `part(param)` is delta's part for a parameter (None: delta leaves the block out).
        """
        total = self.damping.new_zeros(())
        for block in self.blocks.values():
            parts = [part(p) for p in block.parameters()]
            if not block.has_factors() or parts[0] is None:
                continue
            mat = block.pack(parts).to(self.damping.dtype)
            total = total + (mat * block.curvature_product(mat)).sum()
        return total

    @property
    def active_blocks(self) -> dict[str, CurvatureBlock]:
        """The blocks all of whose parameters are trainable now.

        A block with a parameter frozen after construction (`requires_grad=False`) is left out: its
        Kronecker solve would mix the trainable parameters' gradients with a zero gradient of the
        frozen one (and write a gradient into it); its trainable parameters get the plain update.
        """
        return {n: b for n, b in self.blocks.items() if all(p.requires_grad for p in b.parameters())}

    def check_gradients(self) -> None:
        """A clear error, before any state changes, when no parameter of the model has a gradient."""
        if not any(p.grad is not None for p in self.model.parameters() if p.requires_grad):
            raise ValueError(
                "K-FAC step: no parameter has a gradient; call loss.backward() (or pass a closure) "
                "before step()"
            )

    def gradient_matrices(self) -> dict[str, Tensor]:
        """Current gradients of the (active) blocks, as mean-loss gradient matrices.

        Those that the rows kept since the last step reproduce are preconditioned from the rows
        (option `low_rank_gradients`; `torch_kfac.lowrank`).
        """
        scale = self.grad_scale() if self.blocks else 1.0
        mats = {}
        for name, block in self.active_blocks.items():
            mat = block.grad_matrix()
            if mat is not None:
                mats[name] = mat * scale if scale != 1.0 else mat
        rows = self._capture.gradient_rows
        self._low_rank = {}
        if rows is not None and rows.rows:
            # The probe's verdicts are one host read: free on the CPU, elsewhere made only in a
            # step that synchronises for its host check anyway (a fixed step stays sync-free).
            if not self._reads_are_free() and not self._check_due():
                rows.clear()
                return mats
            if self._probe is None:  # its own generator: the user's random stream is left alone
                self._probe = torch.Generator(device=self.damping.device).manual_seed(0)
            self._low_rank = verified_rows(rows, mats, self.blocks, self.damping.dtype, self._probe)
        return mats

    def _reads_are_free(self) -> bool:
        """Whether a host read costs nothing (the state lives on the CPU: no queue to wait for)."""
        return self.damping.device.type == "cpu"

    def keep_gradient_rows(self, on: bool) -> None:
        """Keep the Linear layers' rows for low-rank preconditioning (`low_rank_gradients`) or not."""
        self._capture.gradient_rows = RowCapture(self.blocks.values()) if on else None

    def clear_gradient_rows(self) -> None:
        """Forget the rows kept with gradients that are being cleared."""
        if self._capture.gradient_rows is not None:
            self._capture.gradient_rows.clear()

    def prepare(
        self, extra: Iterable[Tensor] = (), batch: tuple[Any, Tensor] | None = None
    ) -> dict[str, Tensor] | None:
        """Start of a step: check finiteness, fold due statistics, refresh due inverses.

        With fisher_type 'mc' or 'type-2', a factor-update step first runs `fisher_pass(batch)`.
        Whether every gradient, recorded statistic and `extra` tensor is finite is decided on the
        device: `taken`, a 0-d bool tensor, masks the step's changes (factors folded, inverses
        refreshed) and the caller's. Without a host check in the step (`host_check_interval`) the
        host learns of a skipped step at the next `check`. With a check: returns None (with one
        warning) for a skipped step, after which nothing has changed, and sets `taken` to None.
        Returns the blocks' gradient matrices.
        """
        self._follow_model()
        if self.fisher_pass_due():
            if batch is None:
                raise self.fisher_batch_error()
            self.fisher_pass(batch)
        mats = self.gradient_matrices()
        stats = self._statistics()
        taken = finite_flag([*mats.values(), *stats.values(), *extra], self.damping.device)
        self._note_step(taken)
        if not self.options.update_factors_manually:
            self._fold(stats, taken)
        # damping='auto' refreshes every inverse at the calibrated damping below: none before it.
        calibrating = self.options.damping == AUTO_DAMPING and self.steps == 0
        current = {} if calibrating else self._refresh_inverses(taken=taken)
        self.taken = taken
        if self._check_due():
            is_taken, _ = self.check(current)
            if not is_taken:
                self.discard_statistics()
                self.forget_examples()
                return None
            self.taken = None
        if calibrating:  # torch_kfac.calibration, in the factors' dtype (16-bit models: float32)
            self.calibrate(
                initial_damping(self.blocks, {n: m.to(self.damping.dtype) for n, m in mats.items()})
            )
        return mats

    def _follow_model(self) -> None:
        """Keep factors and damping on the parameters' device, in the factor dtype, after `model.to()`."""
        if not self.blocks:
            return
        w = next(iter(self.blocks.values())).parameters()[0]
        dtype = factor_dtype(self.options, w.dtype)
        for block in self.blocks.values():
            block.follow_weight(dtype)
        damping = self.global_state["damping"]
        if damping.device != w.device or damping.dtype != dtype:
            self.global_state["damping"] = damping.to(device=w.device, dtype=dtype)

    def finish_step(self) -> None:
        """End of a step: advance the step counter that schedules factor and inverse updates."""
        self.global_state["step"] = self.steps + 1
        self.forget_examples()
        self._low_rank = {}
        self._seed_patches()

    @torch.no_grad()
    def step(self, batch: tuple[Any, Tensor] | None = None) -> bool | Tensor:
        """Replace the `.grad` of each block's parameters by the preconditioned gradient.

        `batch=(inputs, targets)` is needed by fisher_type 'mc' and 'type-2'; omitted, it is that
        of the training pass since the last step, `loss_fn(model(*inputs), targets)` run with
        gradients enabled (`torch_kfac.last_batch`), and without one the step raises, saying why.
        A step with a non-finite gradient or statistic is skipped: the gradients stay as they were
        and the factors and inverses unchanged. Returns whether the step was taken: a bool after a
        host check in the step, else a 0-d bool tensor (reading it is the host read the step
        saved). Autocast is off inside, wherever it is called.
        """
        self.join_ranks()
        last = None if self.last_batch is None else self.last_batch.take()
        with self.autocast_off():
            if batch is None and self.fisher_pass_due():
                if not isinstance(last, TrainingPass):
                    raise self.fisher_batch_error(unavailable(last))
                batch = (last.inputs, last.targets)
            mats = self.prepare(batch=batch)
            if mats is None:
                return False
            taken = self.taken
            for param, new_grad in per_parameter(self.blocks, self.precondition_all(mats)):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.copy_(new_grad if taken is None else torch.where(taken, new_grad, param.grad))
            self.finish_step()
            return True if taken is None else taken

    def autocast_off(self) -> AbstractContextManager[None]:
        """Context: autocast off on the model's devices (`utils.autocast_off`)."""
        return autocast_off(p.device.type for p in self.model.parameters())

    # --------------------------------------------------------------------- reporting
    def describe(self) -> str:
        """Registration report: every parameter, the block that handles it or why it falls back."""
        return report(self.model, self.blocks, self.fallback_reasons)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n{self.describe()}\n)"

    # -------------------------------------------------------------------- state
    def state_dict(self, *, complete: bool = True) -> dict[str, Any]:
        """Factors, inverses and schedule state, keyed by module name.

        In distributed runs with `complete` every rank must call it: it gathers the inverses
        other ranks hold, so the result loads with any number of ranks. `complete=False` keeps
        this rank's own (a snapshot it restores itself).
        """
        if complete:
            self.check()
        blocks = {name: {k: v.clone() for k, v in b.state.items()} for name, b in self.blocks.items()}
        if complete and self.distributed is not None:  # DISTRIBUTED: collective
            layouts = self.global_state.get(LAYOUT_KEY, {})
            for name, entries in self.distributed.gather_inverses(self.blocks, layouts).items():
                blocks[name].update(entries)
        return {
            "global": {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.global_state.items()},
            "blocks": blocks,
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """A ValueError naming the block when `state` does not fit this model: other blocks, factors of
        another approximation, or factors whose shapes do not fit the block's parameters."""
        missing = set(self.blocks) ^ set(state["blocks"])
        if missing:
            raise ValueError(f"state dict does not match the model's blocks: {sorted(missing)}")
        for name, block in self.blocks.items():
            loaded = state["blocks"][name]
            factors = {k for k in loaded if k.endswith("_ema")}
            expected = {f"{k}_ema" for k in block.FACTORS}
            if factors and factors != expected:
                raise ValueError(
                    f"state dict: block {name!r} holds the factors {sorted(factors)}, but its approximation "
                    f"({self.options.approximation.value}) keeps {sorted(expected)}"
                )
            if not factors:
                continue
            own = block.state
            block.state = {k: v.to(block.parameters()[0].device) for k, v in loaded.items()}
            try:
                zero = block.pack([torch.zeros_like(p) for p in block.parameters()])
                block.curvature_product(zero)
            except RuntimeError as err:
                shapes = {k: tuple(v.shape) for k, v in loaded.items() if k in factors}
                params = [tuple(p.shape) for p in block.parameters()]
                raise ValueError(
                    f"state dict: the factors of block {name!r} {shapes} do not fit its parameters {params} "
                    f"(a model with other layer sizes?): {str(err).splitlines()[0]}"
                ) from None
            finally:
                block.state = own

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (tensors moved to each block's device), after
        `check_state_dict`."""
        self.check_state_dict(state)
        self.restore(state)

    def restore(self, state: dict[str, Any]) -> None:
        """`load_state_dict` without the check: for a state this preconditioner returned itself
        (the snapshots of step rejection and of the damping search)."""
        for name, block in self.blocks.items():
            block.state.clear()
            block.state.update(
                {k: v.to(block.parameters()[0].device).clone() for k, v in state["blocks"][name].items()}
            )
        damping = self.global_state["damping"]
        self.global_state.update(state["global"])
        self.global_state["damping"] = damping.copy_(state["global"]["damping"])
        self._seed_patches()
        if self.distributed is not None:  # DISTRIBUTED: keep only the inverses this rank holds
            self.distributed.after_load(self.blocks, self.global_state.get(LAYOUT_KEY, {}))

    def close(self) -> None:
        """Remove the hooks from the model (and from `loss_fn`)."""
        self._capture.remove()
        if self.last_batch is not None:
            self.last_batch.remove()
        self._root_hooks.remove()


def _output_tensors(outputs: Any) -> Iterator[Tensor]:
    """The tensors a model returned: the output itself, or those in a tuple, list or mapping such
    as a Hugging Face `ModelOutput`, in order."""
    if isinstance(outputs, Mapping):
        outputs = tuple(outputs.values())
    candidates = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return (t for t in candidates if isinstance(t, Tensor))


def _differentiable_output(outputs: Any) -> Tensor | None:
    """The first output of a model that requires grad: its gradient hook fires in the user's
    backward passes."""
    return next((t for t in _output_tensors(outputs) if t.requires_grad), None)


def _counts(counts: frozenset[int]) -> str:
    """A layer's example counts as text: '1 example', '5 examples', '5 and 8 examples'."""
    return " and ".join(str(n) for n in sorted(counts)) + (" example" if counts == {1} else " examples")


def _leading_size(outputs: Any) -> int | None:
    """Dimension 0 of a model's first output tensor with one (a Hugging Face `ModelOutput`'s 0-d
    loss is passed over)."""
    return next((int(t.shape[0]) for t in _output_tensors(outputs) if t.dim() > 0), None)


def _new_tensors(block: CurvatureBlock, previous: dict[str, Tensor]) -> list[Tensor]:
    """The state tensors a block replaced since `previous` was copied (its new inverses)."""
    return [t for k, t in block.state.items() if previous.get(k) is not t]


def _keep_inverses(name: str, block: CurvatureBlock, previous: dict[str, Tensor], why: str) -> None:
    """Put back a block's state from before a failed inverse update, and say so."""
    block.state.clear()
    block.state.update(previous)
    _warn_kept(name, why)


def _warn_kept(name: str, why: str) -> None:
    warnings.warn(
        f"K-FAC: the inverse update of block {name!r} failed ({why}); its previous inverses are kept",
        RuntimeWarning,
        stacklevel=5,
    )


def _identity_like(inverse: Tensor) -> Tensor:
    """An identity in the layout of a cached inverse (ones for a diagonal): the raw gradient."""
    if inverse.dim() >= 2 and inverse.shape[-1] == inverse.shape[-2]:
        eye = torch.eye(inverse.shape[-1], dtype=inverse.dtype, device=inverse.device)
        return eye.expand_as(inverse)
    return torch.ones_like(inverse)


@dataclass
class _Unchecked:
    """What the device decided and the host has not read yet (0-d tensors, updated without a read)."""

    #: Steps skipped since the last host check.
    skipped: Tensor
    #: Steps skipped in a row up to the latest step.
    run: Tensor
    #: The longest such run since the last host check.
    longest: Tensor
    #: The latest skipped step (-1: none).
    last: Tensor
    #: Per refreshed block: whether its new inverses were finite (at every refresh).
    inverses_ok: dict[str, Tensor] = field(default_factory=dict)


def factor_dtype(options: PreconditionerOptions, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of factors and inverses: the option, else the parameters' (float32 for 16 bits)."""
    if options.factor_dtype is not None:
        return options.factor_dtype
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def loss_scale(scaler: torch.amp.GradScaler) -> Tensor | None:
    """The scaler's current loss scale, a device tensor (no host sync); None when it is disabled."""
    return scaler._scale if scaler.is_enabled() else None


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor is finite, with a single host synchronisation (`finite_flag`, read)."""
    return bool(finite_flag(tensors))


def finite_flag(tensors: Iterable[Tensor], device: torch.device | None = None) -> Tensor:
    """Whether every tensor is finite, as a 0-d bool tensor (on `device` when there are none).

    A NaN or inf entry makes its tensor's sum non-finite, and a sum is one read of the tensor
    with no boolean temporary (about 15x cheaper than `isfinite(t).all()` on a CPU). 16-bit
    tensors are summed in float64 (bfloat16 has float32's range); a float32 sum overflows only
    for entries near 1e30, where reporting the tensor as non-finite (skipping the step) is safe.
    """
    sums = [t.sum(dtype=torch.float64) if t.dtype in LOW_PRECISION else t.sum() for t in tensors]
    if not sums:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack(sums).isfinite().all()
