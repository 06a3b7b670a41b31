"""KFAC as a torch.optim.Optimizer: update rules, state, schedulers, validation, robustness."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import AttentionLSTM, make_data, make_mlp
from tests.reference import identity_preconditioned_loss
from torch_kfac import KFAC

pytestmark = pytest.mark.usefixtures("float64")


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the model on (x, y)."""
    return F.cross_entropy(model(x), y, reduction=reduction)


def train(opt: KFAC, model: nn.Module, steps: int, seed: int = 1, reduction: str = "mean") -> list[float]:
    """A few full-batch steps; returns the losses."""
    x, y = make_data(seed=seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, x, y, reduction)
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
    return losses


def grads_and_step(opt: KFAC, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step; returns each parameter's change theta_old - theta_new and its gradient."""
    opt.zero_grad()
    loss_of(model, x, y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    change = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    return {**{f"d/{n}": v for n, v in change.items()}, **{f"g/{n}": v for n, v in grads.items()}}


def natural(opt: KFAC, name: str, mat: torch.Tensor) -> torch.Tensor:
    """The block's current preconditioner applied to a gradient matrix."""
    block = opt.blocks[name]
    return block.precondition(mat.unsqueeze(0), opt.damping, True)[0]


def block_grad(out: dict[str, torch.Tensor], name: str, prefix: str = "g") -> torch.Tensor:
    """[dW, db] of a Linear block from a `grads_and_step` record."""
    return torch.cat([out[f"{prefix}/{name}.weight"], out[f"{prefix}/{name}.bias"][:, None]], 1)


# ----------------------------------------------------------------------- update rules
def test_regular_momentum_is_momentum_on_the_natural_gradient() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.9, inverse_update_steps=1, norm_constraint=None)
    x1, y1 = make_data(seed=1)
    x2, y2 = make_data(seed=2)
    s1 = grads_and_step(opt, model, x1, y1)
    p1 = natural(opt, "2", block_grad(s1, "2"))
    s2 = grads_and_step(opt, model, x2, y2)
    p2 = natural(opt, "2", block_grad(s2, "2"))
    torch.testing.assert_close(block_grad(s1, "2", "d"), 0.1 * p1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block_grad(s2, "2", "d"), 0.1 * (0.9 * p1 + p2), rtol=1e-12, atol=1e-14)


def test_adam_momentum_preconditions_the_velocity() -> None:
    model = make_mlp()
    opt = KFAC(
        model, 0.1, 1e-2, momentum=0.9, momentum_type="adam", inverse_update_steps=1, norm_constraint=None
    )
    s1 = grads_and_step(opt, model, *make_data(seed=1))
    s2 = grads_and_step(opt, model, *make_data(seed=2))
    velocity = 0.9 * block_grad(s1, "2") + block_grad(s2, "2")
    expected = 0.1 * natural(opt, "2", velocity)
    torch.testing.assert_close(block_grad(s2, "2", "d"), expected, rtol=1e-12, atol=1e-14)


def test_norm_constraint_scales_the_update() -> None:
    model = make_mlp()
    lr, bound = 0.5, 1e-6
    opt = KFAC(model, lr, 1e-2, momentum=0.0, norm_constraint=bound)
    s = grads_and_step(opt, model, *make_data())
    sq = sum((block_grad(s, n) * natural(opt, n, block_grad(s, n))).sum() for n in ("0", "2"))
    coeff = min(1.0, (bound / (lr**2 * sq)).sqrt().item())
    assert coeff < 1.0
    for n in ("0", "2"):
        expected = lr * coeff * natural(opt, n, block_grad(s, n))
        torch.testing.assert_close(block_grad(s, n, "d"), expected, rtol=1e-12, atol=1e-14)


def test_weight_decay_is_decoupled() -> None:
    model = make_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = KFAC(model, 0.1, 1e-2, momentum=0.0, weight_decay=0.01, norm_constraint=None)
    s = grads_and_step(opt, model, *make_data())
    theta = torch.cat([before["2.weight"], before["2.bias"][:, None]], 1)
    expected = 0.1 * (natural(opt, "2", block_grad(s, "2")) + 0.01 * theta)
    torch.testing.assert_close(block_grad(s, "2", "d"), expected, rtol=1e-12, atol=1e-14)


def test_fallback_parameters_get_momentum_sgd() -> None:
    class WithScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = make_mlp()
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * self.body(x)

    model = WithScale()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.9)
    assert "scale: fallback" in repr(opt)
    s1 = grads_and_step(opt, model, *make_data(seed=1))
    s2 = grads_and_step(opt, model, *make_data(seed=2))
    torch.testing.assert_close(s1["d/scale"], 0.1 * s1["g/scale"])
    torch.testing.assert_close(s2["d/scale"], 0.1 * (0.9 * s1["g/scale"] + s2["g/scale"]))


def test_mean_and_sum_reductions_take_the_same_steps() -> None:
    m_mean, m_sum = make_mlp(), make_mlp()
    opt_mean = KFAC(m_mean, 0.2, 1e-2, reduction="mean", inverse_update_steps=2)
    opt_sum = KFAC(m_sum, 0.2, 1e-2, reduction="sum", inverse_update_steps=2)
    train(opt_mean, m_mean, 4, reduction="mean")
    train(opt_sum, m_sum, 4, reduction="sum")
    for p, q in zip(m_mean.parameters(), m_sum.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for name in ("0", "2"):
        torch.testing.assert_close(opt_mean.blocks[name].G, opt_sum.blocks[name].G, rtol=1e-10, atol=1e-12)


def test_kfac_trains_a_small_problem() -> None:
    """40 steps bring the loss below a tenth of the identity-preconditioned run's (momentum SGD with the
    same lr and momentum: x0.32 of the start; K-FAC x0.002)."""
    model = make_mlp()
    losses = train(KFAC(model, 0.3, 1e-2, momentum=0.5, norm_constraint=None), model, 40)
    x, y = make_data(seed=1)
    plain = identity_preconditioned_loss(make_mlp(), lambda m: loss_of(m, x, y), 40, 0.3, momentum=0.5)
    assert losses[-1] < 0.1 * plain, (losses[-1], plain)


# ---------------------------------------------------------------- torch.optim interface
def test_state_dict_keeps_torch_layout_with_the_curvature_apart() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.9)
    train(opt, model, 2)
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups", "kfac"}
    assert all(isinstance(k, int) for k in state["state"])  # only parameters: no "kfac" entry
    assert {k for v in state["state"].values() for k in v} == {"momentum_buffer"}
    assert set(state["kfac"]["preconditioner"]["blocks"]) == {"0", "2"}
    assert "A_ema" in state["kfac"]["preconditioner"]["blocks"]["0"]
    assert state["kfac"]["preconditioner"]["global"]["step"] == 2


