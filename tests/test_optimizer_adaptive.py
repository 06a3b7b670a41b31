"""KFAC's second-order machinery: LM damping on the same batch, the exact quadratic model,
step rejection, schedules, burn-in and per-step statistics."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_data, make_mlp
from tests.test_optimizer import _Scaled
from tests.test_qmodel import dense_ggn, flat
from torch_kfac import KFAC

pytestmark = pytest.mark.usefixtures("float64")

LOSS = nn.CrossEntropyLoss()


def one_step(opt: KFAC, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """A step with `batch=`; returns gradients and parameters before it (by name)."""
    opt.zero_grad()
    loss = LOSS(model(x), y)
    loss.backward()
    record = {f"g/{n}": p.grad.clone() for n, p in model.named_parameters()}
    record |= {f"p/{n}": p.detach().clone() for n, p in model.named_parameters()}
    opt.step(loss=loss, batch=(x, y))
    return record


FIXED = {"lr": 0.1, "momentum": 0.5}  # the values of the coefficient that is not adapted
BOUNDS = (0.0, 0.95)  # momentum_bounds of the 'bounded' case: its free momentum is -0.15


@pytest.mark.parametrize(
    ("adapted", "qmodel_batch_size"),
    [("both", None), ("both", 4), ("lr", None), ("momentum", None), ("bounded", None)],
)
def test_learning_rate_and_momentum_minimise_the_exact_quadratic(
    adapted: str, qmodel_batch_size: int | None
) -> None:
    """With qmodel_batch_size m the curvature is the GGN of the batch's first m examples; the
    gradient stays the whole batch's. A coefficient that is not adapted keeps its option's value and
    the other minimises the model along its direction. A momentum outside `momentum_bounds` is
    clipped and the learning rate minimises the model with the clipped momentum."""
    model = make_mlp()
    bounded = adapted == "bounded"
    free = {"lr": adapted != "momentum", "momentum": adapted != "lr"}
    opt = KFAC(
        model,
        damping=1e-2,
        loss_fn=LOSS,
        adaptive_learning_rate=free["lr"],
        adaptive_momentum=free["momentum"],
        inverse_update_steps=1,
        qmodel_batch_size=qmodel_batch_size,
        momentum_bounds=BOUNDS if bounded else None,
        **{k: v for k, v in FIXED.items() if not free[k]},
    )
    x, y = make_data()
    names = [n for n, _ in model.named_parameters()]
    theta0 = one_step(opt, model, x, y)
    record = one_step(opt, model, x, y)
    theta1 = {n: record[f"p/{n}"] for n in names}
    theta2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = flat({n: record[f"g/{n}"] for n in names}, names)
    # Directions: -F^-1 g with the inverses this step used, and the previous change.
    v1 = {}
    for name, block in opt.blocks.items():
        mat = block.to_matrix(record[f"g/{name}.weight"], record[f"g/{name}.bias"])
        v1[f"{name}.weight"], v1[f"{name}.bias"] = block.from_matrix(
            -block.precondition(mat, opt.damping, True)
        )
    basis = torch.stack([flat(v1, names), flat({n: theta1[n] - theta0[f"p/{n}"] for n in names}, names)], 1)
    alpha, mu = opt.last_stats["learning_rate"], opt.last_stats["momentum"]
    change = flat({n: theta2[n] - theta1[n] for n in names}, names)
    torch.testing.assert_close(change, basis @ torch.stack([alpha, mu]), rtol=1e-9, atol=1e-13)

    at_theta1 = make_mlp()
    at_theta1.load_state_dict(theta1)
    count = qmodel_batch_size or len(y)
    damped = dense_ggn(at_theta1, LOSS, x[:count], y[:count]) + opt.damping * torch.eye(len(g))
    m, b = basis.T @ damped @ basis, basis.T @ g
    if adapted == "both":
        expected = -torch.linalg.solve(m, b)
    elif bounded:
        assert -torch.linalg.solve(m, b)[1] < BOUNDS[0] - 0.1  # the bound is active
        expected = torch.stack([-(b[0] + m[0, 1] * BOUNDS[0]) / m[0, 0], torch.tensor(BOUNDS[0])])
    elif adapted == "lr":
        expected = torch.stack(
            [-(b[0] + m[0, 1] * FIXED["momentum"]) / m[0, 0], torch.tensor(FIXED["momentum"])]
        )
    else:
        expected = torch.stack([torch.tensor(FIXED["lr"]), -(b[1] + m[1, 0] * FIXED["lr"]) / m[1, 1]])
    torch.testing.assert_close(torch.stack([alpha, mu]), expected, rtol=1e-8, atol=1e-12)

    def q(c: torch.Tensor) -> torch.Tensor:
        d = basis @ c
        return g @ d + 0.5 * d @ damped @ d

    best = torch.stack([alpha, mu])
    grid = torch.linspace(-0.05, 0.05, 41)
    steps = [torch.stack([a * free["lr"], c * free["momentum"]]) for a in grid for c in grid]
    if bounded:  # the minimum over the feasible strip
        steps = [s for s in steps if BOUNDS[0] <= mu + s[1] <= BOUNDS[1]]
    assert q(best) <= torch.stack([q(best + step) for step in steps]).min() + 1e-12
    assert alpha.item() > 0


def test_exact_q_for_damping_equals_the_dense_model() -> None:
    model = make_mlp()
    opt = KFAC(
        model,
        0.2,
        1e-2,
        momentum=0.0,
        loss_fn=LOSS,
        adapt_damping=True,
        qmodel_curvature="exact",
        qmodel_batch_size=None,
        damping_adaptation_interval=1,
    )
    x, y = make_data()
    record = one_step(opt, model, x, y)
    names = [n for n, _ in model.named_parameters()]
    delta = flat({n: p.detach() - record[f"p/{n}"] for n, p in model.named_parameters()}, names)
    before = make_mlp()
    before.load_state_dict({n: record[f"p/{n}"] for n in names})
    g = flat({n: record[f"g/{n}"] for n in names}, names)
    expected = g @ delta + 0.5 * delta @ dense_ggn(before, LOSS, x, y) @ delta
    torch.testing.assert_close(opt.last_stats["qmodel_change"], expected, rtol=1e-10, atol=1e-14)


def test_damping_rule_uses_the_new_loss_on_the_same_batch() -> None:
    model = make_mlp()
    opt = KFAC(
        model, 0.3, 1e-2, momentum=0.0, loss_fn=LOSS, adapt_damping=True, damping_adaptation_interval=1
    )
    x, y = make_data()
    one_step(opt, model, x, y)
    stats = opt.last_stats
    with torch.no_grad():
        new_loss = LOSS(model(x), y)
    torch.testing.assert_close(stats["new_loss"], new_loss)
    rho = (stats["new_loss"] - stats["loss"]) / stats["qmodel_change"]
    torch.testing.assert_close(stats["rho"], rho)
    omega = 0.99
    expected = 1e-2 * omega if rho > 0.75 else 1e-2 / omega if rho < 0.25 else 1e-2
    assert opt.damping.item() == pytest.approx(expected, rel=1e-12)


def test_closure_drives_the_same_batch_rule_without_touching_grads() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.3, 1e-2, adapt_damping=True, damping_adaptation_interval=1)
    x, y = make_data()
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = LOSS(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(calls) == 2
    assert opt.last_stats["rho"] is not None and torch.isfinite(opt.last_stats["rho"])


def test_rejected_step_restores_parameters_and_state_exactly() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, loss_fn=LOSS, reject_steps=True, momentum=0.9, damping_adaptation_interval=2)
    x, y = make_data()
    for _ in range(2):
        one_step(opt, model, x, y)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    damping = opt.damping.item()
    opt.learning_rate = 1e4  # a step that must overshoot
    one_step(opt, model, x, y)
    assert opt.last_stats["rejected"]
    assert opt.last_stats["damping"].item() == opt.damping.item()  # the raised damping
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for key, value in state["state"].items():
        assert after["state"][key].keys() == value.keys()
        assert all(torch.equal(v, after["state"][key][k]) for k, v in value.items()), key
    # The step does not count; the statistics of its batch, taken at the parameters the step
    # returns to, stay in the factors.
    assert (
        after["kfac"]["preconditioner"]["global"]["step"] == state["kfac"]["preconditioner"]["global"]["step"]
    )
    assert opt.damping.item() == pytest.approx(damping / 0.99**2)
    opt.learning_rate = 0.1
    one_step(opt, model, x, y)
    assert not opt.last_stats["rejected"]


def test_schedules_take_effect() -> None:
    model = make_mlp()
    opt = KFAC(
        model,
        lambda k: 0.1 if k < 2 else 0.0,
        1e-2,
        momentum=0.0,
        factor_update_steps=lambda k: 2,
        warmup_steps=0,
    )
    x, y = make_data()
    for k in range(4):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        recorded = opt.blocks["0"].has_pending("A")
        assert recorded == (k % 2 == 0)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert moved == (k < 2)
        assert opt.learning_rate == (0.1 if k < 2 else 0.0)


def test_damping_schedule_and_weight_decay_schedule() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, lambda k: 0.5 / (k + 1), weight_decay=lambda k: 0.01 * k)
    x, y = make_data()
    for k in range(3):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
        assert opt.damping.item() == pytest.approx(0.5 / (k + 1))
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01 * k)


def test_burn_in_accumulates_factors_only() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, burn_in_steps=3)
    x, y = make_data()
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))
    assert opt.blocks["0"].state["A_weight"].item() == pytest.approx(1 - 0.95**3)
    opt.zero_grad()
    LOSS(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))


def test_statistics_are_present_and_finite() -> None:
    model = make_mlp()
    opt = KFAC(
        model,
        damping=1e-2,
        loss_fn=LOSS,
        adaptive_learning_rate=True,
        adaptive_momentum=True,
        adapt_damping=True,
        damping_adaptation_interval=1,
        reject_steps=True,
    )
    x, y = make_data()
    for _ in range(3):
        one_step(opt, model, x, y)
    stats = opt.last_stats
    for key in (
        "loss",
        "new_loss",
        "rho",
        "damping",
        "learning_rate",
        "momentum",
        "qmodel_change",
        "grad_norm",
        "update_norm",
    ):
        assert torch.isfinite(torch.as_tensor(stats[key])).all(), key
    assert stats["rejected"] in (False, True) and not stats["skipped"]
    assert stats["new_loss"] < stats["loss"]


def test_adaptive_configuration_trains() -> None:
    """On features scaled from 0.1 to 10, the adaptive configuration ends at a fifth of the loss of the
    same configuration with the identity preconditioner (every module skipped: the exact quadratic
    model picks learning rate and momentum along the plain gradient); measured x0.045."""
    x, y = make_data()
    x = x * torch.logspace(-1, 1, x.shape[1])
    final = {}
    for skip in ((), ("0", "2")):
        model = make_mlp()
        opt = KFAC(
            model,
            damping=1e-1,
            loss_fn=LOSS,
            adaptive_learning_rate=True,
            adaptive_momentum=True,
            adapt_damping=True,
            damping_adaptation_interval=1,
            inverse_update_steps=1,
            skip_modules=skip,
        )
        losses = []
        for _ in range(30):
            one_step(opt, model, x, y)
            losses.append(opt.last_stats["loss"].item())
        final[skip] = losses[-1]
        assert losses[-1] < losses[0]
    assert final[()] < 0.2 * final["0", "2"], final


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adaptive_learning_rate": True}, "loss_fn"),
        ({"qmodel_curvature": "exact"}, "loss_fn"),
        ({"loss_fn": nn.CrossEntropyLoss(reduction="sum")}, "reduction"),
        ({"loss_fn": nn.L1Loss(), "qmodel_curvature": "exact"}, "not supported"),
        ({"qmodel_curvature": "dense"}, "qmodel_curvature"),
        ({"burn_in_steps": -1}, "burn_in_steps"),
        ({"damping_rho_thresholds": (0.8, 0.2)}, "damping_rho_thresholds"),
        ({"qmodel_batch_size": 0}, "qmodel_batch_size"),
        ({"qmodel_batch_size": 2.5}, "qmodel_batch_size"),
        ({"qmodel_batch_size": True}, "qmodel_batch_size"),
    ],
)
def test_invalid_adaptive_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KFAC(make_mlp(), 0.1, 1e-2, **kwargs)


def test_missing_batch_or_loss_is_a_clear_error() -> None:
    """Without a training pass through `loss_fn` to take them from (torch_kfac.last_batch)."""
    model = make_mlp()
    opt = KFAC(model, damping=1e-2, loss_fn=LOSS, adaptive_learning_rate=True)
    x, y = make_data()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with pytest.raises(ValueError, match="batch"):
        opt.step(loss=loss)
    with pytest.raises(ValueError, match="loss"):
        opt.step(batch=(x, y))
    assert math.isfinite(loss.item())


def test_a_scheduler_on_the_adaptive_learning_rate_warns_once() -> None:
    """The adaptive learning rate ignores the group's lr, so an attached scheduler has no effect: said
    once. With a fixed learning rate (which the scheduler drives) nothing is said."""
    x, y = make_data()
    for adaptive, expected in ((True, 1), (False, 0)):
        model = make_mlp()
        options = {"adaptive_learning_rate": True} if adaptive else {"lr": 0.1, "adaptive_momentum": True}
        opt = KFAC(model, damping=1e-2, loss_fn=LOSS, **options)  # type: ignore[arg-type]
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                one_step(opt, model, x, y)
                sched.step()
        said = [w for w in caught if "scheduler has no effect" in str(w.message)]
        assert len(said) == expected


# -------------------------------------------------------------- option effects (mutation-killers)
def _twin_steps(**options: object) -> tuple[dict[str, torch.Tensor], KFAC, dict[str, torch.Tensor], KFAC]:
    """The same first step on two copies of one model, with `options` given to the second only."""
    x, y = make_data()
    runs = []
    for extra in ({}, options):
        model = make_mlp()
        opt = KFAC(model, damping=0.1, loss_fn=LOSS, adaptive_learning_rate=True, **extra)  # type: ignore[arg-type]
        record = one_step(opt, model, x, y)
        runs += [{n: record[f"p/{n}"] - p.detach() for n, p in model.named_parameters()}, opt]
    return runs[0], runs[1], runs[2], runs[3]


def test_weight_decay_in_the_adaptive_learning_rate_path() -> None:
    """The chosen learning rate alpha also scales the decoupled weight decay: delta = alpha (v - wd theta)."""
    plain, plain_opt, decayed, decayed_opt = _twin_steps(weight_decay=0.1)
    alpha = decayed_opt.last_stats["learning_rate"]
    assert alpha > 0 and alpha == plain_opt.last_stats["learning_rate"]
    for name, p in make_mlp().named_parameters():
        # theta_old - theta_new grows by alpha wd theta_old.
        torch.testing.assert_close(
            decayed[name] - plain[name], alpha * 0.1 * p.detach(), rtol=1e-10, atol=1e-14
        )


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed_lr", "adaptive_lr"])
def test_include_damping_in_qmodel_change(adaptive: bool) -> None:
    """q(delta) gains 1/2 lambda |delta|^2 with the option, and 1/2 l2_reg |delta|^2 without it."""
    x, y = make_data()
    qs = {}
    for include in (False, True):
        model = make_mlp()
        options = {"adaptive_learning_rate": True} if adaptive else {"lr": 0.1}
        opt = KFAC(
            model,
            damping=0.3,
            l2_reg=0.01,
            loss_fn=LOSS,
            adapt_damping=True,
            include_damping_in_qmodel_change=include,
            **options,  # type: ignore[arg-type]
        )
        one_step(opt, model, x, y)
        qs[include] = (opt.last_stats["qmodel_change"], opt.last_stats["update_norm"])
    (q_without, norm), (q_with, norm_with) = qs[False], qs[True]
    assert torch.equal(norm, norm_with)  # the same step; only its model value differs
    torch.testing.assert_close(q_with - q_without, 0.5 * (0.3 - 0.01) * norm**2, rtol=1e-10, atol=1e-14)


def _damping_after_one_step(damping: float, lr: float, **options: object) -> KFAC:
    model = make_mlp()
    opt = KFAC(
        model,
        lr,
        damping,
        momentum=0.0,
        loss_fn=LOSS,
        adapt_damping=True,
        damping_adaptation_interval=1,
        damping_adaptation_decay=0.5,
        **{"norm_constraint": None, **options},  # type: ignore[arg-type]
    )
    one_step(opt, model, *make_data())
    return opt


def test_l2_reg_floors_the_adapted_damping() -> None:
    """A well-predicted step (rho > 3/4) lowers the damping by omega, but never below min_damping + l2_reg."""
    free = _damping_after_one_step(0.2, 1e-3)
    assert free.last_stats["rho"] > 0.75
    assert free.damping.item() == pytest.approx(0.2 * 0.5)
    floored = _damping_after_one_step(0.2, 1e-3, l2_reg=0.15, min_damping=0.01)
    assert floored.last_stats["rho"] > 0.75
    assert floored.damping.item() == pytest.approx(0.16, rel=1e-12)


def test_max_damping_bounds_the_adapted_damping() -> None:
    """A step that raises the loss (rho < 1/4) raises the damping by 1/omega, but never above max_damping."""
    free = _damping_after_one_step(0.2, 10.0)
    assert free.last_stats["rho"] < 0.25
    assert free.damping.item() == pytest.approx(0.2 / 0.5)
    bounded = _damping_after_one_step(0.2, 10.0, max_damping=0.3)
    assert bounded.last_stats["rho"] < 0.25
    assert bounded.damping.item() == pytest.approx(0.3, rel=1e-12)


def test_max_damping_bounds_the_damping_of_a_rejected_step() -> None:
    bounded = _damping_after_one_step(0.2, 10.0, max_damping=0.3, reject_steps=True)
    assert bounded.last_stats["rejected"]
    assert bounded.damping.item() == pytest.approx(0.3, rel=1e-12)


@pytest.mark.parametrize("where", ["gram", "direction"])
def test_a_quadratic_model_that_overflows_does_not_move_and_raises_the_damping(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-finite Gram matrix (a forward-mode pass that overflowed) or natural gradient (finite
    gradient and factors, an overflowed product): no error, parameters and momentum direction
    stay finite and unchanged, the damping rises; the next step trains again."""
    model = make_mlp()
    opt = KFAC(
        model,
        loss_fn=LOSS,
        damping=0.1,
        adaptive_learning_rate=True,
        adaptive_momentum=True,
        adapt_damping=True,
        damping_adaptation_interval=1,
    )
    x, y = make_data()
    one_step(opt, model, x, y)
    one_step(opt, model, x, y)
    if where == "gram":
        gram = opt._exact.gram
        monkeypatch.setattr(opt._exact, "gram", lambda *a: torch.full_like(gram(*a), math.inf))
    else:
        pre = opt.preconditioner
        precondition_all = pre.precondition_all
        monkeypatch.setattr(
            pre, "precondition_all", lambda mats: {n: m * math.inf for n, m in precondition_all(mats).items()}
        )
    damping = opt.damping.item()
    before = one_step(opt, model, x, y)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[f"p/{n}"]), n
        assert torch.equal(opt.state[p]["qmodel_delta"], torch.zeros_like(p)), n
    assert opt.last_stats["learning_rate"].item() == 0.0
    assert opt.last_stats["qmodel_change"].item() == math.inf
    assert opt.damping.item() == pytest.approx(damping / opt.options.omega, rel=1e-12)
    monkeypatch.undo()
    before = one_step(opt, model, x, y)
    assert opt.last_stats["learning_rate"].item() > 0.0
    assert all(
        torch.isfinite(p).all() and not torch.equal(p, before[f"p/{n}"]) for n, p in model.named_parameters()
    )


