"""KFAC: the K-FAC optimizer as a `torch.optim.Optimizer`.

It composes the pieces: `options` (validated hyperparameters and their schedules), the
`KFACPreconditioner` (curvature blocks, factors, inverses, damping), `update` (momentum, norm
constraint, weight decay), `damping` (the Levenberg-Marquardt rule, step rejection) and `qmodel`
(the exact quadratic model that picks learning rate and momentum). The optimizer owns the
per-parameter state (momentum buffers, the previous step) in `state` and `param_groups`, the
preconditioner owns the curvature state; `state_dict()` saves both.

The loss is treated as mean-reduced: with reduction='sum' every gradient is divided by the batch
size first, so both reductions take the same steps (the natural gradient does not depend on the
loss's scale). Second-order machinery follows Martens & Grosse 2015, sections 6-7, and kfac-jax.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_kfac.blocks import CurvatureBlock
from torch_kfac.calibration import search_damping
from torch_kfac.damping import levenberg_marquardt, model_change, rejected_damping, step_rejected
from torch_kfac.distributed import unwrap
from torch_kfac.forward_ad import forward_ad_context
from torch_kfac.last_batch import TrainingPass, unavailable
from torch_kfac.options import (
    AUTO_DAMPING,
    ORIGINAL_POSITIONAL,
    KFACOptions,
    QModelCurvature,
    kfac_options,
    resolve,
    signature,
)
from torch_kfac.original import OriginalAPI
from torch_kfac.preconditioner import KFACPreconditioner
from torch_kfac.qmodel import ExactCurvature, choose_coefficients, combine, dot, overlaps
from torch_kfac.registration import iter_block_params
from torch_kfac.update import block_updates, parameter_change, per_parameter, velocity
from torch_kfac.utils import deepcopy_sharing, dense_grad, evaluate_loss

#: Keys of the per-parameter `state` that belong to the optimizer (the rest of an old state
#: dict's entry of a block's first parameter belonged to the block).
OPTIMIZER_KEYS = ("momentum_buffer", "qmodel_delta")


@dataclass
class Hyperparameters:
    """The hyperparameters of one step, after schedules."""

    lr: float
    momentum: float
    weight_decay: float
    norm_constraint: float | None


class KFAC(OriginalAPI, Optimizer):
    """K-FAC optimizer for the Linear and Conv layers of `model`; plain momentum SGD elsewhere.

    The first positional arguments after the model, up to `enable_pi_correction`, are those of
    the original torch_kfac port in its order (`KFAC(model, lr, damping, adapt_damping, ...)`),
    so its code runs unchanged; the rest are keyword-only. Every option is declared, defaulted,
    documented and validated once, in `torch_kfac.options.KFACOptions` (the optimizer's) and
    `torch_kfac.options.PreconditionerOptions` (the curvature's); `opt.options` holds them.

    Args:
        model: the network to optimise (all its parameters form one parameter group).
        *args: the original port's positional options (`lr`, `damping`, `adapt_damping`, ...).
        **kwargs: any option by name; `learning_rate` and `update_cov_manually` are the original
            port's names of `lr` and `update_factors_manually`.
    """

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        self.options = opts = kfac_options(args, kwargs)
        self.preconditioner = KFACPreconditioner(model, options=opts)
        model = unwrap(model)  # DistributedDataParallel: the optimizer's own passes skip the wrapper
        self.loss_fn = opts.loss_fn
        # issue 9 (cheaper adaptive step): the exact curvature sees at most qmodel_batch_size examples.
        self._exact = (
            ExactCurvature(model, opts.loss_fn, opts.qmodel_batch_size) if opts.loss_fn is not None else None
        )
        self.model = model
        self._named_params = dict(model.named_parameters())
        self._param_names = {id(p): n for n, p in self._named_params.items()}
        #: The Levenberg-Marquardt rule's memory: rho, and for the original API's pairing of a
        #: step's loss with the next one, the previous loss and model change.
        self.adaptation: dict[str, Tensor] = {}
        self._last_stats: dict[str, Any] = {}
        #: Whether `last_stats['skipped']` waits for the host check (`KFACPreconditioner.check`).
        self._skip_unknown = False
        self._warned_scheduler = False
        # The adaptive options read once per step anyway: the host check is made in `prepare`
        # (with reject_steps in the rejection's read instead).
        self.preconditioner.check_in_step = (opts.adapt_damping or opts.uses_qmodel) and not opts.reject_steps
        self._check_compile_step()
        self._fixed_step = self._fixed_step_function()
        if opts.compile_step:
            self.preconditioner.keep_gradient_rows(False)  # the compiled step takes the dense product
        defaults = {k: opts.value_at(k, 0) for k in ("lr", "momentum", "weight_decay")}
        super().__init__(model.parameters(), defaults)

    __init__.__signature__ = signature(KFACOptions, ORIGINAL_POSITIONAL)  # type: ignore[attr-defined]

    def _fixed_step_function(self) -> Callable[..., dict[str, Tensor]]:
        """`_fixed_update`, compiled with `compile_step`."""
        option = self.options.compile_step
        if not option:
            return self._fixed_update
        backend = "inductor" if option is True else option
        return torch.compile(self._fixed_update, backend=backend, fullgraph=True)

    def __getstate__(self) -> dict[str, Any]:
        """All of the optimizer (torch's keeps only its state and groups): `copy.deepcopy` and pickling
        copy the model with it, and the copies train as the originals do."""
        return {k: v for k, v in self.__dict__.items() if k != "_fixed_step"}

    def __deepcopy__(self, memo: dict[int, Any]) -> KFAC:
        return deepcopy_sharing(self, memo, (self.options.loss_fn, self.options.grad_scaler))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._param_names = {id(p): n for n, p in self._named_params.items()}  # the copies' ids
        self._fixed_step = self._fixed_step_function()

    def __getattr__(self, name: str) -> Any:
        """The options read as attributes (`opt.adapt_damping`, `opt.momentum_type`, ...)."""
        options = self.__dict__.get("options")
        if options is not None and name in options.__dataclass_fields__:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (param groups, per-parameter state) with the curvature state under 'kfac'."""
        state = super().state_dict()
        state["kfac"] = {
            "preconditioner": self.preconditioner.state_dict(),
            "adaptation": dict(self.adaptation),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what `state_dict` returned, or a state dict of version 0.2.0 (one shared `state`)."""
        state_dict = copy.deepcopy(state_dict)
        if "kfac" not in state_dict:
            state_dict["kfac"] = _split_shared_state(state_dict["state"], self.param_groups, self.blocks)
        kfac = state_dict.pop("kfac")
        self.preconditioner.check_state_dict(kfac["preconditioner"])
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(kfac["preconditioner"])
        self.adaptation = dict(kfac["adaptation"])

    @property
    def last_stats(self) -> dict[str, Any]:
        """Statistics of the last step (tensors, no host sync): loss, new_loss, rho, damping,
        learning_rate, momentum, qmodel_change, grad_norm, update_norm, rejected, skipped,
        skipped_in_a_row. Reading it after a step that made no host check makes it (one read).
        """
        if self._skip_unknown:
            self._skip_unknown = False
            pre = self.preconditioner
            pre.check()
            self._last_stats.update(skipped=not pre.latest_taken, skipped_in_a_row=pre.skipped_in_a_row)
        return self._last_stats

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self.defaults.items())
        return f"KFAC({hyper}, damping={self.damping.item():.3g})\n{self.preconditioner.describe()}"

    # ---------------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Tensor] | None = None,
        loss: Tensor | float | None = None,
        batch: tuple[Any, Tensor] | None = None,
    ) -> Tensor | None:
        """One K-FAC step from the current `.grad`s.

        Args:
            closure: re-evaluates the loss and its gradients (as for other torch optimizers). If
                it accepts a `backward` keyword, the optimizer's extra loss evaluations call it
                with `backward=False` under `torch.no_grad()`. One that returns None evaluates
                nothing and counts as none (Lightning's manual optimization passes one).
            loss: the loss of the batch whose gradients are in `.grad` (original API).
            batch: `(inputs, targets)` of that loss, with `loss_fn` given to the constructor: the
                optimizer then evaluates the loss after the update on the same batch (damping
                adaptation, step rejection) and the exact curvature (adaptive learning rate and
                momentum, `qmodel_curvature='exact'`).

        With `loss_fn` given, a loss or batch the options need and the call omits is that of the
        training pass since the last step, `loss_fn(model(*inputs), targets)` run with gradients
        enabled (`torch_kfac.last_batch`); without one such pass the step raises, saying why.

        Returns the loss the step used: as passed or from the closure, or the training pass's
        `loss_fn` value where the step takes that pass's batch. A step whose gradients, statistics or
        loss are not finite changes nothing (decided on the device, no host read) and warns at the
        next host check (`host_check_interval`); `last_stats` describes every step.
        """
        if closure is not None:
            with torch.enable_grad():
                value = closure()
            if value is None:  # evaluates nothing (Lightning's manual optimization passes one)
                closure = None
            else:
                loss = value
        last_batch = self.preconditioner.last_batch
        last = None if last_batch is None else last_batch.take()
        with self.preconditioner.autocast_off():
            return self._step(loss, batch, closure, last)

    def _step(
        self,
        loss: Tensor | float | None,
        batch: tuple[Any, Tensor] | None,
        closure: Callable[..., Tensor] | None,
        last: TrainingPass | str | None,
    ) -> Tensor | None:
        """`step` after the closure, with autocast off (the step's own arithmetic and passes keep
        their dtypes where the step is called inside an autocast region)."""
        pre = self.preconditioner
        pre.join_ranks()  # before the loss is averaged over ranks, in a process group begun late
        self._check_compile_step()
        self._check_model()
        pre.check_gradients()
        k = pre.steps
        self._skip_unknown = False
        if self._unscale_gradients():
            self._last_stats = {"step": k, "loss": None, "skipped": True, "rejected": False}
            return None if loss is None else torch.as_tensor(loss).detach()
        hyper = self._hyperparameters(k)
        loss, batch = self._from_last_pass(loss, batch, closure, last)
        loss_t = None if loss is None else torch.as_tensor(loss).detach().to(pre.damping)
        if loss_t is not None:
            loss_t = pre.average_over_ranks(loss_t)  # DISTRIBUTED: the global batch's loss
        block_params = {id(p) for p in iter_block_params(pre.active_blocks)}
        # Frozen parameters never move, whatever gradient they still hold.
        params = {n: p for n, p in self._named_params.items() if p.grad is not None and p.requires_grad}
        fallback = {n: p for n, p in params.items() if id(p) not in block_params}
        extra = [dense_grad(p) for p in fallback.values()] + ([loss_t] if loss_t is not None else [])
        stats = self._last_stats = {"step": k, "loss": loss_t, "skipped": True, "rejected": False}
        mats = pre.prepare(extra, batch)
        if mats is None:
            stats["skipped_in_a_row"] = pre._skipped_in_a_row
            return loss_t
        stats["skipped"] = False
        if pre.taken is None:
            stats["skipped_in_a_row"] = 0
        else:  # learnt at the host check
            self._skip_unknown = True
        if k < self.options.burn_in_steps:  # accumulate curvature only
            stats["burn_in"] = True
            pre.finish_step()
            return loss_t
        self._update(k, mats, params, fallback, hyper, loss_t, batch, closure)
        return loss_t

    def _check_compile_step(self) -> None:
        """compile_step refused in distributed runs: at construction, and at a step that joined the
        ranks of a process group begun after it."""
        if self.options.compile_step and self.preconditioner.distributed is not None:
            raise ValueError(
                "compile_step is not supported in distributed runs (the preconditioning broadcasts)"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, and the statistics and example count recorded with them that no step
        has claimed.

        Statistics of a finished backward pass belong to the gradients cleared here (a batch whose
        step never came); those of a forward pass whose backward is still to come (zero_grad
        between forward and backward, as in Lightning) are kept.
        """
        super().zero_grad(set_to_none)
        pre = self.preconditioner
        pre.forget_examples()
        pre.clear_gradient_rows()
        backward = [(b, k) for b in pre.blocks.values() for k in b.FACTORS if k not in b.FORWARD_FACTORS]
        if any(b.has_pending(k) for b, k in backward):
            pre.discard_statistics()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: KFAC trains the parameters of the model it was built on."""
        if self.param_groups:  # the constructor's own call adds the first (and only) group
            raise ValueError(
                "KFAC does not support add_param_group: it trains the parameters of the model given to "
                "its constructor; build it on a model that holds every parameter to train"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ pieces of step
    #: `torch.amp.GradScaler.step(opt)` calls `step` on every step, with the loss scale in
    #: `self.grad_scale` and its inf/NaN flag in `self.found_inf`, instead of unscaling the
    #: gradients and skipping the call itself.
    _step_supports_amp_scaling = True

    def _unscale_gradients(self) -> bool:
        """Under `GradScaler.step`: divide the gradients by the loss scale; whether to skip the step.

        A step the scaler found inf or NaN in is skipped whole: statistics dropped, factors and
        step counters unchanged. Reading the flag is this step's one host synchronisation, the
        one `GradScaler.step` makes for other optimizers.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return False  # not stepped by a GradScaler
        if self.options.grad_scaler is None:
            raise ValueError(
                "KFAC is stepped by a GradScaler: pass grad_scaler=scaler to KFAC, so that the "
                "recorded layer statistics are unscaled too"
            )
        if bool(found_inf):
            self.preconditioner.discard_statistics()
            return True
        scale = getattr(self, "grad_scale", None)  # None: the user called scaler.unscale_(opt)
        if scale is not None:
            for p in self._named_params.values():
                if p.grad is None:
                    continue
                wide = torch.promote_types(p.grad.dtype, scale.dtype)
                if wide == p.grad.dtype:
                    p.grad.div_(scale.to(wide))
                else:  # a float16 gradient cannot hold the scale (65536 is inf): divide in `wide`
                    p.grad.copy_(p.grad.to(wide) / scale.to(wide))
        return False

    def _check_model(self) -> None:
        """A clear error when the model's parameters changed since construction (a module added,
        replaced or removed): the new parameters would never be trained."""
        now, built = dict(self.model.named_parameters()), self._named_params
        changed = sorted(n for n in now.keys() | built.keys() if now.get(n) is not built.get(n))
        if changed:
            raise RuntimeError(
                f"K-FAC: the model's parameters changed since the optimizer was built "
                f"({', '.join(changed)}); "
                "build a new KFAC for the changed model"
            )

    def _update(
        self,
        k: int,
        mats: dict[str, Tensor],
        params: dict[str, Tensor],
        fallback: dict[str, Tensor],
        hyper: Hyperparameters,
        loss: Tensor | None,
        batch: tuple[Any, Tensor] | None,
        closure: Callable[..., Tensor] | None,
    ) -> None:
        """Change the parameters, adapt the damping, and reject the step if asked."""
        pre, opts = self.preconditioner, self.options
        # Gradients and losses on the mean-loss scale (reduction='sum' divides by the batch size):
        # the gradient's over the examples of every backward pass since the last step, what is
        # measured on `batch` (its loss, the loss after the step, the exact curvature) over the
        # batch's, which under gradient accumulation may be the last micro-batch.
        grad_factor = pre.grad_scale() if pre.blocks else 1.0
        grads = {
            n: dense_grad(p) * grad_factor if grad_factor != 1.0 else dense_grad(p) for n, p in params.items()
        }
        scale = pre.batch_scale(batch[1]) if batch is not None and pre.blocks else grad_factor
        loss = None if loss is None else loss * scale
        damping_due = opts.adapt_damping and k % opts.damping_adaptation_interval == 0
        same_batch = batch is not None or closure is not None
        if opts.adapt_damping and not same_batch and loss is not None:
            self._adapt_from_previous_step(loss)
        trial = None
        if opts.damping == AUTO_DAMPING and k == opts.burn_in_steps and same_batch and loss is not None:
            trial = self._search_damping(mats, grads, fallback, hyper, loss, batch, closure, scale)
        snapshot = self._snapshot() if opts.reject_steps else None
        taken = pre.taken  # None: the step is known to be taken; else its changes are masked
        if opts.uses_qmodel or damping_due:  # the model change is measured before the parameters move
            if trial is not None:  # the search's last trial was this very step
                delta, q, state = trial
                self._load_state(state)
            else:
                delta, q = self._change(mats, grads, fallback, hyper, batch, scale, damping_due)
            self._move(delta, taken)
        else:
            q = None
            delta = self._fixed_step(mats, fallback, hyper, grads, taken)
        new_loss = None
        if same_batch and (damping_due or opts.reject_steps):
            new_loss = pre.average_over_ranks(self._evaluate(batch, closure)) * scale
        if damping_due:
            assert q is not None
            if new_loss is not None:
                assert loss is not None
                self._adapt_damping(new_loss - loss, q)
            else:
                self.adaptation["qmodel_change"] = q
        pre.finish_step()
        self._record(grads, delta, hyper, new_loss, q)
        if snapshot is not None and new_loss is not None:
            assert loss is not None
            if taken is None:
                rejected = bool(step_rejected(loss, new_loss))
            else:  # the step's host check and the rejection: one read
                is_taken, rejected = pre.check(extra=step_rejected(loss, new_loss))
                self._skip_unknown = False
                self._last_stats.update(skipped=not is_taken, skipped_in_a_row=pre._skipped_in_a_row)
                if not is_taken:
                    self._restore(snapshot)
                    return
            if rejected:
                self._restore(snapshot)
                pre.set_damping(rejected_damping(pre.damping, opts.omega, opts.max_damping))
                self._last_stats.update(rejected=True, damping=pre.damping.clone())

    def _move(self, delta: dict[str, Tensor], taken: Tensor | None) -> None:
        """Add the changes to the parameters (masked with `taken`, see `KFACPreconditioner.prepare`)."""
        for n, d in delta.items():
            self._named_params[n].add_(d if taken is None else torch.where(taken, d, 0.0))

    def _fixed_update(
        self,
        mats: dict[str, Tensor],
        fallback: dict[str, Tensor],
        hyper: Hyperparameters,
        grads: dict[str, Tensor],
        taken: Tensor | None,
    ) -> dict[str, Tensor]:
        """The fixed-hyperparameter step: preconditioning, momentum, norm constraint, weight decay and
        the parameters' change, computed and applied (one compiled function with `compile_step`)."""
        delta = self._kfac_update(mats, fallback, hyper, grads)
        self._move(delta, taken)
        return delta

    def _change(
        self,
        mats: dict[str, Tensor],
        grads: dict[str, Tensor],
        fallback: dict[str, Tensor],
        hyper: Hyperparameters,
        batch: tuple[Any, Tensor] | None,
        scale: float,
        with_q: bool,
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The step's parameter changes, and its model change q (always with the quadratic model,
        else only `with_q`)."""
        if self.options.uses_qmodel:
            assert batch is not None
            return self._qmodel_update(mats, grads, fallback, hyper, batch, scale)
        delta = self._kfac_update(mats, fallback, hyper, grads)
        return delta, self._model_change(grads, delta, batch, scale) if with_q else None

    def _search_damping(
        self,
        mats: dict[str, Tensor],
        grads: dict[str, Tensor],
        fallback: dict[str, Tensor],
        hyper: Hyperparameters,
        loss: Tensor,
        batch: tuple[Any, Tensor] | None,
        closure: Callable[..., Tensor] | None,
        scale: float,
    ) -> tuple[dict[str, Tensor], Tensor, dict[Any, dict[str, Any]]] | None:
        """damping='auto' with the loss on the batch: the first step's damping by trial steps
        (`torch_kfac.calibration.search_damping`); each trial is undone.

        When the chosen damping was the last one tried, its inverses are still in place and its
        trial computed this step's change: returns that change, its q and the optimizer state the
        change left (the step takes them instead of computing them again); else None.
        """
        pre = self.preconditioner
        # The damping the inverses in place use: at step 0 the calibration has just refreshed
        # every inverse at the search's start; after the search, that of its last trial.
        current = pre.damping.item() if pre.steps == 0 else None
        trial: tuple[dict[str, Tensor], Tensor, dict[Any, dict[str, Any]]] | None = None

        def rho_at(damping: float) -> float:
            nonlocal current, trial
            pre.set_damping(pre.damping.new_tensor(damping))
            if damping != current:
                pre.update_inverses(force=True)
                current = damping
            snapshot = self._snapshot()
            delta, q = self._change(mats, grads, fallback, hyper, batch, scale, True)
            assert q is not None
            trial = (delta, q, {p: _copy(s) for p, s in self.state.items()})
            for n, d in delta.items():
                self._named_params[n].add_(d)
            new_loss = pre.average_over_ranks(self._evaluate(batch, closure)) * scale
            self._restore(snapshot)
            return float((new_loss - loss) / q)

        chosen = search_damping(pre.damping.item(), rho_at)
        pre.calibrate(chosen, refresh=chosen != current)
        return trial if chosen == current else None

    def _record(
        self,
        grads: dict[str, Tensor],
        delta: dict[str, Tensor],
        hyper: Hyperparameters,
        new_loss: Tensor | None,
        q: Tensor | None,
    ) -> None:
        """Fill `last_stats` for a step that changed the parameters."""
        self._last_stats.update(
            new_loss=new_loss,
            qmodel_change=q,
            damping=self.preconditioner.damping.clone(),
            grad_norm=_norm(grads.values()),
            update_norm=_norm(delta.values()),
        )
        self._last_stats.setdefault("learning_rate", hyper.lr)
        self._last_stats.setdefault("momentum", hyper.momentum)
        self._last_stats["rho"] = self.adaptation.get("rho")

    def _hyperparameters(self, step: int) -> Hyperparameters:
        """Resolve schedules at `step`; the scheduled lr, momentum and weight decay go into the group."""
        group, opts = self.param_groups[0], self.options
        if opts.adaptive_learning_rate and "initial_lr" in group and not self._warned_scheduler:
            # torch's LR schedulers set group['initial_lr'] when they attach.
            self._warned_scheduler = True
            warnings.warn(
                "K-FAC: a learning-rate scheduler is attached, but with adaptive_learning_rate=True the "
                "quadratic model chooses the learning rate at every step: the scheduler has no effect",
                UserWarning,
                stacklevel=6,  # the user's opt.step(), through the scheduler's and torch's step wrappers
            )
        for key in ("lr", "momentum", "weight_decay"):
            if callable(getattr(opts, key)):
                group[key] = opts.value_at(key, step)
        if callable(opts.damping) and not opts.adapt_damping:
            self.damping = resolve(opts.damping, step)
        bound = opts.value_at("norm_constraint", step)
        return Hyperparameters(group["lr"], group["momentum"], group["weight_decay"], bound)

    def _from_last_pass(
        self,
        loss: Tensor | float | None,
        batch: tuple[Any, Tensor] | None,
        closure: Callable[..., Tensor] | None,
        last: TrainingPass | str | None,
    ) -> tuple[Tensor | float | None, tuple[Any, Tensor] | None]:
        """The loss and batch of the step: as passed, else, where the options need them, those of
        the last training pass (`torch_kfac.last_batch`); an error naming what is missing."""
        opts, pre = self.options, self.preconditioner
        mc_pass = pre.fisher_pass_due()
        needs_loss = opts.adapt_damping or opts.reject_steps or opts.uses_qmodel
        needs_batch = opts.uses_exact_curvature or mc_pass or (opts.reject_steps and closure is None)
        why = unavailable(last)
        if isinstance(last, TrainingPass):
            if needs_loss and loss is None:
                loss = last.loss
                # The loss after the step on this batch, not the next step's (as with step(loss)).
                needs_batch = needs_batch or closure is None
            if needs_batch and batch is None:
                batch = (last.inputs, last.targets)
                if needs_loss and closure is not None:
                    # The loss after the step is loss_fn's on this batch: it is compared with the
                    # pass's own loss_fn value, not with the closure's (which may differ in scale:
                    # Lightning divides it by accumulate_grad_batches).
                    loss = last.loss
        if needs_loss and loss is None:
            raise ValueError(
                "adapt_damping, reject_steps and the adaptive learning rate/momentum need the loss: "
                f"call step(loss=loss, ...) or pass a closure{why}"
            )
        if opts.uses_exact_curvature and batch is None:
            raise ValueError(
                "the exact quadratic model (adaptive_learning_rate, adaptive_momentum or "
                f"qmodel_curvature='exact') needs step(batch=(inputs, targets)){why}"
            )
        if mc_pass and batch is None:
            raise pre.fisher_batch_error(why)
        if opts.reject_steps and batch is None and closure is None:
            raise ValueError(f"reject_steps=True needs step(batch=(inputs, targets)) or a closure{why}")
        if batch is not None and self.loss_fn is None:
            raise ValueError("step(batch=...) needs loss_fn=... in the KFAC constructor")
        return loss, batch

    def _evaluate(self, batch: tuple[Any, Tensor] | None, closure: Callable[..., Tensor] | None) -> Tensor:
        """The loss at the current parameters, without recording statistics or keeping gradients."""
        with self.preconditioner.paused():
            value = evaluate_loss(self.model, self.loss_fn, batch, closure)
        return value.to(self.preconditioner.damping)

    def _kfac_update(
        self,
        mats: dict[str, Tensor],
        fallback: dict[str, Tensor],
        hyper: Hyperparameters,
        grads: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """Parameter changes of the fixed-hyperparameter K-FAC step, keyed by parameter name."""
        pre, blocks = self.preconditioner, self.preconditioner.blocks
        lr, mu, wd = hyper.lr, hyper.momentum, hyper.weight_decay
        # A block's velocity is a matrix in the block's layout, kept in its first parameter's state.
        states = {n: self.state[blocks[n].parameters()[0]] for n in mats}
        updates = block_updates(
            mats,
            pre.precondition_all,
            states,
            self.options.momentum_type,
            lr,
            mu,
            hyper.norm_constraint,
            pre.taken,
        )
        delta = {
            self._param_names[id(p)]: parameter_change(p, u, lr, wd)
            for p, u in per_parameter(blocks, updates)
        }
        for n, p in fallback.items():
            delta[n] = parameter_change(p, velocity(self.state[p], grads[n], mu, pre.taken), lr, wd)
        return delta

    def _model_change(
        self, grads: dict[str, Tensor], delta: dict[str, Tensor], batch: Any, scale: float
    ) -> Tensor:
        """q(delta) = g^T delta + 1/2 delta^T (C + c I) delta, c the damping or `l2_reg`.

        C is the K-FAC curvature (`qmodel_curvature='kfac'`, no curvature outside blocks) or
        the exact GGN on the batch ('exact').
        """
        pre = self.preconditioner
        if self.options.qmodel_curvature == QModelCurvature.EXACT:
            inputs, targets = batch
            with pre.paused(), forward_ad_context(self.model):
                assert self._exact is not None
                curv = pre.average_over_ranks(self._exact.gram(inputs, targets, [delta])[0, 0]) * scale
        else:
            curv = pre.quadratic_form(lambda p: delta.get(self._param_names[id(p)]))
        return model_change(dot(grads, delta), curv, self._model_damping, dot(delta, delta))

    @property
    def _model_damping(self) -> Tensor | float:
        """The damping term of q(delta): the damping itself, or only `l2_reg`."""
        opts = self.options
        return self.preconditioner.damping if opts.include_damping_in_qmodel_change else opts.l2_reg

    def _qmodel_update(
        self,
        mats: dict[str, Tensor],
        grads: dict[str, Tensor],
        fallback: dict[str, Tensor],
        hyper: Hyperparameters,
        batch: tuple[Any, Tensor],
        scale: float,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Learning rate and/or momentum from the exact quadratic model (Martens & Grosse, sec. 7).

        Directions: v1 = -F^-1 g (K-FAC natural gradient; -g outside blocks) and v2 = the
        previous step's change. Returns the change and its model value q (for damping).
        """
        pre, opts = self.preconditioner, self.options
        natural = pre.precondition_all(mats)
        v1 = {self._param_names[id(p)]: -u for p, u in per_parameter(pre.blocks, natural)}
        v1.update({n: -grads[n] for n in fallback})
        previous = {
            n: self.state[p]["qmodel_delta"]
            for n, p in self._named_params.items()
            if "qmodel_delta" in self.state[p] and p.requires_grad
        }
        directions = [v1, previous] if previous else [v1]
        inputs, targets = batch
        with pre.paused(), forward_ad_context(self.model):
            assert self._exact is not None
            curvature = pre.average_over_ranks(self._exact.gram(inputs, targets, directions)) * scale
        linear = torch.stack([dot(grads, d) for d in directions])
        fixed: dict[int, float] = {}
        if not opts.adaptive_learning_rate:
            fixed[0] = hyper.lr
        if previous and not opts.adaptive_momentum:
            fixed[1] = hyper.momentum
        bounds = None if opts.momentum_bounds is None else (1, opts.momentum_bounds)
        coeffs, q = choose_coefficients(
            curvature, overlaps(directions), linear, pre.damping, self._model_damping, fixed, bounds
        )
        # q = inf: the model could not be evaluated; no move (a direction that overflowed would
        # make 0 * inf = NaN here).
        moved = torch.isfinite(q)
        delta = {n: torch.where(moved, d, 0.0) for n, d in combine(directions, coeffs).items()}
        if hyper.weight_decay:
            for n in delta:
                delta[n] = delta[n] - coeffs[0] * hyper.weight_decay * self._named_params[n]
        for n, d in delta.items():
            self.state[self._named_params[n]]["qmodel_delta"] = d.clone()
        momentum = coeffs[1].clone() if previous else coeffs.new_zeros(())
        self._last_stats.update(learning_rate=coeffs[0].clone(), momentum=momentum)
        return delta, q

    def _adapt_damping(self, loss_change: Tensor, q: Tensor) -> None:
        """Apply the Levenberg-Marquardt rule to the damping; remember rho."""
        opts = self.options
        damping, rho = levenberg_marquardt(
            self.preconditioner.damping,
            loss_change,
            q,
            opts.omega,
            opts.damping_rho_thresholds,
            opts.damping_bounds,
        )
        self.preconditioner.set_damping(damping)
        self.adaptation["rho"] = rho

    def _adapt_from_previous_step(self, loss: Tensor) -> None:
        """Original-API pairing: this step's loss minus the last one, over the last step's q."""
        q = self.adaptation.pop("qmodel_change", None)
        prev = self.adaptation.get("prev_loss")
        self.adaptation["prev_loss"] = loss
        if q is not None and prev is not None:
            self._adapt_damping(loss - prev, q)

    def _snapshot(self) -> dict[str, Any]:
        """Copies of the parameters and of all optimizer and curvature state (for step rejection)."""
        return {
            "params": {n: p.detach().clone() for n, p in self._named_params.items()},
            "state": {p: _copy(s) for p, s in self.state.items()},
            "kfac": self.preconditioner.state_dict(complete=False),
            "adaptation": dict(self.adaptation),
        }

    def _load_state(self, state: dict[Any, dict[str, Any]]) -> None:
        """Replace the per-parameter optimizer state by `state`."""
        self.state.clear()
        self.state.update(state)

    def _restore(self, snapshot: dict[str, Any]) -> None:
        """Put back the parameters and state of `_snapshot`."""
        for n, p in self._named_params.items():
            p.copy_(snapshot["params"][n])
        self._load_state(snapshot["state"])
        self.preconditioner.restore(snapshot["kfac"])
        self.adaptation = snapshot["adaptation"]


def _split_shared_state(
    state: dict[Any, dict[str, Any]], param_groups: list[dict[str, Any]], blocks: dict[str, CurvatureBlock]
) -> dict[str, Any]:
    """Version 0.2.0 kept the global state under state['kfac'] and each block's state in the
    entry of its first parameter; take them out of `state` (in place) in today's layout."""
    shared = state.pop("kfac")
    index = {id(p): i for i, p in enumerate(p for g in param_groups for p in g["params"])}
    curvature = {}
    for name, block in blocks.items():
        entry = state.get(index[id(block.parameters()[0])], {})
        curvature[name] = {k: v for k, v in entry.items() if k not in OPTIMIZER_KEYS}
        for key in curvature[name]:
            del entry[key]
    own = {"step", "damping"}
    return {
        "preconditioner": {"global": {k: shared[k] for k in own}, "blocks": curvature},
        "adaptation": {k: v for k, v in shared.items() if k not in own},
    }


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a state entry whose tensors do not change with the optimizer."""
    return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}


def _norm(tensors: Iterable[Tensor]) -> Tensor:
    """Euclidean norm of a collection of tensors."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