def test_state_dict_round_trip_continues_bit_identically() -> None:
    kwargs = {"momentum": 0.9, "adapt_damping": True, "damping_adaptation_interval": 2}
    kwargs.update(inverse_update_steps=3, weight_decay=1e-3)
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, **kwargs)
    train(opt, model, 4)
    saved_opt = opt.state_dict()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = make_mlp(seed=123)
    fresh.load_state_dict(saved_model)
    fresh_opt = KFAC(fresh, 0.5, 1.0, **kwargs)
    fresh_opt.load_state_dict(saved_opt)
    assert fresh_opt.damping.item() == opt.damping.item()
    assert fresh_opt.learning_rate == 0.1

    train(opt, model, 5, seed=3)
    train(fresh_opt, fresh, 5, seed=3)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, block in opt.blocks.items():
        assert torch.equal(block.A, fresh_opt.blocks[name].A)
        assert torch.equal(block.G, fresh_opt.blocks[name].G)


def test_state_dict_of_version_0_2_0_is_split_into_curvature_and_optimizer_state() -> None:
    """tests/golden/state_dict_0_2_0.pt was written by version 0.2.0 after 3 adaptive-damping steps: one
    shared `state`, the global entry (step, damping, the damping rule's memory) under 'kfac' and each
    block's factors and inverses in the entry of its first parameter, beside the momentum buffer."""
    saved = torch.load(Path(__file__).parent / "golden" / "state_dict_0_2_0.pt", weights_only=True)
    old = saved["optimizer"]
    shared, entries = old["state"]["kfac"], {0: old["state"][0], 2: old["state"][2]}
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    model.load_state_dict(saved["model"])
    opt = KFAC(model, 0.5, 1.0, momentum=0.9, adapt_damping=True, damping_adaptation_interval=1)
    opt.load_state_dict(old)
    assert opt.preconditioner.steps == 3 and opt.learning_rate == 0.1
    assert opt.damping.item() == shared["damping"].item()
    assert opt.adaptation.keys() == {"prev_loss", "rho", "qmodel_change"}
    assert all(torch.equal(opt.adaptation[k], shared[k]) for k in opt.adaptation)
    for index, (name, layer) in zip((0, 2), (("0", model[0]), ("2", model[2])), strict=True):
        curvature = {k: v for k, v in entries[index].items() if k != "momentum_buffer"}
        state = opt.blocks[name].state
        assert state.keys() == curvature.keys() and all(torch.equal(state[k], curvature[k]) for k in state)
        assert set(opt.state[layer.weight]) == {"momentum_buffer"}
        assert torch.equal(opt.state[layer.weight]["momentum_buffer"], entries[index]["momentum_buffer"])
    train(opt, model, 1)
    assert opt.preconditioner.steps == 4 and "rho" in opt.last_stats


def test_lr_scheduler_drives_the_learning_rate() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.2, 1e-2, momentum=0.0, inverse_update_steps=1, norm_constraint=None)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_data()
    grads_and_step(opt, model, x, y)
    sched.step()
    assert opt.learning_rate == pytest.approx(0.1)
    s = grads_and_step(opt, model, x, y)
    torch.testing.assert_close(block_grad(s, "2", "d"), 0.1 * natural(opt, "2", block_grad(s, "2")))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -0.1}, "lr"),
        ({"damping": -1.0}, "damping"),
        ({"damping": 0.0}, "damping"),
        ({"momentum_type": "nesterov"}, "momentum_type"),
        ({"reduction": "none"}, "reduction"),
        ({"momentum": 1.5}, "momentum"),
        ({"cov_ema_decay": 1.0}, "cov_ema_decay"),
        ({"factor_update_steps": 0}, "factor_update_steps"),
        ({"inverse_update_steps": 2.5}, "inverse_update_steps"),
        ({"norm_constraint": -1.0}, "norm_constraint"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"inverse_method": "svd"}, "inverse_method"),
        ({"skip_modules": ["nope"]}, "skip_modules"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs: dict[str, object], name: str) -> None:
    args = {"lr": 0.1, "damping": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=name):
        KFAC(make_mlp(), **args)


def test_lr_is_required_and_given_once() -> None:
    with pytest.raises(ValueError, match="lr"):
        KFAC(make_mlp())
    with pytest.raises(ValueError, match="learning_rate"):
        KFAC(make_mlp(), lr=0.1, learning_rate=0.1)


# ----------------------------------------------------------------------- robustness
#: The host check in every step (1: the step warns and is not counted) or only when `last_stats`
#: is read (None: the step is decided on the device; the warning comes with the read).
CHECKS = pytest.mark.parametrize("check", [1, None], ids=["check-every-step", "check-when-read"])