def test_a_fixed_step_that_overshoots_the_model_raises_the_damping() -> None:
    """A linear model with a squared error is exactly quadratic, so rho = 1 for every step. With a
    learning rate past twice the model's best, the model predicts a rise (q > 0) and the loss rises
    as predicted: the damping goes up, where rho = 1 > 3/4 alone would have lowered it."""
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(4, 2), nn.MSELoss()
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    opt = KFAC(
        model,
        lr=5.0,
        damping=1e-3,
        momentum=0.0,
        norm_constraint=None,
        adapt_damping=True,
        damping_adaptation_interval=1,
        qmodel_curvature="exact",
        loss_fn=loss_fn,
    )
    for overshoot in (True, False):  # the second step, from the overshoot, is predicted to gain
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        before = opt.damping.item()
        opt.step(loss=loss, batch=(x, y))
        stats = opt.last_stats
        assert stats["rho"].item() == pytest.approx(1.0, rel=1e-9)
        assert (stats["qmodel_change"].item() > 0) is overshoot
        assert (stats["new_loss"].item() > loss.item()) is overshoot
        omega = opt.options.omega
        assert opt.damping.item() == pytest.approx(before / omega if overshoot else before * omega, rel=1e-12)


def test_damping_is_adapted_every_interval_steps() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.3, 1e-2, loss_fn=LOSS, adapt_damping=True, damping_adaptation_interval=2)
    x, y = make_data()
    adapted = []
    for _ in range(5):
        one_step(opt, model, x, y)
        adapted.append(opt.last_stats["qmodel_change"] is not None)
    assert adapted == [True, False, True, False, True]


