"""Loss scaling (torch.amp.GradScaler), autocast and 16-bit parameters: factors stay those of the
unscaled loss, in float32 (or the `factor_dtype` asked for); updates in the parameters' dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.conftest import AttentionLSTM, make_data
from torch_kfac import KFAC, KFACPreconditioner, presets
from torch_kfac.qmodel import ExactCurvature, dot

SCALE = 2.0**12


def mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    return [(x.float(), y) for x, y in (make_data(seed=s) for s in range(1, steps + 1))]


def factors(pre: KFACPreconditioner) -> dict[str, Tensor]:
    return {
        f"{n}.{k}": v.clone() for n, b in pre.blocks.items() for k, v in b.state.items() if k.endswith("_ema")
    }


def params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def kfac(model: nn.Module, **options: object) -> KFAC:
    return KFAC(
        model, lr=0.1, damping=1e-2, momentum=0.5, factor_update_steps=1, inverse_update_steps=1, **options
    )


def train_unscaled(steps: int) -> tuple[KFAC, nn.Module]:
    model = mlp()
    opt = kfac(model)
    for x, y in batches(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt, model


def test_grad_scaler_steps_equal_the_unscaled_steps_and_a_skipped_step_changes_nothing() -> None:
    """Loss scale 2^12 (exact in binary): the same factors and parameters as without scaling; a
    step with an inf gradient is skipped by the scaler and leaves factors and counters alone."""
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opt = kfac(model, grad_scaler=scaler)
    data = batches(4)
    for i, (x, y) in enumerate([*data[:2], data[1], *data[2:]]):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if i == 2:  # an overflow: the scaler skips this step
            model[0].weight.grad[0, 0] = float("inf")
            before, steps = factors(opt.preconditioner), opt.preconditioner.steps
        scaler.step(opt)
        scaler.update()
        if i == 2:
            assert opt.last_stats["skipped"] and opt.preconditioner.steps == steps
            torch.testing.assert_close(factors(opt.preconditioner), before, rtol=0, atol=0)
            assert scaler.get_scale() == SCALE / 2
    reference, ref_model = train_unscaled(4)
    assert opt.preconditioner.steps == reference.preconditioner.steps == 4
    torch.testing.assert_close(
        factors(opt.preconditioner), factors(reference.preconditioner), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(params(model), params(ref_model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_a_grad_scaler_leaves_the_factors_of_the_own_fisher_pass_alone(fisher_type: str) -> None:
    """The MC and type-2 Fisher's statistics come from the optimizer's own backward passes, which no
    loss scale multiplies: under a GradScaler their factors are those of the unscaled run (they were
    divided by the scale squared, 2^24 here)."""

    def train(scaled: bool) -> tuple[KFAC, nn.Module]:
        model, loss_fn = mlp(), nn.CrossEntropyLoss()
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        options = {"loss_fn": loss_fn, "fisher_type": fisher_type, "mc_seed": 3}
        opt = kfac(model, **options, **({"grad_scaler": scaler} if scaled else {}))
        for x, y in batches(3):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt, batch=(x, y))
                scaler.update()
            else:
                loss.backward()
                opt.step(batch=(x, y))
        return opt, model

    (scaled, model), (reference, ref_model) = train(True), train(False)
    torch.testing.assert_close(
        factors(scaled.preconditioner), factors(reference.preconditioner), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(params(model), params(ref_model), rtol=1e-5, atol=1e-6)


def test_the_preset_under_a_grad_scaler_takes_the_unscaled_steps() -> None:
    """presets.adaptive with a GradScaler, stepped by scaler.step(opt) alone (the loss and batch of
    the pass, torch_kfac.last_batch): the unscaled loop's steps, learning rates and damping."""

    def train(scaled: bool) -> tuple[KFAC, nn.Module]:
        model, loss_fn = mlp(), nn.CrossEntropyLoss()
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        opt = presets.adaptive(model, loss_fn, **({"grad_scaler": scaler} if scaled else {}))
        for i, (x, y) in enumerate(batches(5)):
            torch.manual_seed(i)  # the MC Fisher's labels
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step(loss=loss, batch=(x, y))
        return opt, model

    (scaled, model), (reference, ref_model) = train(True), train(False)
    assert scaled.preconditioner.steps == 5
    for key in ("learning_rate", "momentum", "damping"):
        torch.testing.assert_close(scaled.last_stats[key], reference.last_stats[key], rtol=1e-4, atol=0)
    torch.testing.assert_close(params(model), params(ref_model), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", ["preset", "fixed", "mc", "ekfac", "preconditioner"])
def test_a_step_inside_an_autocast_region_is_the_step_outside_it(config: str) -> None:
    """Lightning's manual optimization steps inside the training step's autocast, and so may a
    plain loop: the step's own arithmetic and passes run with autocast off, so its parameters equal
    those of the step called after the region, bit for bit (inside it, the preset's quadratic model
    raised a dtype error, and the preconditioning ran in bfloat16)."""

    def train(inside: bool) -> list[Tensor]:
        torch.manual_seed(0)
        model, loss_fn = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 3)), nn.CrossEntropyLoss()
        every = {"factor_update_steps": 1, "inverse_update_steps": 1}
        sgd = None
        if config == "preset":
            opt = presets.adaptive(model, loss_fn)
        elif config == "preconditioner":
            opt = KFACPreconditioner(model, damping=1e-2, **every)
            sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        else:
            options = {"mc": {"loss_fn": loss_fn, "fisher_type": "mc"}, "ekfac": {"approximation": "ekfac"}}
            opt = kfac(model, **options.get(config, {}))
        for i, (x, y) in enumerate(batches(4)):
            torch.manual_seed(i)
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
                loss.backward()
                if inside:
                    opt.step()
                    if sgd is not None:
                        sgd.step()
            if not inside:
                opt.step()
                if sgd is not None:
                    sgd.step()
        return list(params(model).values())

    assert all(torch.equal(p, q) for p, q in zip(train(True), train(False), strict=True))


