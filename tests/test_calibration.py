"""damping='auto': the curvature along the gradient against dense float64 references, and the
first step's search for the smallest damping whose step the quadratic model predicts."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import torch_kfac.optimizer as optimizer_module
from tests.conftest import make_data, make_mlp
from torch_kfac import KFAC, presets
from torch_kfac.calibration import (
    ACCEPTED_RHO,
    AUTO_DAMPING_FRACTION,
    SEARCH_RANGE,
    curvature_along,
    initial_damping,
    search_damping,
)
from torch_kfac.options import FALLBACK_DAMPING

pytestmark = pytest.mark.usefixtures("float64")


def _stepped() -> tuple[KFAC, dict[str, torch.Tensor]]:
    """A KFAC after one step (factors in place) and random gradient matrices of its blocks."""
    model = make_mlp()
    opt = KFAC(model, lr=0.1, damping=1.0, inverse_update_steps=1)
    x, y = make_data()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return opt, {n: torch.randn_like(b.grad_matrix()) for n, b in opt.blocks.items()}


def test_curvature_along_is_the_rayleigh_quotient_of_the_dense_block_curvature() -> None:
    opt, mats = _stepped()
    quad, norm = 0.0, 0.0
    for name, block in opt.blocks.items():
        vec = mats[name].mT.reshape(-1)  # column stacking, the layout of dense_curvature
        quad += vec @ block.dense_curvature() @ vec
        norm += vec @ vec
    torch.testing.assert_close(curvature_along(opt.blocks, mats), quad / norm, rtol=1e-12, atol=0)
    expected = float(quad / norm) * AUTO_DAMPING_FRACTION
    assert initial_damping(opt.blocks, mats) == pytest.approx(expected, rel=1e-12)


def test_without_factors_the_fallback_damping_is_used() -> None:
    model = make_mlp()
    opt = KFAC(model, lr=0.1)
    assert curvature_along(opt.blocks, {}) is None
    assert initial_damping(opt.blocks, {}) == FALLBACK_DAMPING


def test_a_block_without_factors_is_left_out_and_the_others_still_count() -> None:
    opt, mats = _stepped()
    first, second = opt.blocks.values()
    expected = curvature_along({"2": second}, {"2": mats["2"]})
    first.state.clear()  # the first block has no factors (yet)
    torch.testing.assert_close(curvature_along(opt.blocks, mats), expected, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, 1e200], ids=["zero", "overflow"])
def test_a_zero_or_overflowing_curvature_falls_back(scale: float) -> None:
    """r = 0 (zero factors) or r = inf (factors so large that g^T K g overflows): neither is a damping."""
    opt, mats = _stepped()
    for block in opt.blocks.values():
        for key in ("A_ema", "G_ema"):
            block.state[key] = torch.eye(block.state[key].shape[-1]) * scale
    r = curvature_along(opt.blocks, mats)
    assert r is not None and float(r) == (0.0 if scale == 0.0 else math.inf)
    assert initial_damping(opt.blocks, mats) == FALLBACK_DAMPING


def test_auto_damping_is_set_at_the_first_step_and_the_inverses_use_it() -> None:
    model = make_mlp()
    opt = KFAC(model, lr=0.1, damping="auto", inverse_update_steps=100, warmup_steps=0, norm_constraint=None)
    x, y = make_data()
    nn.functional.cross_entropy(model(x), y).backward()
    mats = {n: b.grad_matrix().clone() for n, b in opt.blocks.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    expected = initial_damping(opt.blocks, mats)
    assert expected != FALLBACK_DAMPING
    assert opt.damping.item() == pytest.approx(expected, rel=1e-12)
    # The step was preconditioned with the calibrated damping, not the placeholder.
    for name, block in opt.blocks.items():
        natural = block.precondition(mats[name], opt.damping, True)
        weight, bias = block.from_matrix(natural)
        torch.testing.assert_close(params[f"{name}.weight"] - 0.1 * weight, model.get_submodule(name).weight)
        torch.testing.assert_close(params[f"{name}.bias"] - 0.1 * bias, model.get_submodule(name).bias)
    assert grads  # gradients were present
    # Later steps keep the damping (no recalibration).
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.damping.item() == pytest.approx(expected, rel=1e-12)


def test_bad_damping_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="damping"):
        KFAC(make_mlp(), lr=0.1, damping="automatic")


def rho_curve(threshold: float, tried: list[float]) -> Callable[[float], float]:
    """A rho rising with the damping, equal to `ACCEPTED_RHO` at `threshold`; records the trials."""

    def rho_at(damping: float) -> float:
        tried.append(damping)
        return ACCEPTED_RHO * 2 * damping / (damping + threshold)

    return rho_at


# A trial is accepted at and above the threshold. 2e-3 and 0.2 take the refining trial sqrt(10)
# below the accepted power of 10 (descending and ascending); 1e3 lies above the search's range.
@pytest.mark.parametrize("threshold", [3e-6, 2e-3, 1e-2, 0.05, 0.2, 0.7, 40.0, 1e3])
def test_search_finds_the_smallest_accepted_damping_to_a_factor_of_sqrt10(threshold: float) -> None:
    tried: list[float] = []
    start = 0.01  # r = 0.1: trials within [1e-3, 100]
    found = search_damping(start, rho_curve(threshold, tried))
    low, high = (start / AUTO_DAMPING_FRACTION * bound for bound in SEARCH_RANGE)
    assert tried[0] == start and len(tried) <= 7
    assert all(low * (1 - 1e-9) <= d <= high * (1 + 1e-9) for d in tried)
    if threshold < low:
        assert found == pytest.approx(low)  # every trial accepted: the range's floor
    elif threshold > high:
        assert found == pytest.approx(high)  # none accepted: the largest trial
    else:
        assert threshold <= found < threshold * math.sqrt(10) * (1 + 1e-9)


def test_a_trial_at_exactly_the_accepted_rho_is_accepted() -> None:
    tried: list[float] = []
    found = search_damping(0.01, lambda d: tried.append(d) or (ACCEPTED_RHO if d >= 0.1 else 0.0))
    assert found == pytest.approx(0.1)
    assert tried == pytest.approx([0.01, 0.1, 0.1 / math.sqrt(10)])


def test_non_finite_rho_is_a_rejected_trial() -> None:
    tried: list[float] = []
    found = search_damping(0.01, lambda d: tried.append(d) or (math.nan if d < 1.0 else 0.5))
    assert found == pytest.approx(1.0)
    assert tried == pytest.approx([0.01, 0.1, 1.0, 1.0 / math.sqrt(10)])


def test_a_trial_whose_quadratic_model_cannot_be_evaluated_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Trials whose Gram matrix is not finite (below a damping d0 here) are not accepted: the search
    settles at or above d0, without an error, and the first step then moves the parameters."""
    x, y = make_data(64)

    def first_step(d0: float) -> tuple[KFAC, list[torch.Tensor]]:
        opt = presets.adaptive(make_mlp(), nn.CrossEntropyLoss(), fisher_type="type-2")
        gram = opt._exact.gram

        def overflowing(*args: object) -> torch.Tensor:
            value = gram(*args)
            return torch.full_like(value, math.nan) if opt.damping.item() < d0 else value

        monkeypatch.setattr(opt._exact, "gram", overflowing)
        params = [p.detach().clone() for p in opt.model.parameters()]
        loss = nn.functional.cross_entropy(opt.model(x), y)
        loss.backward()
        opt.step(loss=loss, batch=(x, y))
        return opt, params

    free, _ = first_step(0.0)
    d0 = 30 * free.preconditioner.calibrated_damping
    opt, params = first_step(d0)
    assert opt.preconditioner.calibrated_damping >= d0
    assert opt.last_stats["learning_rate"].item() > 0
    for p, q in zip(params, opt.model.parameters(), strict=True):
        assert torch.isfinite(q).all() and not torch.equal(p, q)