@pytest.mark.parametrize(
    ("options", "with_batch"),
    [
        ({"adapt_damping": True, "damping_adaptation_interval": 1}, False),
        ({"adapt_damping": True, "damping_adaptation_interval": 1, "qmodel_curvature": "exact"}, True),
        ({"adaptive_learning_rate": True, "adaptive_momentum": True}, True),
    ],
    ids=["loss_pairing", "exact_q", "adaptive_lr"],
)
def test_mean_and_sum_reductions_take_the_same_adaptive_steps(options: dict, with_batch: bool) -> None:
    """The damping rule and the quadratic model see the mean loss's scale whatever the reduction."""
    runs = {}
    for reduction in ("mean", "sum"):
        model = make_mlp()
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        lr = None if options.get("adaptive_learning_rate") else 0.3
        opt = KFAC(model, lr, 1e-2, loss_fn=loss_fn, reduction=reduction, **options)
        for seed in range(3):
            x, y = make_data(seed=seed)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step(loss=loss, batch=(x, y) if with_batch else None)
        runs[reduction] = (model, opt)
    (mean, mean_opt), (summed, sum_opt) = runs["mean"], runs["sum"]
    for p, q in zip(mean.parameters(), summed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sum_opt.damping, mean_opt.damping, rtol=1e-12, atol=0)
    if "adapt_damping" in options:
        assert mean_opt.last_stats["rho"] is not None
        torch.testing.assert_close(sum_opt.last_stats["rho"], mean_opt.last_stats["rho"], rtol=1e-9, atol=0)


def test_parameters_outside_any_block_move_along_minus_the_gradient_in_the_quadratic_model() -> None:
    """The first adaptive step is alpha v1, v1 = -F^-1 g in the blocks and -g elsewhere."""
    model = _Scaled()
    opt = KFAC(model, damping=1e-2, loss_fn=LOSS, adaptive_learning_rate=True)
    x, y = make_data()
    record = one_step(opt, model, x, y)
    alpha = opt.last_stats["learning_rate"]
    assert alpha.item() > 0
    torch.testing.assert_close(
        model.scale - record["p/scale"], -alpha * record["g/scale"], rtol=1e-12, atol=1e-15
    )