def test_a_float16_model_under_the_default_grad_scaler_takes_the_unscaled_steps() -> None:
    """The default loss scale, 2^16, is inf in float16: the gradients are unscaled in float32, so
    the steps are those of the unscaled loss (with the scale cast to float16 nothing moved)."""

    def run(scaled: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        model = mlp(torch.float16)
        scaler = torch.amp.GradScaler("cpu")
        assert scaler.get_scale() == 2.0**16
        opt = kfac(model, grad_scaler=scaler if scaled else None)
        start = params(model)
        for x, y in batches(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(x.half()).float(), y)  # a float32 loss: 2^16 times it fits
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                assert not opt.last_stats["skipped"]
            else:
                loss.backward()
                opt.step()
        return start, params(model)

    (start, scaled), (_, unscaled) = run(True), run(False)
    assert all((scaled[n] - start[n]).abs().max() > 1e-2 for n in start)
    torch.testing.assert_close(scaled, unscaled, rtol=1e-2, atol=1e-3)


def test_grad_scaler_in_front_of_another_optimizer() -> None:
    """scaler.unscale_(opt) before pre.step(): the preconditioned gradients are the unscaled run's."""
    results = []
    for scaled in (False, True):
        model = mlp()
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, enabled=scaled)
        pre = KFACPreconditioner(model, factor_update_steps=1, inverse_update_steps=1, grad_scaler=scaler)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in batches(3):
            sgd.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(sgd)
            pre.step()
            scaler.step(sgd)
            scaler.update()
        results.append(
            (factors(pre), params(model), {n: p.grad.clone() for n, p in model.named_parameters()})
        )
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_grad_scaler_needs_the_option() -> None:
    model = mlp()
    opt = kfac(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = batches(1)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError) as info:
        scaler.step(opt)
    assert str(info.value) == (
        "KFAC is stepped by a GradScaler: pass grad_scaler=scaler to KFAC, so that the recorded layer "
        "statistics are unscaled too"
    )