def test_with_the_batch_the_first_step_takes_the_searched_damping() -> None:
    """The chosen damping's first step has rho >= 1/4; the next trial below it has rho < 1/4."""
    x, y = make_data(64)
    overrides = {"fisher_type": "type-2", "adapt_damping": False}  # deterministic; damping kept

    def confident_mlp() -> nn.Module:
        """Confidently wrong at the start (large logits, as the tied transformer): small dampings
        take steps the quadratic model overpredicts, so the search stops inside its range."""
        model = make_mlp()
        with torch.no_grad():
            model[2].weight.mul_(10.0)
        return model

    opt = presets.adaptive(confident_mlp(), nn.CrossEntropyLoss(), **overrides)
    nn.functional.cross_entropy(opt.model(x), y).backward()
    loss = nn.functional.cross_entropy(opt.model(x), y)
    params = [p.detach().clone() for p in opt.model.parameters()]
    opt.step(loss=loss, batch=(x, y))
    chosen = opt.preconditioner.calibrated_damping
    assert chosen is not None and opt.damping.item() == pytest.approx(chosen, rel=1e-12)
    # The step taken is the first step of a fixed-damping run at the chosen value, and so is its rho.
    fixed = presets.adaptive(confident_mlp(), nn.CrossEntropyLoss(), damping=chosen, **overrides)
    nn.functional.cross_entropy(fixed.model(x), y).backward()
    fixed.step(loss=loss, batch=(x, y))
    for p, q in zip(opt.model.parameters(), fixed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(p, q) for p, q in zip(params, opt.model.parameters(), strict=True))
    rho = (nn.functional.cross_entropy(opt.model(x), y) - loss) / opt.last_stats["qmodel_change"]
    assert rho.item() >= ACCEPTED_RHO
    below = presets.adaptive(
        confident_mlp(), nn.CrossEntropyLoss(), damping=chosen / math.sqrt(10), **overrides
    )
    nn.functional.cross_entropy(below.model(x), y).backward()
    below.step(loss=loss, batch=(x, y))
    rho_below = (nn.functional.cross_entropy(below.model(x), y) - loss) / below.last_stats["qmodel_change"]
    assert rho_below.item() < ACCEPTED_RHO


