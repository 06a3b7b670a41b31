"""KFAC: the K-FAC optimizer as a `torch.optim.Optimizer`.

The update for a block with gradient matrix g and preconditioner P = (A (x) G + damping)^-1:

* momentum_type='regular' (tensorflow/kfac): v <- mu v + c P g, update = v, where c is the norm
  constraint's clip coefficient min(1, sqrt(C / (lr^2 g^T P g))).
* momentum_type='adam' (tensorflow/kfac's "adam"): v <- mu v + g, update = c P v, with
  c = min(1, sqrt(C / (lr^2 v^T P v))).

Then theta <- theta - lr (update + weight_decay theta) (decoupled weight decay). Parameters of
modules without a curvature block get the same rule with P = I. The loss is treated as
mean-reduced: with reduction='sum' every gradient is divided by the batch size first, so both
reductions take the same steps (the natural gradient does not depend on the loss's scale).

Second-order machinery (Martens & Grosse 2015, sections 6-7; kfac-jax): Levenberg-Marquardt
damping from rho = (L(theta + delta) - L(theta)) / q(delta) on the same batch, learning rate and
momentum from the exact quadratic model along the natural gradient and the previous step, step
rejection, schedules for every hyperparameter, a burn-in that only accumulates curvature, and
per-step statistics in `last_stats`.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_kfac.blocks import CurvatureBlock
from torch_kfac.options import check_choice, check_count, check_interval, check_number, resolve
from torch_kfac.preconditioner import KFACPreconditioner, iter_block_params
from torch_kfac.qmodel import (
    ExactCurvature,
    as_args,
    dot,
    preserved_buffers,
    quadratic_value,
    solve_coefficients,
)

MOMENTUM_TYPES = ("regular", "adam")
QMODEL_CURVATURES = ("kfac", "exact")
Schedule = Callable[[int], float]
_GLOBAL = "kfac"  # key of the optimizer-wide entry of `state`


class KFAC(Optimizer):
    """K-FAC optimizer for the Linear and Conv layers of `model`; plain momentum SGD elsewhere.

    The first three positional arguments and the keywords up to `enable_pi_correction` are those
    of the original torch_kfac port, so its code runs unchanged; the rest are keyword-only.

    Args:
        model: the network to optimise (all its parameters form one parameter group).
        lr: learning rate (`learning_rate=` is accepted as an alias).
        damping: initial Tikhonov damping lambda.
        adapt_damping: Levenberg-Marquardt adaptation of the damping from the loss (needs
            `step(loss=...)` or a closure): rho = (L_new - L_old) / q(delta) pairs the loss change
            caused by a step with that step's quadratic-model change.
        damping_adaptation_decay: omega = decay ** interval is the damping's multiplier.
        damping_adaptation_interval: adapt the damping every this many steps.
        include_damping_in_qmodel_change: include the damping term in q(delta).
        min_damping: lower bound of the adapted damping (plus `l2_reg`).
        cov_ema_decay: decay of the running average of the Kronecker factors.
        momentum: momentum coefficient mu.
        momentum_type: 'regular' or 'adam' (see the module docstring).
        norm_constraint: bound C on lr^2 g^T F^-1 g of the update (None: no constraint).
        weight_decay: decoupled weight decay coefficient (None or 0: none).
        l2_reg: coefficient of an L2 term already in the loss; floors the damping, enters q.
        update_cov_manually: fold statistics into the factors only in `update_cov()`.
        center: centered covariances.
        enable_pi_correction: pi-adjusted factored damping.
        reduction: 'mean', 'sum' or 'mean_positions', how the loss was reduced (see
            `KFACPreconditioner`).
        fisher_type, mc_samples: the curvature's Fisher type ('empirical', 'mc', 'type-2'); 'mc'
            and 'type-2' need `loss_fn` and `step(batch=...)` (see `KFACPreconditioner`).
        approximation, inverse_power, kfac_approx: 'kfac', 'ekfac', 'diagonal' or
            'forward-only'; power -1 or -0.5; 'expand' or 'reduce' (see `KFACPreconditioner`).
        factor_update_steps, inverse_update_steps, warmup_steps, inverse_method, damping_type,
            skip_modules: see `KFACPreconditioner`.
        max_damping: upper bound of the adapted damping.
        damping_rho_thresholds: (low, high) of the Levenberg-Marquardt rule, default (1/4, 3/4).
        loss_fn: the loss module (e.g. `nn.CrossEntropyLoss()`); with `step(batch=(x, y))` the
            optimizer evaluates the loss after the update on the same batch, samples labels for
            the MC Fisher and computes the exact curvature needed by the options below.
        qmodel_curvature: curvature of q(delta) for the damping rule: 'kfac' (the K-FAC model) or
            'exact' (the GGN/Fisher of `loss_fn` on the batch; one forward-mode pass).
        adaptive_learning_rate, adaptive_momentum: choose them each step by minimising the exact
            quadratic model over the natural gradient and the previous change (a 2x2 solve).
        reject_steps: undo a step whose loss on the same batch is NaN or larger, and raise the
            damping by 1/omega.
        burn_in_steps: the first steps only accumulate factors; the parameters stay put.

    `lr`, `damping` (when not adapted), `momentum`, `weight_decay`, `norm_constraint`,
    `factor_update_steps` and `inverse_update_steps` also accept a callable of the step.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | Schedule | None = None,
        damping: float | Tensor | Schedule = 1e-3,
        adapt_damping: bool = False,
        damping_adaptation_decay: float = 0.99,
        damping_adaptation_interval: int = 5,
        include_damping_in_qmodel_change: bool = False,
        min_damping: float = 1e-8,
        cov_ema_decay: float = 0.95,
        momentum: float | Schedule = 0.9,
        momentum_type: str = "regular",
        norm_constraint: float | Schedule | None = None,
        weight_decay: float | Schedule | None = None,
        l2_reg: float = 0.0,
        update_cov_manually: bool = False,
        center: bool = False,
        enable_pi_correction: bool = True,
        *,
        learning_rate: float | Schedule | None = None,
        reduction: str = "mean",
        factor_update_steps: int | Callable[[int], int] = 10,
        inverse_update_steps: int | Callable[[int], int] = 10,
        warmup_steps: int = 20,
        inverse_method: str = "cholesky",
        damping_type: str = "factored",
        max_damping: float = math.inf,
        damping_rho_thresholds: tuple[float, float] = (0.25, 0.75),
        skip_modules: Iterable[str] = (),
        loss_fn: nn.Module | None = None,
        qmodel_curvature: str = "kfac",
        adaptive_learning_rate: bool = False,
        adaptive_momentum: bool = False,
        reject_steps: bool = False,
        burn_in_steps: int = 0,
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        approximation: str = "kfac",
        inverse_power: float = -1.0,
        kfac_approx: str = "expand",
    ) -> None:
        if lr is not None and learning_rate is not None:
            raise ValueError("pass the learning rate once: lr or learning_rate, not both")
        lr = learning_rate if lr is None else lr
        if lr is None:
            if not adaptive_learning_rate:
                raise ValueError("lr (learning rate) is required unless adaptive_learning_rate=True")
            lr = 0.0
        weight_decay = 0.0 if weight_decay is None else weight_decay
        #: Hyperparameters given as callables of the step, resolved at the start of each step.
        self._schedules: dict[str, Any] = {
            k: v
            for k, v in {
                "lr": lr,
                "momentum": momentum,
                "weight_decay": weight_decay,
                "damping": damping,
            }.items()
            if callable(v)
        }
        lr = check_number("lr", resolve(lr, 0))
        momentum = check_number("momentum", resolve(momentum, 0), high=1.0, high_inclusive=False)
        weight_decay = check_number("weight_decay", resolve(weight_decay, 0))
        damping = check_number("damping", resolve(damping, 0), low_inclusive=False)
        self.momentum_type = check_choice("momentum_type", momentum_type, MOMENTUM_TYPES)
        if norm_constraint is not None and not callable(norm_constraint):
            norm_constraint = check_number("norm_constraint", norm_constraint, low_inclusive=False)
        self.norm_constraint = norm_constraint
        self.adapt_damping = bool(adapt_damping)
        self.damping_adaptation_decay = check_number(
            "damping_adaptation_decay", damping_adaptation_decay, low_inclusive=False, high=1.0
        )
        self.damping_adaptation_interval = check_interval(
            "damping_adaptation_interval", damping_adaptation_interval
        )
        self.include_damping_in_qmodel_change = bool(include_damping_in_qmodel_change)
        self.l2_reg = check_number("l2_reg", l2_reg)
        self.min_damping = check_number("min_damping", min_damping)
        self.max_damping = check_number("max_damping", max_damping, low=self.min_damping)
        self.update_cov_manually = bool(update_cov_manually)
        low, high = (check_number("damping_rho_thresholds", t) for t in damping_rho_thresholds)
        if not low < high:
            raise ValueError(
                f"damping_rho_thresholds must be (low, high) with low < high, got {damping_rho_thresholds}"
            )
        self.damping_rho_thresholds = (low, high)
        self.qmodel_curvature = check_choice("qmodel_curvature", qmodel_curvature, QMODEL_CURVATURES)
        self.adaptive_learning_rate = bool(adaptive_learning_rate)
        self.adaptive_momentum = bool(adaptive_momentum)
        self.reject_steps = bool(reject_steps)
        self.burn_in_steps = check_count("burn_in_steps", burn_in_steps)
        if (self._uses_qmodel or self.qmodel_curvature == "exact") and loss_fn is None:
            raise ValueError(
                "loss_fn is required for adaptive_learning_rate, adaptive_momentum and "
                "qmodel_curvature='exact'"
            )
        self.preconditioner = KFACPreconditioner(
            model,
            damping=float(damping),
            cov_ema_decay=cov_ema_decay,
            factor_update_steps=factor_update_steps,
            inverse_update_steps=inverse_update_steps,
            warmup_steps=warmup_steps,
            reduction=reduction,
            enable_pi_correction=enable_pi_correction,
            inverse_method=inverse_method,
            damping_type=damping_type,
            center=center,
            update_factors_manually=update_cov_manually,
            skip_modules=skip_modules,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            loss_fn=loss_fn,
            approximation=approximation,
            inverse_power=inverse_power,
            kfac_approx=kfac_approx,
        )
        self.loss_fn = loss_fn
        self._exact = ExactCurvature(model, loss_fn) if loss_fn is not None else None
        self.model = model
        self._named_params = dict(model.named_parameters())
        self._param_names = {id(p): n for n, p in self._named_params.items()}
        #: Statistics of the last step (tensors, no host sync): loss, new_loss, rho, damping,
        #: learning_rate, momentum, qmodel_change, grad_norm, update_norm, rejected, skipped.
        self.last_stats: dict[str, Any] = {}
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(model.parameters(), defaults)
        self.state[_GLOBAL].update(self.preconditioner.global_state)  # type: ignore[index]
        for block in self.preconditioner.blocks.values():
            self.state[block.parameters()[0]].update(block.state)
        self._rebind()

    def _rebind(self) -> None:
        """Point each block's state (factors, inverses) and the global state into `self.state`."""
        pre = self.preconditioner
        for block in pre.blocks.values():
            block.state = self.state[block.parameters()[0]]
        pre.global_state = self.state[_GLOBAL]  # type: ignore[index]

    # ------------------------------------------------------------ original torch_kfac API
    @property
    def blocks(self) -> dict[str, CurvatureBlock]:
        """Qualified module name -> curvature block (with `A`, `G`)."""
        return self.preconditioner.blocks

    @property
    def learning_rate(self) -> float:
        """Learning rate of the (first) parameter group; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        value = check_number("learning_rate", value)
        for group in self.param_groups:
            group["lr"] = value

    @property
    def damping(self) -> Tensor:
        """The current damping, a 0-d tensor."""
        return self.preconditioner.damping

    @damping.setter
    def damping(self, value: float | Tensor) -> None:
        self.preconditioner.damping = value

    @property
    def covariances(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Module name -> (A, G), the running Kronecker factors (e.g. to all-reduce them by hand)."""
        return {n: (b.A, b.G) for n, b in self.blocks.items() if _kronecker(b) and b.has_factors()}

    @covariances.setter
    def covariances(self, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        unknown = {n for n in factors if n not in self.blocks or not _kronecker(self.blocks[n])}
        if unknown:
            raise ValueError(f"covariances names modules without a Kronecker (A, G) block: {sorted(unknown)}")
        for name, (a, g) in factors.items():
            self.blocks[name].A, self.blocks[name].G = a, g
        self.preconditioner.update_inverses(force=True)

    def track_forward(self) -> AbstractContextManager[None]:
        """Record layer inputs only inside this context (as in the original API)."""
        return self.preconditioner.track_forward()

    def track_backward(self) -> AbstractContextManager[None]:
        """Record output gradients only inside this context (as in the original API)."""
        return self.preconditioner.track_backward()

    def update_cov(self) -> bool:
        """Fold the recorded statistics into the factors now; returns whether they changed."""
        return self.preconditioner.update_factors()

    def reset_cov(self) -> None:
        """Forget the factors and cached inverses."""
        self.preconditioner.reset_factors()

    def close(self) -> None:
        """Remove the hooks from the model."""
        self.preconditioner.close()

    # --------------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as `torch.optim.Optimizer` does, then re-point the blocks at the loaded state."""
        device = self.damping.device
        super().load_state_dict(copy.deepcopy(state_dict))
        glob = self.state[_GLOBAL]  # type: ignore[index]
        glob["damping"] = glob["damping"].to(device)
        self._rebind()

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
                with `backward=False` under `torch.no_grad()`.
            loss: the loss of the batch whose gradients are in `.grad` (original API).
            batch: `(inputs, targets)` of that loss, with `loss_fn` given to the constructor: the
                optimizer then evaluates the loss after the update on the same batch (damping
                adaptation, step rejection) and the exact curvature (adaptive learning rate and
                momentum, `qmodel_curvature='exact'`).

        Returns the loss (from the closure or as passed). A step whose gradients, statistics or
        loss are not finite changes nothing and warns; `last_stats` describes every step.
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pre = self.preconditioner
        k = pre.steps
        hyper = self._hyperparameters(k)
        self._check_step_inputs(loss, batch, closure)
        loss_t = None if loss is None else torch.as_tensor(loss).detach().to(pre.damping)
        block_params = {id(p) for p in iter_block_params(pre.blocks)}
        params = {n: p for n, p in self._named_params.items() if p.grad is not None}
        fallback = {n: p for n, p in params.items() if id(p) not in block_params}
        extra = [p.grad for p in fallback.values()] + ([loss_t] if loss_t is not None else [])
        stats: dict[str, Any] = {"step": k, "loss": loss_t, "skipped": True, "rejected": False}
        self.last_stats = stats
        mats = pre.prepare(extra, batch)
        if mats is None:
            return loss_t if loss is not None else None
        stats["skipped"] = False
        if k < self.burn_in_steps:  # accumulate curvature only
            stats["burn_in"] = True
            pre.finish_step()
            return loss_t if loss is not None else None
        scale = pre.grad_scale() if (pre.blocks and pre.reduction == "sum") else 1.0
        loss_m = None if loss_t is None else loss_t * scale
        grads = {n: (p.grad * scale if scale != 1.0 else p.grad) for n, p in params.items()}
        damping_due = self.adapt_damping and k % self.damping_adaptation_interval == 0
        same_batch = batch is not None or closure is not None
        if self.adapt_damping and not same_batch and loss_m is not None:
            self._lm_from_previous_step(loss_m)
        snapshot = self._snapshot() if self.reject_steps else None

        if self.adaptive_learning_rate or self.adaptive_momentum:
            assert batch is not None
            delta, q = self._qmodel_update(mats, grads, fallback, hyper, batch, scale)
        else:
            delta = self._kfac_update(mats, fallback, hyper, grads)
            q = None
            if damping_due:
                q = self._model_change(grads, delta, batch, scale)
        for n, d in delta.items():
            self._named_params[n].add_(d)

        new_loss = None
        if same_batch and (damping_due or self.reject_steps):
            new_loss = self._evaluate(batch, closure) * scale
        if damping_due:
            assert q is not None
            if new_loss is not None:
                self._lm_rule(new_loss - loss_m, q)
            else:
                self.state[_GLOBAL]["qmodel_change"] = q  # type: ignore[index]
        pre.finish_step()
        stats.update(
            new_loss=new_loss,
            qmodel_change=q,
            damping=pre.damping.clone(),
            grad_norm=_norm(grads.values()),
            update_norm=_norm(delta.values()),
        )
        stats.setdefault("learning_rate", hyper["lr"])
        stats.setdefault("momentum", hyper["momentum"])
        stats["rho"] = self.state[_GLOBAL].get("rho")  # type: ignore[index]
        if snapshot is not None and new_loss is not None:
            assert loss_m is not None
            if not bool(new_loss <= loss_m):  # larger or NaN
                self._restore(snapshot)
                raised = (pre.damping / self._omega()).clamp(max=self.max_damping)
                pre.damping.copy_(raised)
                stats.update(rejected=True, damping=pre.damping.clone())
        return loss_t if loss is not None else None

    # ------------------------------------------------------------------ pieces of step
    def _hyperparameters(self, step: int) -> dict[str, Any]:
        """Resolve schedules at `step` and write them into the parameter group."""
        group = self.param_groups[0]
        for key, check in (("lr", {}), ("momentum", {"high": 1.0, "high_inclusive": False})):
            if key in self._schedules:
                group[key] = check_number(key, resolve(self._schedules[key], step), **check)
        if "weight_decay" in self._schedules:
            group["weight_decay"] = check_number(
                "weight_decay", resolve(self._schedules["weight_decay"], step)
            )
        if "damping" in self._schedules and not self.adapt_damping:
            self.damping = resolve(self._schedules["damping"], step)
        bound = resolve(self.norm_constraint, step)
        if bound is not None:
            bound = check_number("norm_constraint", bound, low_inclusive=False)
        return {
            "lr": group["lr"],
            "momentum": group["momentum"],
            "weight_decay": group["weight_decay"],
            "norm_constraint": bound,
        }

    def _check_step_inputs(self, loss: Any, batch: Any, closure: Any) -> None:
        if (self.adapt_damping or self.reject_steps or self._uses_qmodel) and loss is None:
            raise ValueError(
                "adapt_damping, reject_steps and the adaptive learning rate/momentum need the loss: "
                "call step(loss=loss, ...) or pass a closure"
            )
        needs_batch = self._uses_qmodel or self.qmodel_curvature == "exact"
        if needs_batch and batch is None:
            raise ValueError(
                "the exact quadratic model (adaptive_learning_rate, adaptive_momentum or "
                "qmodel_curvature='exact') needs step(batch=(inputs, targets))"
            )
        if self.reject_steps and batch is None and closure is None:
            raise ValueError("reject_steps=True needs step(batch=(inputs, targets)) or a closure")
        if batch is not None and self.loss_fn is None:
            raise ValueError("step(batch=...) needs loss_fn=... in the KFAC constructor")

    @property
    def _uses_qmodel(self) -> bool:
        return self.adaptive_learning_rate or self.adaptive_momentum

    def _evaluate(self, batch: tuple[Any, Tensor] | None, closure: Callable[..., Tensor] | None) -> Tensor:
        """The loss at the current parameters, without recording statistics or keeping gradients."""
        pre = self.preconditioner
        with pre.paused(), preserved_buffers(self.model):
            if batch is not None:
                assert self.loss_fn is not None
                inputs, targets = batch
                return self.loss_fn(self.model(*as_args(inputs)), targets).detach().to(pre.damping)
            assert closure is not None
            if "backward" in inspect.signature(closure).parameters:
                return torch.as_tensor(closure(backward=False)).detach().to(pre.damping)
            saved = {n: p.grad for n, p in self._named_params.items()}
            try:
                with torch.enable_grad():
                    value = torch.as_tensor(closure()).detach().to(pre.damping)
            finally:
                for n, p in self._named_params.items():
                    p.grad = saved[n]
            return value

    def _kfac_update(
        self,
        mats: dict[str, Tensor],
        fallback: dict[str, Tensor],
        hyper: dict[str, Any],
        grads: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """Parameter changes of the fixed-hyperparameter K-FAC step, keyed by parameter name."""
        lr, mu, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        delta: dict[str, Tensor] = {}
        updates = self._block_updates(mats, lr, mu, hyper["norm_constraint"])
        for name, update in updates.items():
            block = self.preconditioner.blocks[name]
            for p, u in zip(block.parameters(), block.unpack(update), strict=True):
                delta[self._param_names[id(p)]] = self._change(p, u, lr, wd)
        for n, p in fallback.items():
            delta[n] = self._change(p, self._velocity(self.state[p], grads[n], mu), lr, wd)
        return delta

    @staticmethod
    def _change(param: Tensor, update: Tensor, lr: float, weight_decay: float) -> Tensor:
        """-lr (update + weight_decay * param)."""
        if weight_decay:
            update = update + weight_decay * param
        return -lr * update

    @staticmethod
    def _velocity(state: dict[str, Any], vec: Tensor, mu: float) -> Tensor:
        """v <- mu v + vec (no buffer when mu == 0)."""
        if mu == 0:
            return vec
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = vec.clone()
        else:
            buf.mul_(mu).add_(vec)
        return buf

    def _block_updates(
        self, mats: dict[str, Tensor], lr: float, mu: float, bound: float | None
    ) -> dict[str, Tensor]:
        """The update direction of every block (before lr and weight decay)."""
        pre = self.preconditioner
        blocks = pre.blocks
        if self.momentum_type == "regular":
            natural = {n: pre.precondition(blocks[n], m) for n, m in mats.items()}
            natural = self._clip(mats, natural, lr, bound)
            return {n: self._velocity(blocks[n].state, v, mu) for n, v in natural.items()}
        velocities = {n: self._velocity(blocks[n].state, m, mu) for n, m in mats.items()}
        natural = {n: pre.precondition(blocks[n], v) for n, v in velocities.items()}
        return self._clip(velocities, natural, lr, bound)

    @staticmethod
    def _clip(
        vecs: dict[str, Tensor], natural: dict[str, Tensor], lr: float, bound: float | None
    ) -> dict[str, Tensor]:
        """Scale natural gradients by min(1, sqrt(C / (lr^2 vec^T F^-1 vec))), without a host sync."""
        if bound is None or not natural:
            return natural
        sq_norm = lr**2 * sum((vecs[n] * natural[n]).sum() for n in natural)
        ratio = bound / sq_norm
        coeff = torch.where(sq_norm > 0, ratio.sqrt().clamp(max=1.0), torch.ones_like(ratio))
        return {n: v * coeff for n, v in natural.items()}

    def _model_change(
        self, grads: dict[str, Tensor], delta: dict[str, Tensor], batch: Any, scale: float
    ) -> Tensor:
        """q(delta) = g^T delta + 1/2 delta^T (C + c I) delta, c the damping or `l2_reg`.

        C is the K-FAC curvature (`qmodel_curvature='kfac'`, no curvature outside blocks) or
        the exact GGN on the batch ('exact').
        """
        pre = self.preconditioner
        c = pre.damping if self.include_damping_in_qmodel_change else self.l2_reg
        linear = dot(grads, delta)
        if self.qmodel_curvature == "exact":
            inputs, targets = batch
            with pre.paused():
                assert self._exact is not None
                curv = self._exact.gram(inputs, targets, [delta])[0, 0] * scale
        else:
            curv = pre.damping.new_zeros(())
            for block in pre.blocks.values():
                if not block.has_factors():
                    continue
                parts = [delta.get(self._param_names[id(p)]) for p in block.parameters()]
                if parts[0] is None:
                    continue
                mat = block.pack(parts)
                curv = curv + (mat * block.curvature_product(mat)).sum()
        return linear + 0.5 * (curv + c * dot(delta, delta))

    def _qmodel_update(
        self,
        mats: dict[str, Tensor],
        grads: dict[str, Tensor],
        fallback: dict[str, Tensor],
        hyper: dict[str, Any],
        batch: tuple[Any, Tensor],
        scale: float,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Learning rate and/or momentum from the exact quadratic model (Martens & Grosse, sec. 7).

        Directions: v1 = -F^-1 g (K-FAC natural gradient; -g outside blocks) and v2 = the
        previous step's change. Returns the change and its model value q (for damping).
        """
        pre = self.preconditioner
        v1: dict[str, Tensor] = {}
        for name, mat in mats.items():
            block = pre.blocks[name]
            for p, u in zip(block.parameters(), block.unpack(pre.precondition(block, mat)), strict=True):
                v1[self._param_names[id(p)]] = -u
        v1.update({n: -grads[n] for n in fallback})
        directions = [v1]
        previous = {
            n: self.state[p]["qmodel_delta"]
            for n, p in self._named_params.items()
            if "qmodel_delta" in self.state[p]
        }
        if previous:
            directions.append(previous)
        inputs, targets = batch
        with pre.paused():
            assert self._exact is not None
            curvature = self._exact.gram(inputs, targets, directions) * scale
        k = len(directions)
        overlap = torch.stack(
            [torch.stack([dot(directions[i], directions[j]) for j in range(k)]) for i in range(k)]
        )
        linear = torch.stack([dot(grads, d) for d in directions])
        fixed: dict[int, float] = {}
        if not self.adaptive_learning_rate:
            fixed[0] = hyper["lr"]
        if k == 2 and not self.adaptive_momentum:
            fixed[1] = hyper["momentum"]
        coeffs = solve_coefficients(curvature + pre.damping * overlap, linear, fixed)
        c_q = pre.damping if self.include_damping_in_qmodel_change else self.l2_reg
        q = quadratic_value(curvature + c_q * overlap, linear, coeffs)
        delta = {n: coeffs[0] * v for n, v in v1.items()}
        if k == 2:
            for n, v in previous.items():
                delta[n] = delta[n] + coeffs[1] * v if n in delta else coeffs[1] * v
        if hyper["weight_decay"]:
            for n in delta:
                delta[n] = delta[n] - coeffs[0] * hyper["weight_decay"] * self._named_params[n]
        for n, d in delta.items():
            self.state[self._named_params[n]]["qmodel_delta"] = d.clone()
        self.last_stats.update(
            learning_rate=coeffs[0].clone(), momentum=coeffs[1].clone() if k == 2 else coeffs.new_zeros(())
        )
        return delta, q

    def _omega(self) -> float:
        return self.damping_adaptation_decay**self.damping_adaptation_interval

    def _lm_rule(self, change: Tensor, q: Tensor) -> None:
        """Levenberg-Marquardt: damping * omega if rho > 3/4 (or a gain the model did not
        predict), / omega if rho < 1/4, clamped to [min_damping + l2_reg, max_damping]."""
        glob = self.state[_GLOBAL]  # type: ignore[index]
        rho = change / q
        glob["rho"] = rho
        low, high = self.damping_rho_thresholds
        damping = glob["damping"]
        omega = self._omega()
        decrease = ((change < 0) & (q > 0)) | (rho > high)
        increase = rho < low
        new = torch.where(decrease, damping * omega, torch.where(increase, damping / omega, damping))
        damping.copy_(new.clamp(min=self.min_damping + self.l2_reg, max=self.max_damping))

    def _lm_from_previous_step(self, loss: Tensor) -> None:
        """Original-API pairing: this step's loss minus the last one, over the last step's q."""
        glob = self.state[_GLOBAL]  # type: ignore[index]
        q = glob.pop("qmodel_change", None)
        prev = glob.get("prev_loss")
        glob["prev_loss"] = loss
        if q is not None and prev is not None:
            self._lm_rule(loss - prev, q)

    def _snapshot(self) -> tuple[dict[str, Tensor], dict[Any, dict[str, Any]]]:
        """Copies of the parameters and the whole optimizer state (for step rejection)."""
        params = {n: p.detach().clone() for n, p in self._named_params.items()}
        state = {
            k: {kk: (vv.clone() if isinstance(vv, Tensor) else vv) for kk, vv in v.items()}
            for k, v in self.state.items()
        }
        return params, state

    def _restore(self, snapshot: tuple[dict[str, Tensor], dict[Any, dict[str, Any]]]) -> None:
        """Put back the parameters and state of `_snapshot`, keeping the blocks' state dicts bound."""
        params, state = snapshot
        for n, p in self._named_params.items():
            p.copy_(params[n])
        for key in list(self.state):
            if key not in state:
                del self.state[key]
        for key, value in state.items():
            self.state[key].clear()
            self.state[key].update(value)
        self._rebind()


def _norm(tensors: Iterable[Tensor]) -> Tensor:
    """Euclidean norm of a collection of tensors."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _kronecker(block: CurvatureBlock) -> bool:
    """Whether a block has the two Kronecker factors A and G."""
    return "A" in block.FACTORS and "G" in block.FACTORS
