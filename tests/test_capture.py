"""When statistics are recorded: due steps, the original track_forward/track_backward loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import AttentionLSTM, make_data, make_mlp
from tests.reference import identity_preconditioned_loss
from torch_kfac import KFAC, LinearBlock
from torch_kfac.capture import StatisticsCapture

pytestmark = pytest.mark.usefixtures("float64")


def expected_g(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """G of the output layer for cross-entropy on `labels`: mean of (softmax - onehot) outer products."""
    with torch.no_grad():
        logits = model(x)
    err = logits.softmax(-1) - F.one_hot(labels, logits.shape[-1])
    return err.T @ err / x.shape[0]


def test_statistics_recorded_only_on_factor_update_steps() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.05, 1e-2, factor_update_steps=3, warmup_steps=0, cov_ema_decay=0.5)
    x, y = make_data()
    changed = []
    previous = None
    for step in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        recorded = opt.blocks["0"].has_pending("A") and opt.blocks["0"].has_pending("G")
        assert recorded == (step % 3 == 0)
        opt.step()
        current = opt.blocks["0"].A.clone()
        changed.append(previous is None or not torch.equal(previous, current))
        previous = current
    assert changed == [True, False, False, True, False, False, True]


def test_no_grad_forward_records_nothing() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.05, 1e-2)
    with torch.no_grad():
        model(make_data()[0])
    assert not any(b.has_pending("A") for b in opt.blocks.values())


def test_explicit_mode_records_layer_inputs_only_inside_track_forward() -> None:
    """Once one tracking context has been used (here track_backward(), never track_forward()),
    forward passes outside track_forward() record no layer inputs; inside, they do."""
    model = make_mlp()
    opt = KFAC(model, 0.05, 1e-2)
    x = make_data()[0]
    with opt.track_backward():
        pass
    model(x)
    assert not any(b.has_pending("A") for b in opt.blocks.values())
    with opt.track_forward():
        model(x)
    assert all(b.has_pending("A") for b in opt.blocks.values())


def test_original_data_label_loop_with_tracking_contexts() -> None:
    model = make_mlp()
    # The preconditioner alone against the identity: no norm constraint.
    options = {
        "adapt_damping": True,
        "damping_adaptation_interval": 1,
        "momentum": 0.5,
        "norm_constraint": None,
    }
    opt = KFAC(model, 0.2, 1e-2, **options)
    x, y = make_data()
    losses = []
    for _ in range(30):
        model.zero_grad()
        with opt.track_forward():
            loss = F.cross_entropy(model(x), y)
        with opt.track_backward():
            loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
    # The identity preconditioner (momentum SGD, same lr and momentum) ends 75x higher (measured).
    plain = identity_preconditioned_loss(make_mlp(), lambda m: F.cross_entropy(m(x), y), 30, 0.2, 0.5)
    assert losses[-1] < 0.1 * plain, (losses[-1], plain)
    assert opt.damping.item() != pytest.approx(1e-2)
    # Outside the contexts nothing is recorded any more.
    before = opt.blocks["2"].A.clone()
    model.zero_grad()
    x2, y2 = make_data(seed=9)
    loss = F.cross_entropy(model(x2), y2)
    loss.backward()
    assert not opt.blocks["2"].has_pending("A")
    opt.step(loss=loss)
    assert torch.equal(before, opt.blocks["2"].A)


def test_original_manual_loop_with_sampled_labels() -> None:
    """update_cov_manually=True: factors come from the sampled-label pass only."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, update_cov_manually=True, cov_ema_decay=0.0, momentum=0.0)
    x, y = make_data()
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        model.zero_grad()
        with opt.track_forward():
            out = model(x)
            sampled = torch.multinomial(torch.softmax(out.detach(), 1), 1, generator=gen).reshape(-1)
            loss = F.cross_entropy(out, sampled)
        with opt.track_backward():
            loss.backward()
        opt.update_cov()
        g_sampled = expected_g(model, x, sampled)
        model.zero_grad()
        with opt.track_forward():
            loss = F.cross_entropy(model(x), y)
        with opt.track_backward():
            loss.backward()
        torch.testing.assert_close(opt.blocks["2"].G, g_sampled, rtol=1e-12, atol=1e-14)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(loss=loss)
        # step() folds nothing in manual mode: the factors are still those of the sampled pass.
        torch.testing.assert_close(opt.blocks["2"].G, g_sampled, rtol=1e-12, atol=1e-14)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), step