@pytest.mark.parametrize("evaluation", ["batch", "closure"])
def test_each_search_trial_is_the_first_step_at_its_damping_and_is_undone(
    monkeypatch: pytest.MonkeyPatch, evaluation: str
) -> None:
    """The search's rho_at(d) is the rho of the step a run with the fixed damping d takes (its
    inverses refreshed at d, the losses on the mean loss's scale with reduction='sum', the loss
    after the step from the batch or the closure), each trial is undone, the step taken is the one at
    the damping the search returns, and only the first step after burn-in searches. The search
    itself is replaced by a spy (two trials, returns the larger)."""
    x, y = make_data(32)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    options: dict[str, object] = {
        "lr": 0.3,
        "momentum": 0.9,
        "reduction": "sum",
        "loss_fn": loss_fn,
        "norm_constraint": None,
        "burn_in_steps": 1,
        "warmup_steps": 0,
    }
    if evaluation == "batch":
        options["qmodel_curvature"] = "exact"

    def step(model: nn.Module, opt: KFAC) -> None:
        def closure(backward: bool = True) -> torch.Tensor:
            if backward:
                opt.zero_grad()
            loss = loss_fn(model(x), y)
            if backward:
                loss.backward()
            return loss

        if evaluation == "closure":
            opt.step(closure)
        else:
            opt.step(loss=closure(), batch=(x, y))

    def fixed_run(damping: float, **extra: object) -> tuple[nn.Module, KFAC]:
        """Burn-in and the first step at a fixed damping, inverses refreshed in that step."""
        model = make_mlp()
        opt = KFAC(model, damping=damping, inverse_update_steps=1, **options, **extra)  # type: ignore[arg-type]
        for _ in range(2):
            step(model, opt)
        return model, opt

    def first_step_rho(damping: float) -> float:
        """(L(theta + delta) - L(theta)) / q(delta), mean losses, of a fixed run's first step (burn-in
        leaves theta at the initial parameters)."""
        model, opt = fixed_run(damping, adapt_damping=True, damping_adaptation_interval=1)
        with torch.no_grad():
            change = nn.functional.cross_entropy(model(x), y) - nn.functional.cross_entropy(make_mlp()(x), y)
        return float(change / opt.last_stats["qmodel_change"])

    calls: list[tuple[float, dict[float, float]]] = []

    def spy(start: float, rho_at: Callable[[float], float]) -> float:
        calls.append((start, {d: rho_at(d) for d in (start, 10 * start)}))
        return 10 * start

    monkeypatch.setattr(optimizer_module, "search_damping", spy)
    model = make_mlp()
    # Inverses not due at the search's step: each trial must refresh them at its damping.
    opt = KFAC(model, damping="auto", inverse_update_steps=2, **options)  # type: ignore[arg-type]
    step(model, opt)
    assert calls == []  # burn-in: no step taken, nothing searched
    step(model, opt)
    assert len(calls) == 1
    start, trials = calls[0]
    assert start > 0
    for damping, rho in trials.items():
        assert rho == pytest.approx(first_step_rho(damping), rel=1e-9, abs=1e-12)
    assert opt.damping.item() == pytest.approx(10 * start, rel=1e-12)
    reference, _ = fixed_run(10 * start)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    step(model, opt)
    assert len(calls) == 1