@CHECKS
def test_non_finite_gradient_skips_the_step_with_one_warning(check: int | None) -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, host_check_interval=check)
    train(opt, model, 2)
    params = [p.detach().clone() for p in model.parameters()]
    factors = {n: (b.A.clone(), b.G.clone()) for n, b in opt.blocks.items()}
    x, y = make_data()
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        assert opt.last_stats["skipped"]
    assert len([w for w in caught if "non-finite" in str(w.message)]) == 1
    for p, q in zip(params, model.parameters(), strict=True):
        assert torch.equal(p, q)
    for n, b in opt.blocks.items():
        assert torch.equal(b.A, factors[n][0]) and torch.equal(b.G, factors[n][1])
    # The next finite step proceeds normally.
    train(opt, model, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@CHECKS
def test_non_finite_input_statistics_never_reach_the_factors(check: int | None) -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, host_check_interval=check)
    train(opt, model, 1)
    factors = {n: (b.A.clone(), b.G.clone()) for n, b in opt.blocks.items()}
    x, y = make_data()
    x[0, 0] = float("inf")
    opt.zero_grad()
    loss_of(model, x, y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
        assert opt.last_stats["skipped"]
    for n, b in opt.blocks.items():
        assert torch.equal(b.A, factors[n][0]) and torch.equal(b.G, factors[n][1])


def test_factors_follow_the_model_to_a_new_dtype() -> None:
    model = make_mlp().float()
    opt = KFAC(model, 0.1, 1e-2)
    x, y = make_data()
    opt.zero_grad()
    loss_of(model, x.float(), y).backward()
    opt.step()
    model.double()
    train(opt, model, 2)
    assert opt.blocks["0"].A.dtype == torch.float64
    assert opt.damping.dtype == torch.float64


def test_two_optimizers_do_not_interfere() -> None:
    m1, m2 = make_mlp(1), make_mlp(2)
    o1, o2 = KFAC(m1, 0.1, 1e-2), KFAC(m2, 0.1, 1e-2)
    train(o1, m1, 1)
    assert all(not b.has_factors() for b in o2.blocks.values())
    assert all(b.has_factors() for b in o1.blocks.values())
    train(o2, m2, 1, seed=5)
    assert not torch.equal(o1.blocks["0"].A, o2.blocks["0"].A)


# ------------------------------------------------------------------ adaptive damping
def test_adaptive_damping_pairs_each_loss_change_with_its_own_step() -> None:
    model = make_mlp()
    damping, interval, decay = 1e-2, 1, 0.9
    opt = KFAC(
        model,
        0.3,
        damping,
        adapt_damping=True,
        damping_adaptation_interval=interval,
        damping_adaptation_decay=decay,
        momentum=0.0,
    )
    x, y = make_data()
    loss0 = loss_of(model, x, y)
    loss0.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(loss=loss0)
    q0 = opt.last_stats["qmodel_change"].clone()

    expected_q = 0.0
    for name, block in opt.blocks.items():
        delta = torch.cat(
            [
                (dict(model.named_parameters())[f"{name}.weight"] - before[f"{name}.weight"]).detach(),
                (dict(model.named_parameters())[f"{name}.bias"] - before[f"{name}.bias"]).detach()[:, None],
            ],
            1,
        )
        grad = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], 1)
        vec = delta.T.reshape(-1)
        expected_q += (grad * delta).sum() + 0.5 * vec @ block.dense_curvature() @ vec
    torch.testing.assert_close(q0, torch.as_tensor(expected_q), rtol=1e-10, atol=1e-14)
    assert q0.item() < 0

    opt.zero_grad()
    loss1 = loss_of(model, x, y)
    loss1.backward()
    opt.step(loss=loss1)
    rho = ((loss1 - loss0) / q0).item()
    assert opt.last_stats["rho"].item() == pytest.approx(rho, rel=1e-12)
    omega = decay**interval
    expected = damping * omega if rho > 0.75 else damping / omega if rho < 0.25 else damping
    assert opt.damping.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("new_loss", "q", "direction"),
    [
        (1.5, -1.0, "up"),
        (0.0, -1.0, "down"),
        (0.5, -1.0, "same"),
        (0.9, 1.0, "down"),
        (float("nan"), -1.0, "same"),
    ],
)
def test_levenberg_marquardt_rule_on_constructed_cases(new_loss: float, q: float, direction: str) -> None:
    opt = KFAC(
        make_mlp(), 0.1, 1e-2, adapt_damping=True, damping_adaptation_interval=2, damping_adaptation_decay=0.9
    )
    opt._adapt_damping(torch.tensor(new_loss - 1.0), torch.tensor(q))
    factor = {"up": 1 / 0.81, "down": 0.81, "same": 1.0}[direction]
    assert opt.damping.item() == pytest.approx(1e-2 * factor, rel=1e-12)


def test_adaptive_damping_needs_the_loss() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, adapt_damping=True)
    loss_of(model, *make_data()).backward()
    with pytest.raises(ValueError, match="loss"):
        opt.step()


def test_closure_is_evaluated_and_returned() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, adapt_damping=True)
    x, y = make_data()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert first is not None and second is not None and second.item() < first.item()