def test_inplace_activation_after_conv_and_linear() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 5 * 5, 4),
        torch.nn.ReLU(inplace=True),
        torch.nn.Linear(4, 2),
    )
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 2, (6,))
    h = torch.relu(model[3](torch.relu(model[0](x)).flatten(1)))
    out = model[5](h.detach().requires_grad_())
    (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), out)
    opt = KFAC(model, 0.1, 1e-2)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(opt.blocks["5"].G, g.T @ g / 6, rtol=1e-12, atol=1e-14)
    assert opt.blocks["0"].has_factors() and opt.blocks["3"].has_factors()


def test_tracked_statistics_are_folded_at_every_step_whatever_the_interval() -> None:
    """With the original API's contexts the user decides when statistics are recorded."""
    model = make_mlp()
    opt = KFAC(model, 0.05, 1e-2, factor_update_steps=10, warmup_steps=0)
    previous, changed = None, []
    for step in range(5):
        x, y = make_data(seed=step)
        opt.zero_grad()
        with opt.track_forward():
            out = model(x)
        loss = F.cross_entropy(out, y)
        with opt.track_backward():
            loss.backward()
        opt.step(loss=loss)
        current = opt.blocks["0"].A.clone()
        changed.append(previous is None or not torch.equal(previous, current))
        previous = current
    assert changed == [True] * 5


