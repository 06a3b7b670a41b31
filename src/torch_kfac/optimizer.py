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
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_kfac.blocks import KroneckerBlock
from torch_kfac.options import check_choice, check_interval, check_number
from torch_kfac.preconditioner import KFACPreconditioner, iter_block_params

MOMENTUM_TYPES = ("regular", "adam")
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
        reduction: 'mean' or 'sum', how the loss was reduced over the batch.
        factor_update_steps, inverse_update_steps, inverse_method, damping_type, skip_modules:
            see `KFACPreconditioner`.
        max_damping: upper bound of the adapted damping.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        damping: float | Tensor = 1e-3,
        adapt_damping: bool = False,
        damping_adaptation_decay: float = 0.99,
        damping_adaptation_interval: int = 5,
        include_damping_in_qmodel_change: bool = False,
        min_damping: float = 1e-8,
        cov_ema_decay: float = 0.95,
        momentum: float = 0.9,
        momentum_type: str = "regular",
        norm_constraint: float | None = None,
        weight_decay: float | None = None,
        l2_reg: float = 0.0,
        update_cov_manually: bool = False,
        center: bool = False,
        enable_pi_correction: bool = True,
        *,
        learning_rate: float | None = None,
        reduction: str = "mean",
        factor_update_steps: int = 1,
        inverse_update_steps: int = 10,
        inverse_method: str = "cholesky",
        damping_type: str = "factored",
        max_damping: float = math.inf,
        skip_modules: Iterable[str] = (),
    ) -> None:
        if lr is not None and learning_rate is not None:
            raise ValueError("pass the learning rate once: lr or learning_rate, not both")
        lr = learning_rate if lr is None else lr
        if lr is None:
            raise ValueError("lr (learning rate) is required")
        lr = check_number("lr", lr)
        momentum = check_number("momentum", momentum, high=1.0, high_inclusive=False)
        weight_decay = check_number("weight_decay", 0.0 if weight_decay is None else weight_decay)
        self.momentum_type = check_choice("momentum_type", momentum_type, MOMENTUM_TYPES)
        self.norm_constraint = (
            None
            if norm_constraint is None
            else check_number("norm_constraint", norm_constraint, low_inclusive=False)
        )
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

        self.preconditioner = KFACPreconditioner(
            model,
            damping=float(damping),
            cov_ema_decay=cov_ema_decay,
            factor_update_steps=factor_update_steps,
            inverse_update_steps=inverse_update_steps,
            reduction=reduction,
            enable_pi_correction=enable_pi_correction,
            inverse_method=inverse_method,
            damping_type=damping_type,
            center=center,
            update_factors_manually=update_cov_manually,
            skip_modules=skip_modules,
        )
        self.model = model
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(model.parameters(), defaults)
        self._bind_state()

    def _bind_state(self) -> None:
        """Point each block's state (factors, inverses) and the global state into `self.state`."""
        pre = self.preconditioner
        for block in pre.blocks.values():
            self.state[block.weight].update(block.state)
            block.state = self.state[block.weight]
        self.state[_GLOBAL].update(pre.global_state)  # type: ignore[index]
        pre.global_state = self.state[_GLOBAL]  # type: ignore[index]

    # ------------------------------------------------------------ original torch_kfac API
    @property
    def blocks(self) -> dict[str, KroneckerBlock]:
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
        """Module name -> (A, G), the running factors (e.g. to all-reduce them by hand)."""
        return {n: (b.A, b.G) for n, b in self.blocks.items() if b.has_factors()}

    @covariances.setter
    def covariances(self, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        unknown = set(factors) - set(self.blocks)
        if unknown:
            raise ValueError(f"covariances names modules without a block: {sorted(unknown)}")
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
        super().load_state_dict(copy.deepcopy(state_dict))
        glob = self.state[_GLOBAL]  # type: ignore[index]
        glob["damping"] = glob["damping"].to(self.damping.device)
        self.preconditioner.global_state = glob
        for block in self.preconditioner.blocks.values():
            block.state = self.state[block.weight]

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self.defaults.items())
        return f"KFAC({hyper}, damping={self.damping.item():.3g})\n{self.preconditioner.describe()}"

    # ---------------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor] | None = None, loss: Tensor | float | None = None
    ) -> Tensor | None:
        """One K-FAC step from the current `.grad`s.

        Args:
            closure: re-evaluates the loss and its gradients (as for other torch optimizers).
            loss: the loss of the batch whose gradients are in `.grad` (original API); used by
                adaptive damping.

        Returns the loss (from the closure or as passed). A step whose gradients, statistics or
        loss are not finite changes nothing and warns.
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.adapt_damping and loss is None:
            raise ValueError("adapt_damping=True needs the loss: call step(loss=loss) or pass a closure")
        pre = self.preconditioner
        loss_t = None if loss is None else torch.as_tensor(loss, dtype=pre.damping.dtype).detach()
        block_params = {id(p) for p in iter_block_params(pre.blocks)}
        fallback = [
            p
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and id(p) not in block_params
        ]
        extra = [p.grad for p in fallback] + ([loss_t] if self.adapt_damping and loss_t is not None else [])
        mats = pre.prepare(extra)
        if mats is None:
            return loss if isinstance(loss, Tensor) or loss is None else torch.as_tensor(loss)
        scale = pre.grad_scale() if (pre.blocks and pre.reduction == "sum") else 1.0
        if self.adapt_damping and loss_t is not None:
            self._adapt_damping(loss_t.to(pre.damping.device) * scale)

        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        updates = self._block_updates(mats, lr, mu)
        for name, update in updates.items():
            block = pre.blocks[name]
            weight_step, bias_step = block.from_matrix(update)
            self._apply(block.weight, weight_step, lr, wd)
            if bias_step is not None and block.bias is not None:
                self._apply(block.bias, bias_step, lr, wd)
        for p in fallback:
            grad = p.grad * scale if scale != 1.0 else p.grad
            self._apply(p, self._velocity(self.state[p], grad, mu), lr, wd)
        pre.finish_step()
        return loss if isinstance(loss, Tensor) or loss is None else torch.as_tensor(loss)

    @staticmethod
    def _apply(param: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
        if weight_decay:
            update = update + weight_decay * param
        param.add_(update, alpha=-lr)

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

    def _block_updates(self, mats: dict[str, Tensor], lr: float, mu: float) -> dict[str, Tensor]:
        """The update direction of every block (before lr and weight decay)."""
        pre = self.preconditioner
        blocks = pre.blocks
        if self.momentum_type == "regular":
            natural = {n: pre.precondition(blocks[n], m) for n, m in mats.items()}
            natural = self._clip(mats, natural, lr)
            updates = {n: self._velocity(blocks[n].state, v, mu) for n, v in natural.items()}
        else:
            velocities = {n: self._velocity(blocks[n].state, m, mu) for n, m in mats.items()}
            natural = {n: pre.precondition(blocks[n], v) for n, v in velocities.items()}
            updates = self._clip(velocities, natural, lr)
        if self.adapt_damping and pre.steps % self.damping_adaptation_interval == 0:
            self._record_qmodel_change(mats, updates, lr)
        return updates

    def _clip(self, vecs: dict[str, Tensor], natural: dict[str, Tensor], lr: float) -> dict[str, Tensor]:
        """Scale natural gradients by min(1, sqrt(C / (lr^2 vec^T F^-1 vec))), without a host sync."""
        if self.norm_constraint is None or not natural:
            return natural
        sq_norm = lr**2 * sum((vecs[n] * natural[n]).sum() for n in natural)
        ratio = self.norm_constraint / sq_norm
        coeff = torch.where(sq_norm > 0, ratio.sqrt().clamp(max=1.0), torch.ones_like(ratio))
        return {n: v * coeff for n, v in natural.items()}

    def _record_qmodel_change(self, grads: dict[str, Tensor], updates: dict[str, Tensor], lr: float) -> None:
        """q(delta) = g^T delta + 1/2 delta^T (F + c I) delta of the K-FAC model, delta = -lr update.

        c is the damping if `include_damping_in_qmodel_change`, else `l2_reg`.
        """
        pre = self.preconditioner
        c = pre.damping if self.include_damping_in_qmodel_change else self.l2_reg
        q = pre.damping.new_zeros(())
        for name, update in updates.items():
            delta = -lr * update
            block = pre.blocks[name]
            fd = block.curvature_product(delta) if block.has_factors() else torch.zeros_like(delta)
            q = q + (grads[name] * delta).sum() + 0.5 * (delta * (fd + c * delta)).sum()
        self.state[_GLOBAL]["qmodel_change"] = q  # type: ignore[index]

    def _adapt_damping(self, loss: Tensor) -> None:
        """Levenberg-Marquardt rule on the previous step's loss change and model change."""
        glob = self.state[_GLOBAL]  # type: ignore[index]
        q = glob.pop("qmodel_change", None)
        prev = glob.get("prev_loss")
        glob["prev_loss"] = loss
        if q is None or prev is None:
            return
        change = loss - prev
        rho = change / q
        glob["rho"] = rho
        omega = self.damping_adaptation_decay**self.damping_adaptation_interval
        damping = glob["damping"]
        decrease = ((change < 0) & (q > 0)) | (rho > 0.75)
        increase = rho < 0.25
        new = torch.where(decrease, damping * omega, torch.where(increase, damping / omega, damping))
        damping.copy_(new.clamp(min=self.min_damping + self.l2_reg, max=self.max_damping))