# -------------------------------------------------------------- option effects (mutation-killers)
@CHECKS
def test_nan_loss_with_finite_gradients_skips_the_step(check: int | None) -> None:
    """A non-finite loss passed to step() skips the step even when every gradient is finite; the
    step counter (the schedules' clock) counts it only when the step made no host check."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, host_check_interval=check)
    train(opt, model, 1)
    params = [p.detach().clone() for p in model.parameters()]
    factors = {n: (b.A.clone(), b.G.clone()) for n, b in opt.blocks.items()}
    opt.zero_grad()
    loss_of(model, *make_data()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(loss=torch.tensor(float("nan")))
        assert opt.last_stats["skipped"]
    assert opt.preconditioner.steps == (1 if check == 1 else 2)
    for p, q in zip(params, model.parameters(), strict=True):
        assert torch.equal(p, q)
    for n, b in opt.blocks.items():
        assert torch.equal(b.A, factors[n][0]) and torch.equal(b.G, factors[n][1])


@CHECKS
def test_non_finite_statistics_with_finite_gradients_skip_the_step(check: int | None) -> None:
    """Inputs of 1e200 overflow A (a a^T = inf) while every gradient (g a^T) stays finite."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, host_check_interval=check)
    train(opt, model, 1)
    params = [p.detach().clone() for p in model.parameters()]
    factors = {n: (b.A.clone(), b.G.clone()) for n, b in opt.blocks.items()}
    x, y = make_data()
    x[0, 0] = 1e200
    opt.zero_grad()
    loss_of(model, x, y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
        assert opt.last_stats["skipped"]
    for p, q in zip(params, model.parameters(), strict=True):
        assert torch.equal(p, q)
    for n, b in opt.blocks.items():
        assert torch.equal(b.A, factors[n][0]) and torch.equal(b.G, factors[n][1])
    assert opt.preconditioner.pending_statistics() == []


class _Scaled(nn.Module):
    """The MLP times a learned scalar: `scale` has no curvature block (the fallback update)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_mlp()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.body(x)


def test_sum_reduction_scales_parameters_outside_any_block() -> None:
    """With reduction='sum' every gradient, the fallback's too, is turned into the mean loss's."""
    runs = {}
    for reduction in ("mean", "sum"):
        model = _Scaled()
        opt = KFAC(model, 0.2, 1e-2, momentum=0.5, reduction=reduction)
        assert "scale: fallback" in repr(opt)
        train(opt, model, 3, reduction=reduction)
        runs[reduction] = model
    for (name, p), q in zip(runs["mean"].named_parameters(), runs["sum"].parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)
    assert runs["sum"].scale.item() != 1.5


def test_adam_momentum_with_the_norm_constraint() -> None:
    """momentum_type='adam': update = c F^-1 v with c = min(1, sqrt(C / (lr^2 v^T F^-1 v))), v the
    plain momentum of the gradients; the constraint binds here (c < 1)."""
    model = make_mlp()
    lr, mu, bound = 0.5, 0.9, 1e-5
    opt = KFAC(
        model, lr, 1e-2, momentum=mu, momentum_type="adam", norm_constraint=bound, inverse_update_steps=1
    )
    s1 = grads_and_step(opt, model, *make_data(seed=1))
    s2 = grads_and_step(opt, model, *make_data(seed=2))
    velocity = {n: mu * block_grad(s1, n) + block_grad(s2, n) for n in ("0", "2")}
    sq = sum((velocity[n] * natural(opt, n, velocity[n])).sum() for n in ("0", "2"))
    coeff = (bound / (lr**2 * sq)).sqrt().item()
    assert coeff < 0.5
    for n in ("0", "2"):
        expected = lr * coeff * natural(opt, n, velocity[n])
        torch.testing.assert_close(block_grad(s2, n, "d"), expected, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------- nothing silently wrong
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_parameter_never_moves_and_gets_no_grad(frozen: str, when: str) -> None:
    """A parameter frozen before or after construction stays put; the rest of its layer trains."""
    model = make_mlp()
    param = getattr(model[2], frozen)
    if when == "before":
        param.requires_grad_(False)
    opt = KFAC(model, 0.1, 1e-2)
    if when == "after":
        param.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(opt, model, 3)
    assert torch.equal(param, before[f"2.{frozen}"]) and param.grad is None
    other = "bias" if frozen == "weight" else "weight"
    assert not torch.equal(getattr(model[2], other), before[f"2.{other}"])


def test_frozen_parameter_with_a_stale_gradient_never_moves() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, weight_decay=0.1)
    loss_of(model, *make_data()).backward()
    model[0].weight.requires_grad_(False)  # keeps the .grad of the pass above
    before = model[0].weight.detach().clone()
    opt.step()
    assert torch.equal(model[0].weight, before)


def test_zero_grad_discards_the_statistics_of_a_batch_whose_step_never_came() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    x, y = make_data(seed=1)
    loss_of(model, x, y).backward()  # a batch the user decides to skip
    opt.zero_grad()
    assert opt.preconditioner.pending_statistics() == []
    fresh_model = make_mlp()
    fresh = KFAC(fresh_model, 0.1, 1e-2)
    for m, o in ((model, opt), (fresh_model, fresh)):
        o.zero_grad()
        loss_of(m, *make_data(seed=2)).backward()
        o.step()
    for name, block in opt.blocks.items():
        assert torch.equal(block.A, fresh.blocks[name].A) and torch.equal(block.G, fresh.blocks[name].G)


def test_zero_grad_between_forward_and_backward_keeps_the_forward_statistics() -> None:
    """Lightning's order (forward, zero_grad, backward, step) still records both factors."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    x, y = make_data()
    loss = loss_of(model, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not opt.last_stats["skipped"] and all(b.has_factors() for b in opt.blocks.values())


def test_gradient_accumulation_over_two_halved_losses_averages_their_statistics() -> None:
    """Two micro-batches of 16 with the common loop, (loss / 2).backward(): A and G are the averages of
    each batch's own (G does not carry the 1/4 of the halved losses)."""
    x1, y1 = make_data(seed=1)
    x2, y2 = make_data(seed=2)
    single = {}
    for key, (x, y) in (("1", (x1, y1)), ("2", (x2, y2))):
        model = make_mlp()
        opt = KFAC(model, 0.1, 1e-2)
        loss_of(model, x, y).backward()
        opt.update_cov()
        single[key] = {n: (b.A.clone(), b.G.clone()) for n, b in opt.blocks.items()}
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    opt.zero_grad()
    for x, y in ((x1, y1), (x2, y2)):
        (loss_of(model, x, y) / 2).backward()
    opt.step()
    assert not opt.last_stats["skipped"]
    for name, block in opt.blocks.items():
        torch.testing.assert_close(block.A, (single["1"][name][0] + single["2"][name][0]) / 2)
        torch.testing.assert_close(block.G, (single["1"][name][1] + single["2"][name][1]) / 2)


def test_accumulated_sum_loss_steps_like_the_whole_batch_and_zero_grad_forgets_skipped_examples() -> None:
    """reduction='sum': KFAC divides the accumulated gradient by the examples of every backward pass
    since the last step (10 + 6), and zero_grad() forgets those of a batch whose step never came."""
    x, y = make_data(seed=3)
    models = [make_mlp(), make_mlp()]
    opts = [KFAC(m, 0.1, 1e-2, reduction="sum", norm_constraint=None) for m in models]
    loss_of(models[0], *make_data(seed=4), reduction="sum").backward()  # a batch the user skips
    opts[0].zero_grad()
    loss_of(models[0], x[:10], y[:10], reduction="sum").backward()
    loss_of(models[0], x[10:], y[10:], reduction="sum").backward()
    opts[0].step()
    opts[1].zero_grad()
    loss_of(models[1], x, y, reduction="sum").backward()
    opts[1].step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@CHECKS
def test_step_after_a_skipped_step_is_taken(check: int | None) -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, host_check_interval=check)
    opt.zero_grad()
    loss_of(model, *make_data()).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 skipped in a row"):
        opt.step()
        assert opt.last_stats["skipped"] and opt.last_stats["skipped_in_a_row"] == 1
    train(opt, model, 1)
    assert not opt.last_stats["skipped"] and opt.last_stats["skipped_in_a_row"] == 0


def test_a_step_skipped_on_the_device_leaves_momentum_and_the_schedule_safe() -> None:
    """Without a host check in the step: the momentum buffers stay as they were, and a first step
    that is skipped (its factors never estimated) gives finite steps after it."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.9)
    _nan_step(opt, model)  # step 0: factors folded with weight 0, inverses of them not used
    started = [opt.state[p]["momentum_buffer"] for p in model.parameters() if opt.state[p]]
    assert started and not any(buf.any() for buf in started)  # buffers started at zero
    train(opt, model, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    buffers = {p: opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if opt.state[p]}
    params = [p.detach().clone() for p in model.parameters()]
    assert buffers
    _nan_step(opt, model)
    for p, buf in buffers.items():
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))
    with pytest.warns(RuntimeWarning, match="1 skipped in a row, 2 since the last host check"):
        assert opt.last_stats["skipped"]


def test_inverses_of_a_first_step_skipped_on_the_device_are_identities_until_refreshed() -> None:
    """The factors of a skipped first step are not estimated (their inverses are NaN): the device
    keeps identities instead, so the next step, with no refresh due, is a plain gradient step."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.0, warmup_steps=0, inverse_update_steps=10, norm_constraint=None)
    _nan_step(opt, model)
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, *make_data()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, before, g in zip(model.parameters(), params, grads, strict=True):
        torch.testing.assert_close(p, before - 0.1 * g, rtol=0, atol=1e-15)


def _nan_step(opt: KFAC, model: nn.Module) -> None:
    opt.zero_grad()
    loss_of(model, *make_data()).backward()
    model[2].weight.grad[0, 0] = float("nan")
    opt.step()


def test_consecutive_skipped_steps_are_counted_and_can_raise() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, max_skipped_steps=3)
    for count in (1, 2):
        with pytest.warns(RuntimeWarning, match=f"{count} skipped in a row"):
            _nan_step(opt, model)
        assert opt.last_stats["skipped_in_a_row"] == count
    with pytest.raises(RuntimeError, match="max_skipped_steps=3"):
        _nan_step(opt, model)
    with pytest.raises(ValueError, match="max_skipped_steps"):
        KFAC(make_mlp(), 0.1, max_skipped_steps=0)