def test_grad_scaler_unscales_the_gradients_of_the_step() -> None:
    """Without the norm constraint (which would clip a loss-scaled step to the same size) the
    scaled step's change is the unscaled step's."""
    x, y = batches(1)[0]
    changes = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=SCALE)):
        model = mlp()
        opt = kfac(model, grad_scaler=scaler, norm_constraint=None)
        before = params(model)
        loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
        changes.append({n: p - before[n] for n, p in params(model).items()})
    torch.testing.assert_close(changes[1], changes[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_factors_are_float32_and_close_to_the_float32_run(dtype: torch.dtype) -> None:
    def run(autocast: bool) -> tuple[KFAC, nn.Module]:
        model = mlp()
        opt = kfac(model)
        for x, y in batches(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return opt, model

    (opt, model), (reference, ref_model) = run(True), run(False)
    got, expected = factors(opt.preconditioner), factors(reference.preconditioner)
    assert all(v.dtype == torch.float32 for v in got.values())
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0.05, atol=0.01 * value.abs().max().item())
    torch.testing.assert_close(params(model), params(ref_model), rtol=0.05, atol=0.01)


def train_16_bit(model: nn.Module, opt: KFAC, dtype: torch.dtype, with_batch: bool) -> list[float]:
    """15 steps on one batch cast to `dtype` (with the loss and the batch for the preset); the losses."""
    x, y = batches(1)[0]
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x.to(dtype)), y)
        loss.backward()
        if with_batch:
            opt.step(loss=loss, batch=(x.to(dtype), y))
        else:
            opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_trains_with_float32_factors(dtype: torch.dtype) -> None:
    model = mlp(dtype)
    opt = kfac(model)
    losses = train_16_bit(model, opt, dtype, with_batch=False)
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.dtype == dtype for p in model.parameters())
    # The natural gradients come back in the gradients' dtype: so do the momentum buffers.
    buffers = [s["momentum_buffer"] for s in opt.state.values() if "momentum_buffer" in s]
    assert len(buffers) == 2 and {b.dtype for b in buffers} == {dtype}
    state = opt.preconditioner.blocks["0"].state
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    assert opt.damping.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_preset_trains_a_16_bit_model(dtype: torch.dtype) -> None:
    """presets.adaptive on a 16-bit model: the calibration's curvature, the quadratic model's products
    and its inner products run in float32 (pinv has no 16-bit kernel), the step stays 16-bit."""
    model = mlp(dtype)
    opt = presets.adaptive(model, nn.CrossEntropyLoss())
    losses = train_16_bit(model, opt, dtype, with_batch=True)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == dtype for p in model.parameters())
    assert {v.dtype for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)} == {dtype}
    assert opt.damping.dtype == torch.float32 and torch.isfinite(opt.last_stats["learning_rate"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_quadratic_model_of_a_16_bit_model_is_reduced_in_float32(dtype: torch.dtype) -> None:
    """Its Gram matrix and inner products come back in float32, close to those of the same weights
    in float64 (the 16-bit forward-mode pass rounds, the sums do not lose the small terms)."""
    low, exact = mlp(dtype), mlp(dtype).double()
    x, y = batches(1)[0]
    directions = [{n: torch.randn(p.shape).to(dtype) for n, p in low.named_parameters()} for _ in range(2)]
    gram = ExactCurvature(low, nn.CrossEntropyLoss()).gram(x.to(dtype), y, directions)
    wide = [{n: v.double() for n, v in d.items()} for d in directions]
    reference = ExactCurvature(exact, nn.CrossEntropyLoss()).gram(x.double(), y, wide)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram.double(), reference, rtol=0.05, atol=0.02 * reference.abs().max().item())
    inner = dot(directions[0], directions[1])
    assert inner.dtype == torch.float32
    torch.testing.assert_close(inner.double(), dot(wide[0], wide[1]), rtol=1e-6, atol=1e-6)


def test_factor_dtype_option() -> None:
    model = mlp()
    opt = kfac(model, factor_dtype=torch.float64)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.preconditioner.blocks["2"].state
    assert {v.dtype for v in state.values()} == {torch.float64}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for bad in (torch.float16, "float32"):
        with pytest.raises(ValueError, match="factor_dtype"):
            kfac(mlp(), factor_dtype=bad)
    with pytest.raises(ValueError, match="grad_scaler"):
        kfac(mlp(), grad_scaler=object())


def test_grad_scaler_unscales_the_statistics_of_attention_and_recurrent_blocks() -> None:
    runs = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = AttentionLSTM()
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, enabled=scaled)
        opt = kfac(model, grad_scaler=scaler)
        for x, y in batches(2):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        runs.append(factors(opt.preconditioner))
    assert any(k.startswith("attention.G") for k in runs[0]) and any(k.startswith("lstm.G") for k in runs[0])
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=0)