@pytest.mark.parametrize("chosen", ["last", "first"])
def test_the_step_takes_the_chosen_trial_without_computing_it_again(
    monkeypatch: pytest.MonkeyPatch, chosen: str
) -> None:
    """Step 0 refreshes the inverses once at the calibrated start (not before at the placeholder
    damping), the first trial uses them, and when the search chooses its last trial, that trial's
    inverses and change are the step's: no further refresh or change is computed. A damping tried
    earlier is refreshed and computed once more. The step equals a fixed-damping run's first step
    (and its state too: the second steps agree)."""
    x, y = make_data(64)
    overrides = {"fisher_type": "type-2", "warmup_steps": 0}
    counts = {"change": 0, "refresh": 0}

    def spy(start: float, rho_at: Callable[[float], float]) -> float:
        for d in (start, 10 * start):
            rho_at(d)
        return 10 * start if chosen == "last" else start

    def run(damping: object, count: bool) -> tuple[KFAC, float]:
        opt = presets.adaptive(make_mlp(), nn.CrossEntropyLoss(), damping=damping, **overrides)
        if count:
            change, refresh = opt._change, opt.preconditioner._refresh_inverses

            def counted_change(*args: object) -> object:
                counts["change"] += 1
                return change(*args)  # type: ignore[arg-type]

            def counted_refresh(*args: object, **kwargs: object) -> object:
                counts["refresh"] += 1
                return refresh(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(opt, "_change", counted_change)
            monkeypatch.setattr(opt.preconditioner, "_refresh_inverses", counted_refresh)
        for _ in range(2):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(opt.model(x), y)
            loss.backward()
            opt.step(loss=loss, batch=(x, y))
            if count and opt.preconditioner.steps == 1:
                first = dict(counts)
        return opt, first if count else {}

    monkeypatch.setattr(optimizer_module, "search_damping", spy)
    opt, first = run("auto", count=True)
    extra = 0 if chosen == "last" else 1
    assert first == {"change": 2 + extra, "refresh": 2 + extra}
    fixed, _ = run(opt.preconditioner.calibrated_damping, count=False)
    for p, q in zip(opt.model.parameters(), fixed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