def test_step_without_gradients_is_a_clear_error_before_any_change() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    loss_of(model, *make_data())  # forward only: input statistics pending
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.step()
    assert opt.preconditioner.steps == 0 and not any(b.has_factors() for b in opt.blocks.values())


def test_empty_batch_is_a_clear_error() -> None:
    model = make_mlp()
    KFAC(model, 0.1, 1e-2)
    x, y = make_data()
    with pytest.raises(ValueError, match="empty batch"):
        loss_of(model, x[:0], y[:0])


def test_state_dict_of_another_model_is_refused_naming_the_block() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    train(opt, model, 1)
    other = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    other_opt = KFAC(other, 0.1, 1e-2)
    with pytest.raises(ValueError, match="block '2'"):
        other_opt.load_state_dict(opt.state_dict())
    assert not any(b.has_factors() for b in other_opt.blocks.values())
    diagonal = KFAC(make_mlp(), 0.1, 1e-2, approximation="diagonal")
    with pytest.raises(ValueError, match=r"block '0'.*approximation"):
        diagonal.load_state_dict(opt.state_dict())


def test_add_param_group_is_refused() -> None:
    opt = KFAC(make_mlp(), 0.1, 1e-2)
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert str(info.value) == (
        "KFAC does not support add_param_group: it trains the parameters of the model given to its "
        "constructor; build it on a model that holds every parameter to train"
    )
    assert len(opt.param_groups) == 1


def test_module_replaced_after_construction_is_a_clear_error() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    train(opt, model, 1)
    model[2] = nn.Linear(8, 3)
    before = model[2].weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"2\.weight"):
        train(opt, model, 1)
    assert torch.equal(model[2].weight, before) and opt.preconditioner.steps == 1


def conv_norm_classifier() -> nn.Module:
    """Tiny Conv2d + BatchNorm2d + GroupNorm + ConvTranspose2d classifier (5 classes)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 5, 2, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


@pytest.mark.parametrize(("lr", "damping"), [(0.05, 1e-2), (0.05, 1e-3)])
def test_default_guard_keeps_a_tiny_conv_norm_net_finite_and_falling(lr: float, damping: float) -> None:
    """Defaults otherwise (the norm constraint among them): without the guard this net climbs
    from 1.59 to 2.8 (damping 1e-2) and 31 (1e-3) in 30 steps at batch 8 in float32."""
    torch.set_default_dtype(torch.float32)
    model = conv_norm_classifier()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    opt = KFAC(model, lr=lr, damping=damping)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max(losses) <= losses[0] * 1.1 and losses[-1] < 0.5 * losses[0], losses


def test_weight_decay_applies_to_parameters_outside_any_block() -> None:
    model = _Scaled()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.0, weight_decay=0.5)
    s = grads_and_step(opt, model, *make_data())
    torch.testing.assert_close(s["d/scale"], 0.1 * (s["g/scale"] + 0.5 * 1.5), rtol=1e-12, atol=1e-15)


class _ScaleOnly(nn.Module):
    """Three logits: the first three inputs times a learned vector (no curvature block)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] * self.weight


def test_a_model_without_curvature_blocks_takes_plain_sgd_steps() -> None:
    model = _ScaleOnly()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.0)
    assert opt.blocks == {}
    s = grads_and_step(opt, model, *make_data())
    torch.testing.assert_close(s["d/weight"], 0.1 * s["g/weight"], rtol=1e-12, atol=1e-15)


def test_layers_without_bias_keep_their_velocity_in_the_weight_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))
    opt = KFAC(model, 0.1, 1e-2, momentum=0.9, inverse_update_steps=1, norm_constraint=None)
    s1 = grads_and_step(opt, model, *make_data(seed=1))
    torch.testing.assert_close(opt.state[model[2].weight]["momentum_buffer"][0], s1["d/2.weight"] / 0.1)
    s2 = grads_and_step(opt, model, *make_data(seed=2))
    p2 = natural(opt, "2", s2["g/2.weight"])
    torch.testing.assert_close(
        s2["d/2.weight"], 0.1 * (0.9 * s1["d/2.weight"] / 0.1 + p2), rtol=1e-12, atol=1e-14
    )


def test_repr_shows_the_hyperparameters_damping_and_registration() -> None:
    opt = KFAC(make_mlp(), 0.1, 1e-2, momentum=0.5)
    text = repr(opt)
    assert text.startswith("KFAC(lr=0.1, momentum=0.5, weight_decay=0.0, ")
    assert "damping=0.01)\nK-FAC registration:\n  0.weight: LinearBlock" in text
    assert repr(opt.preconditioner).startswith("KFACPreconditioner(\nK-FAC registration:\n")