def test_statistics_in_the_factor_dtype_with_the_loss_scale_removed() -> None:
    """Under bfloat16 autocast and a loss scale of 2^10, the capture records float32 statistics of the
    unscaled loss: those of a float32 run, up to the bfloat16 rounding of the activations."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).float()
    x, y = (t.float() if t.is_floating_point() else t for t in make_data())
    pending = {}
    scale = torch.tensor(2.0**10)
    for mode in ("float32", "bf16-scaled"):
        blocks = {n: LinearBlock(model[int(n)], n) for n in ("0", "2")}
        capture = StatisticsCapture(blocks, lambda: True, "mean", False)
        if mode != "float32":
            capture.factor_dtype = torch.float32
            capture.loss_scale = lambda: scale
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "float32"):
            loss = F.cross_entropy(model(x), y)
        (loss * (scale if mode != "float32" else 1.0)).backward()
        pending[mode] = {f"{n}.{k}": b.pending(k) for n, b in blocks.items() for k in b.FACTORS}
        capture.remove()
    for key, expected in pending["float32"].items():
        got = pending["bf16-scaled"][key]
        assert got.dtype == torch.float32, key
        torch.testing.assert_close(got, expected, rtol=0.05, atol=1e-3 * expected.abs().max().item())


class Checkpointed(torch.nn.Module):
    """The 5-8-3 MLP with its middle (Linear, Tanh) under activation checkpointing (`mode`), or not."""

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.a = torch.nn.Linear(5, 8)
        self.b = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.c = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.a(x))
        if self.mode is None:
            return self.c(self.b(hidden))
        reentrant = self.mode == "reentrant"
        return self.c(torch.utils.checkpoint.checkpoint(self.b, hidden, use_reentrant=reentrant))


def _train_checkpointed(mode: str | None, preset: bool) -> list[torch.Tensor]:
    from torch_kfac import presets

    model, loss_fn = Checkpointed(mode), torch.nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn) if preset else KFAC(model, lr=0.1, damping=1e-2)
    for i in range(3):
        x, y = make_data(seed=i)
        torch.manual_seed(100 + i)  # the MC Fisher's labels
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("preset", [False, True], ids=["fixed", "preset"])
def test_activation_checkpointing_records_each_pass_once(preset: bool) -> None:
    """Non-reentrant checkpointing recomputes the middle layer's forward pass during the backward
    pass: its statistics are those of one pass, and the preset's own passes run through it, so
    training is bit for bit that without checkpointing."""
    expected = _train_checkpointed(None, preset)
    checkpointed = _train_checkpointed("non-reentrant", preset)
    assert all(torch.equal(p, q) for p, q in zip(checkpointed, expected, strict=True))


def test_reentrant_checkpointing_names_the_feature_that_needs_autograd_grad() -> None:
    """Reentrant checkpointing refuses `torch.autograd.grad`, which the MC Fisher's own pass uses:
    the error names K-FAC's pass and the non-reentrant mode, not the user's code."""
    with pytest.raises(RuntimeError, match=r"K-FAC: the 'mc' Fisher's own pass .* use_reentrant=False"):
        _train_checkpointed("reentrant", preset=True)


@pytest.mark.parametrize("preset", [False, True], ids=["fixed", "preset"])
def test_copies_of_the_model_do_not_inherit_the_optimizers_hooks(preset: bool) -> None:
    """`copy.deepcopy(model)` (an EMA of the weights, a teacher) and `torch.save(model)` carry inert
    hooks, not copies of the optimizer's state behind them: a copy's grad-enabled pass records
    nothing, the pickle holds the model alone, and the preset's model pickles at all (before, a
    PicklingError)."""
    import copy
    import io

    from torch_kfac import presets
    from torch_kfac.capture import ModuleHook, _inert_hook

    model, loss_fn = make_mlp(), torch.nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn) if preset else KFAC(model, lr=0.1, damping=1e-2)
    x, y = make_data()
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert hooks and all(isinstance(h, ModuleHook) for h in hooks)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        copied_hooks = [
            h for m in copied.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        ]
        assert len(copied_hooks) == len(hooks) and all(h is _inert_hook for h in copied_hooks)
        loss_fn(copied(x), y).backward()  # records nothing anywhere
        with torch.no_grad():
            torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
    assert not any(b.has_pending(k) for b in opt.preconditioner.blocks.values() for k in b.FACTORS)


def test_copies_of_a_model_with_switched_forwards_carry_nothing_of_kfac() -> None:
    """The LSTM and attention blocks replace their module's `forward`; a deep copy or pickle of the
    model gets the class's own forward back instead of the block (and the factors behind it): the
    pickle names nothing of torch_kfac but the inert hooks, the copy computes what the model does,
    and a new KFAC built on the copy trains it as one built on an untouched model."""
    import copy
    import io
    import re

    torch.manual_seed(0)
    model = AttentionLSTM()
    pristine = copy.deepcopy(model)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    opt = KFAC(model, lr=0.1, damping=0.1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert set(re.findall(rb"torch_kfac[\w.]*\n\w+", buffer.getvalue())) == {b"torch_kfac.capture\n_inert"}
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    with torch.no_grad():
        for copied in copies:
            torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
    for copied in (*copies, pristine):
        copied.load_state_dict(model.state_dict())
        new = KFAC(copied, lr=0.1, damping=0.1)
        for _ in range(2):
            new.zero_grad()
            F.cross_entropy(copied(x), y).backward()
            new.step()
    for copied in copies:
        for p, q in zip(pristine.parameters(), copied.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_statistics_under_autocast_are_sums_in_float32() -> None:
    """Under bfloat16 autocast the input statistics are still float32 products (autocast is off in
    the hooks): the first layer's A is [x, 1]^T [x, 1] / N of the float32 inputs to float32
    rounding, where a bfloat16 product would be off by about 1e-2."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).float()
    opt = KFAC(model, lr=0.1, damping=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 64, generator=gen, dtype=torch.float32)
    y = torch.randint(0, 8, (128,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.update_cov()
    rows = torch.cat([x, torch.ones(128, 1)], 1).double()
    assert opt.blocks["0"].A.dtype == torch.float32
    torch.testing.assert_close(opt.blocks["0"].A.double(), rows.T @ rows / 128, rtol=1e-5, atol=1e-5)