def test_last_stats_hold_the_learning_rate_and_momentum_of_a_fixed_step() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.9)
    train(opt, model, 1)
    assert opt.last_stats["learning_rate"] == 0.1 and opt.last_stats["momentum"] == 0.9


def test_a_damping_set_by_the_user_is_kept_without_adaptation() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    opt.damping = 0.5
    train(opt, model, 2)
    assert opt.damping.item() == 0.5 and opt.last_stats["damping"].item() == 0.5


def test_scheduled_norm_constraint_equals_the_constant_one() -> None:
    runs = []
    for bound in (1e-5, lambda step: 1e-5):
        model = make_mlp()
        opt = KFAC(model, 0.5, 1e-2, momentum=0.0, norm_constraint=bound)
        train(opt, model, 2)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


def test_zero_grad_sets_gradients_to_none_or_to_zero() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    loss_of(model, *make_data()).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------ optimizer paths (mutation survivors, issue 12)
def test_last_stats_are_empty_before_the_first_step() -> None:
    assert KFAC(make_mlp(), 0.1, 1e-2).last_stats == {}


def test_a_learning_rate_schedule_starts_the_param_group_at_its_step_0_value() -> None:
    opt = KFAC(make_mlp(), lambda step: 0.1 / (step + 1), 1e-2)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.defaults["lr"] == 0.1


def test_an_unknown_attribute_is_an_attribute_error_naming_it() -> None:
    opt = KFAC(make_mlp(), 0.1, 1e-2, momentum_type="adam")
    assert opt.momentum_type == opt.options.momentum_type
    with pytest.raises(AttributeError) as info:
        _ = opt.no_such_option
    assert str(info.value) == "'KFAC' object has no attribute 'no_such_option'"
    bare = KFAC.__new__(KFAC)  # no options yet (as while unpickling)
    with pytest.raises(AttributeError) as info:
        _ = bare.lr
    assert str(info.value) == "'KFAC' object has no attribute 'lr'"


def test_module_added_after_construction_is_a_clear_error_naming_its_parameters() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    train(opt, model, 1)
    model.append(nn.Linear(3, 3))
    with pytest.raises(RuntimeError) as info:
        train(opt, model, 1)
    assert str(info.value) == (
        "K-FAC: the model's parameters changed since the optimizer was built (3.bias, 3.weight); "
        "build a new KFAC for the changed model"
    )
    assert opt.preconditioner.steps == 1


#: With loss_fn given, why the step could not take the batch from the user's pass (which called
#: F.cross_entropy, not the loss_fn module: torch_kfac.last_batch).
NO_PASS = (
    "; none could be taken from the last training pass: loss_fn was not called on the model's outputs "
    "with gradients enabled since the last step"
)


@pytest.mark.parametrize(
    ("options", "given", "message"),
    [
        (
            {"adapt_damping": True},
            {},
            "adapt_damping, reject_steps and the adaptive learning rate/momentum need the loss: "
            "call step(loss=loss, ...) or pass a closure",
        ),
        (
            {"adaptive_learning_rate": True, "loss_fn": nn.CrossEntropyLoss()},
            {"loss"},
            "the exact quadratic model (adaptive_learning_rate, adaptive_momentum or "
            f"qmodel_curvature='exact') needs step(batch=(inputs, targets)){NO_PASS}",
        ),
        (
            {"reject_steps": True, "loss_fn": nn.CrossEntropyLoss()},
            {"loss"},
            f"reject_steps=True needs step(batch=(inputs, targets)) or a closure{NO_PASS}",
        ),
        ({}, {"batch"}, "step(batch=...) needs loss_fn=... in the KFAC constructor"),
    ],
    ids=["loss", "batch-for-the-exact-model", "batch-or-closure-for-rejection", "loss_fn"],
)
def test_a_step_missing_what_its_options_need_says_what_to_pass(
    options: dict[str, object], given: set[str], message: str
) -> None:
    model = make_mlp()
    opt = KFAC(model, None if options.get("adaptive_learning_rate") else 0.1, 1e-2, **options)  # type: ignore[arg-type]
    x, y = make_data()
    loss = loss_of(model, x, y)
    loss.backward()
    with pytest.raises(ValueError) as info:
        opt.step(loss=loss if "loss" in given else None, batch=(x, y) if "batch" in given else None)
    assert str(info.value) == message
    assert opt.preconditioner.steps == 0


def _overshooting_step(opt: KFAC, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step at a learning rate that must make the loss larger."""
    opt.learning_rate = 1e4
    opt.zero_grad()
    loss = loss_of(model, x, y)
    loss.backward()
    opt.step(loss=loss, batch=(x, y))


def test_reject_steps_with_a_closure_needs_no_batch() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, loss_fn=nn.CrossEntropyLoss(), reject_steps=True)
    x, y = make_data()

    def closure(backward: bool = True) -> torch.Tensor:
        if backward:
            opt.zero_grad()
        loss = loss_of(model, x, y)
        if backward:
            loss.backward()
        return loss

    opt.step(closure)
    assert opt.last_stats["rejected"] is False
    params = [p.detach().clone() for p in model.parameters()]
    opt.learning_rate = 1e4
    opt.step(closure)
    assert opt.last_stats["rejected"] is True
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))


def test_a_step_rejected_after_a_host_check_in_the_step_is_undone() -> None:
    """host_check_interval=1: the step is known to be taken before the rejection's own read."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, loss_fn=nn.CrossEntropyLoss(), reject_steps=True, host_check_interval=1)
    x, y = make_data()
    opt.zero_grad()
    loss = loss_of(model, x, y)
    loss.backward()
    opt.step(loss=loss, batch=(x, y))
    assert opt.last_stats["rejected"] is False and opt.last_stats["skipped"] is False
    params = [p.detach().clone() for p in model.parameters()]
    damping = opt.damping.clone()
    _overshooting_step(opt, model, x, y)
    assert opt.last_stats["rejected"] is True
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))
    torch.testing.assert_close(opt.damping, damping / opt.options.omega, rtol=1e-15, atol=0)


def test_with_reject_steps_a_step_skipped_on_the_device_is_skipped_not_rejected() -> None:
    """The skip is learnt in the rejection's read: parameters, damping and schedule are left as
    they were (the loss after the step is that of the unchanged parameters), and `last_stats`
    says skipped (counted), not rejected."""
    model = make_mlp()
    opt = KFAC(
        model,
        0.1,
        1e-2,
        loss_fn=nn.CrossEntropyLoss(),
        reject_steps=True,
        adapt_damping=True,
        damping_adaptation_interval=1,
    )
    x, y = make_data()
    opt.zero_grad()
    loss = loss_of(model, x, y)
    loss.backward()
    opt.step(loss=loss, batch=(x, y))
    stats = opt.last_stats
    assert stats["skipped"] is False and stats["skipped_in_a_row"] == 0 and stats["rejected"] is False
    params = [p.detach().clone() for p in model.parameters()]
    damping = opt.damping.clone()
    opt.zero_grad()
    loss = loss_of(model, x, y)
    loss.backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(loss=loss, batch=(x, y))
    stats = opt.last_stats
    assert stats["skipped"] is True and stats["skipped_in_a_row"] == 1 and stats["rejected"] is False
    torch.testing.assert_close(stats["new_loss"], loss.detach(), rtol=1e-14, atol=0)
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))
    assert torch.equal(opt.damping, damping) and opt.preconditioner.steps == 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_model_without_curvature_blocks_steps_with_either_reduction(reduction: str) -> None:
    """Without blocks nothing counts the examples: the gradient is taken as it is."""
    model = nn.Sequential(nn.Flatten(), _ScaleOnly())
    opt = KFAC(model, 0.1, 1e-2, momentum=0.0, reduction=reduction)
    assert opt.blocks == {}
    s = grads_and_step(opt, model, *make_data())
    torch.testing.assert_close(s["d/1.weight"], 0.1 * s["g/1.weight"], rtol=1e-12, atol=1e-15)


def test_damping_adapted_on_the_same_batch_keeps_no_previous_loss() -> None:
    """The previous step's loss is the rule's memory only in the original API's pairing (no batch)."""
    model = make_mlp()
    opt = KFAC(
        model, 0.1, 1e-2, loss_fn=nn.CrossEntropyLoss(), adapt_damping=True, damping_adaptation_interval=1
    )
    x, y = make_data()
    for _ in range(2):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step(loss=loss, batch=(x, y))
    assert set(opt.adaptation) == {"rho"} and set(opt.state_dict()["kfac"]["adaptation"]) == {"rho"}


def test_adaptive_damping_steps_parameters_outside_any_block_with_sgd() -> None:
    model = _Scaled()
    opt = KFAC(
        model,
        0.1,
        1e-2,
        momentum=0.0,
        loss_fn=nn.CrossEntropyLoss(),
        adapt_damping=True,
        damping_adaptation_interval=1,
    )
    x, y = make_data()
    loss = loss_of(model, x, y)
    loss.backward()
    grad, before = model.scale.grad.clone(), model.scale.detach().clone()
    opt.step(loss=loss, batch=(x, y))
    torch.testing.assert_close(model.scale.detach(), before - 0.1 * grad, rtol=1e-12, atol=1e-15)
    assert torch.isfinite(opt.last_stats["rho"])


def test_a_norm_constraint_schedule_is_read_at_each_step() -> None:
    runs = {}
    for name, bound in (("constant", 1e-5), ("schedule", lambda step: 1e-5 * 10**step)):
        model = make_mlp()
        opt = KFAC(model, 0.5, 1e-2, momentum=0.0, norm_constraint=bound)
        runs[name] = []
        for _ in range(2):
            train(opt, model, 1)
            runs[name].append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(runs["constant"][0], runs["schedule"][0], strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(runs["constant"][1], runs["schedule"][1], strict=True))


def test_the_loss_after_a_bfloat16_step_is_compared_in_the_factor_dtype() -> None:
    model = make_mlp().to(torch.bfloat16)
    opt = KFAC(
        model, 0.1, 1e-2, loss_fn=nn.CrossEntropyLoss(), adapt_damping=True, damping_adaptation_interval=1
    )
    x, y = make_data()
    x = x.to(torch.bfloat16)
    loss = loss_of(model, x, y)
    loss.backward()
    opt.step(loss=loss, batch=(x, y))
    assert opt.damping.dtype == torch.float32
    assert opt.last_stats["loss"].dtype == opt.last_stats["new_loss"].dtype == torch.float32


def test_a_step_skipped_on_the_device_leaves_the_momentum_outside_any_block() -> None:
    model = _Scaled()
    opt = KFAC(model, 0.1, 1e-2, momentum=0.9)
    train(opt, model, 2)
    buffer, scale = opt.state[model.scale]["momentum_buffer"].clone(), model.scale.detach().clone()
    x, y = make_data()
    x[0, 0] = 1e200  # A overflows; every gradient stays finite
    opt.zero_grad()
    loss_of(model, x, y).backward()
    assert torch.isfinite(model.scale.grad)
    opt.step()
    assert torch.equal(opt.state[model.scale]["momentum_buffer"], buffer) and torch.equal(model.scale, scale)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert opt.last_stats["skipped"]


def test_state_dict_of_version_0_2_0_with_a_block_never_stepped_loads() -> None:
    """A block whose first parameter has no entry in the old shared `state` starts without factors."""
    saved = torch.load(Path(__file__).parent / "golden" / "state_dict_0_2_0.pt", weights_only=True)
    old = saved["optimizer"]
    del old["state"][2]
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = KFAC(model, 0.5, 1.0, momentum=0.9, adapt_damping=True, damping_adaptation_interval=1)
    opt.load_state_dict(old)
    assert opt.blocks["0"].has_factors() and not opt.blocks["2"].has_factors()
    assert opt.preconditioner.steps == 3


@pytest.mark.parametrize(
    "options",
    [
        {"adapt_damping": True, "damping_adaptation_interval": 1},
        {"adaptive_learning_rate": True, "adaptive_momentum": True},
    ],
    ids=["adapt-damping", "qmodel"],
)
def test_an_adaptive_run_continues_after_a_skipped_step_as_if_it_never_came(
    options: dict[str, object],
) -> None:
    """The adaptive options check on the host in the step: a non-finite step returns before the
    damping rule, the quadratic model and the schedule see it."""
    runs = []
    for skip in (False, True):
        model = make_mlp()
        lr = None if options.get("adaptive_learning_rate") else 0.1
        opt = KFAC(model, lr, 1e-2, loss_fn=nn.CrossEntropyLoss(), **options)  # type: ignore[arg-type]
        x, y = make_data()
        for i in range(4 if skip else 3):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            if skip and i == 1:
                model[2].weight.grad[0, 0] = float("nan")
                with pytest.warns(RuntimeWarning, match="non-finite"):
                    opt.step(loss=loss, batch=(x, y))
                assert opt.last_stats["skipped"] is True
                continue
            opt.step(loss=loss, batch=(x, y))
            assert opt.last_stats["skipped"] is False
        runs.append(
            ([p.detach().clone() for p in model.parameters()], opt.damping.clone(), opt.preconditioner.steps)
        )
    (clean, clean_damping, clean_steps), (skipped, skipped_damping, skipped_steps) = runs
    assert all(torch.equal(p, q) for p, q in zip(clean, skipped, strict=True))
    assert torch.equal(clean_damping, skipped_damping) and clean_steps == skipped_steps == 3


class _Bag(nn.Module):
    """Mean of token embeddings, then a Linear layer."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8, sparse=sparse)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("preset", [False, True], ids=["fixed", "preset"])
def test_a_sparse_embedding_gets_the_plain_update_its_report_names(preset: bool) -> None:
    """`nn.Embedding(sparse=True)` falls back to the plain update (the registration report says
    so): the run equals that of a dense embedding left to the fallback by `skip_modules`, and the
    sparse `.grad` is left as it was. Before, the element-wise update raised on sparse tensors."""
    from torch_kfac import presets

    gen = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 20, (16, 5), generator=gen), torch.randint(0, 3, (16,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for sparse in (True, False):
        model = _Bag(sparse)
        opts: dict[str, Any] = {} if sparse else {"skip_modules": ["embed"]}
        opt = (
            presets.adaptive(model, loss_fn, **opts) if preset else KFAC(model, lr=0.1, momentum=0.9, **opts)
        )
        for step in range(3):
            torch.manual_seed(step)  # the MC Fisher's labels
            opt.zero_grad()
            loss_fn(model(ids), targets).backward()
            opt.step()
        assert model.embed.weight.grad.is_sparse == sparse
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


def _copied(triple: tuple[nn.Module, KFAC, nn.Module], how: str) -> tuple[nn.Module, KFAC, nn.Module]:
    import copy
    import io

    if how == "deepcopy":
        return copy.deepcopy(triple)
    buffer = io.BytesIO()
    torch.save(triple, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("preset", [False, True], ids=["fixed", "preset"])
def test_a_copied_model_and_optimizer_train_as_the_originals(preset: bool, how: str) -> None:
    """`copy.deepcopy` and a `torch.save`/`torch.load` round trip of (model, optimizer, loss
    function) give a triple that trains bit for bit as an uninterrupted run, as does the original
    beside it (interleaved: no pass of one reaches the other's statistics). The preset steps bare,
    so its training-pass hooks are copied live too; the LSTM and attention blocks replace their
    module's forward. A deep copy shares the user's loss function: configuration, not state."""
    from torch_kfac import presets

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(5)]

    def build() -> tuple[nn.Module, KFAC, nn.Module]:
        torch.manual_seed(0)
        model, loss_fn = AttentionLSTM().double(), nn.CrossEntropyLoss()
        # The MC labels from a seed of the optimizer's own (the global generator serves both runs).
        opt = presets.adaptive(model, loss_fn, mc_seed=5) if preset else KFAC(model, lr=0.1, damping=0.1)
        return model, opt, loss_fn

    def step(
        model: nn.Module, opt: KFAC, loss_fn: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        opt.zero_grad()
        loss_fn(model(batch[0].double()), batch[1]).backward()
        opt.step()

    reference = build()
    for batch in batches:
        step(*reference, batch)
    original = build()
    for batch in batches[:2]:
        step(*original, batch)
    copied = _copied(original, how)
    assert copied[1].model is copied[0] and copied[1].preconditioner.model is copied[0]
    if preset:
        assert copied[1].loss_fn is copied[2] and (copied[2] is original[2]) == (how == "deepcopy")
    for batch in batches[2:]:
        step(*original, batch)
        step(*copied, batch)
    for model, _, _ in (original, copied):
        for (name, p), q in zip(reference[0].named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_a_copy_of_the_optimizer_alone_trains_its_own_copy_of_the_model() -> None:
    """`copy.deepcopy(opt)` copies the model with it (`opt.model`), as the preconditioner needs its
    hooks on a model of its own; the user's model is neither moved nor recorded by the copy."""
    import copy

    model = make_mlp()
    opt = KFAC(model, lr=0.1, damping=0.1)
    twin = KFAC(make_mlp(), lr=0.1, damping=0.1)
    clone = copy.deepcopy(opt)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_data()
    for o in (clone, twin):
        o.zero_grad()
        F.cross_entropy(o.model(x), y).backward()
        o.step()
    for p, q in zip(twin.model.parameters(), clone.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert not any(b.has_pending(k) for b in opt.preconditioner.blocks.values() for k in b.FACTORS)


def test_a_deep_copy_shares_the_users_grad_scaler() -> None:
    """The copy unscales its statistics by the scaler the loop goes on using, not by a frozen copy
    of it: a copied pair stepped through the user's scaler trains as an uninterrupted run."""
    import copy

    def build() -> tuple[nn.Module, KFAC, torch.amp.GradScaler]:
        model = make_mlp().double()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        return model, KFAC(model, lr=0.1, damping=0.1, grad_scaler=scaler), scaler

    def step(model: nn.Module, opt: KFAC, scaler: torch.amp.GradScaler, seed: int) -> None:
        x, y = make_data(seed=seed)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x.double()), y)).backward()
        scaler.step(opt)
        scaler.update()

    reference = build()
    for seed in range(4):
        step(*reference, seed)
    model, opt, scaler = build()
    for seed in range(2):
        step(model, opt, scaler, seed)
    model, opt = copy.deepcopy((model, opt))
    assert opt.options.grad_scaler is scaler and opt.preconditioner.options.grad_scaler is scaler
    for seed in range(2, 4):
        step(model, opt, scaler, seed)  # the scale grows every step: a stale copy would be off
    for p, q in zip(reference[0].parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
