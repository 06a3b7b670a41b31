"""torch_kfac.last_batch: `opt.step()` takes the loss and batch of the user's last training pass.

A step called without them must equal the step given them explicitly, bit for bit; what cannot be
taken (no pass, several, a loss of reshaped outputs, keyword inputs) is an error naming why.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.conftest import make_data, make_mlp
from torch_kfac import KFAC, KFACPreconditioner, presets
from torch_kfac.last_batch import TrainingPass

Step = Callable[[KFAC, nn.Module, nn.Module, Tensor, Tensor], None]


def explicit(opt: KFAC, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step(loss=loss, batch=(x, y))


def bare(opt: KFAC, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    outputs = model(x)
    loss_fn(outputs, y).backward()
    logged = loss_fn(outputs, y).item()  # the same pass's loss again: still one pass
    assert logged > 0
    with torch.no_grad():  # evaluation passes are not training passes
        loss_fn(model(x[:3]), y[:3])
    opt.step()


def closure(opt: KFAC, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> None:
    def run() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(run)


def null_closure(opt: KFAC, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> None:
    """Lightning's manual optimization: a closure that evaluates nothing, beside the loss and batch
    (of a loss the optimizer does not see: they are all it has)."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step(lambda: None, loss=loss, batch=(x, y))


#: The configurations, built on (model, loss_fn) with any more KFAC keywords.
CONFIGS: dict[str, Callable[..., KFAC]] = {
    "preset": lambda m, f, **kw: presets.adaptive(m, f, qmodel_batch_size=8, fisher_batch_size=8, **kw),
    "mc-fixed-lr": lambda m, f, **kw: KFAC(m, lr=0.1, damping=1e-2, loss_fn=f, fisher_type="mc", **kw),
    "adapt-damping": lambda m, f, **kw: KFAC(
        m, lr=0.1, damping=1e-2, loss_fn=f, adapt_damping=True, damping_adaptation_interval=2, **kw
    ),
}
#: What a step's statistics must repeat (the loss itself is only taken where the options need it).
COMPARED = ("new_loss", "damping", "learning_rate", "momentum", "rho")


def train(config: str, step: Step, steps: int = 6) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Parameters and per-step statistics after `steps` steps on fresh batches of 16."""
    torch.manual_seed(0)
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = CONFIGS[config](model, loss_fn)
    stats = []
    for i in range(steps):
        x, y = make_data(seed=i)
        torch.manual_seed(100 + i)  # the MC Fisher's labels
        step(opt, model, loss_fn, x, y)
        stats.append(
            {
                k: v
                for k, v in opt.last_stats.items()
                if k in ("new_loss", "damping", "learning_rate", "momentum", "rho")
            }
        )
    return [p.detach().clone() for p in model.parameters()], stats


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("step", [bare, closure, null_closure], ids=["step()", "closure", "null-closure"])
def test_a_step_without_loss_or_batch_equals_the_step_given_them(config: str, step: Step) -> None:
    expected, expected_stats = train(config, explicit)
    params, stats = train(config, step)
    assert all(torch.equal(p, q) for p, q in zip(params, expected, strict=True))
    assert str(stats) == str(expected_stats)
    if config != "mc-fixed-lr":  # the loss on the same batch after the step, not the next step's
        assert any(s["new_loss"] is not None for s in stats)


def test_what_the_options_do_not_need_is_not_taken() -> None:
    """step(loss=loss) with adapt_damping keeps the original API's rule (the loss change is measured
    against the next step's loss) although the pass's batch is known; a fixed-lr step takes no loss."""

    def run(given: bool) -> tuple[list[Tensor], Tensor]:
        model, ce = make_mlp(), nn.CrossEntropyLoss()
        loss_fn = ce if given else None  # the training pass runs through it
        opt = KFAC(
            model, lr=0.1, damping=1e-2, loss_fn=loss_fn, adapt_damping=True, damping_adaptation_interval=1
        )
        for i in range(4):
            x, y = make_data(seed=i)
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            opt.step(loss=loss)
            assert opt.last_stats["new_loss"] is None  # no evaluation on the same batch
        return [p.detach() for p in model.parameters()], opt.damping

    (params, damping), (expected, expected_damping) = run(True), run(False)
    assert all(torch.equal(p, q) for p, q in zip(params, expected, strict=True))
    assert torch.equal(damping, expected_damping)
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = KFAC(model, lr=0.1, damping=1e-2, loss_fn=loss_fn, fisher_type="mc")
    x, y = make_data()
    loss_fn(model(x), y).backward()
    assert opt.step() is None and opt.last_stats["loss"] is None


def test_the_optimizers_own_passes_are_not_training_passes() -> None:
    """The MC Fisher's pass, the quadratic model, the damping search and the loss after the step run
    the model and loss_fn inside the step: none of them is a batch for the next step."""
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn)
    x, y = make_data()
    loss_fn(model(x), y).backward()
    opt.step()
    assert opt.last_stats["new_loss"] is not None
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(
        ValueError, match="loss_fn was not called on the model's outputs with gradients enabled"
    ):
        opt.step()


@pytest.mark.parametrize(
    ("training_pass", "reason"),
    [
        (lambda m, f, x, y: F.cross_entropy(m(x), y), "loss_fn was not called on the model's outputs"),
        (lambda m, f, x, y: f(m(x)[:, :2], y.clamp(max=1)), "a tensor that is not the model's output"),
        (lambda m, f, x, y: f(m(x), y) + f(m(x), y), "2 training passes"),
        (lambda m, f, x, y: f(m(x), target=y), "loss_fn was called with other arguments"),
        (lambda m, f, x, y: f(input=m(x), target=y), "loss_fn was called with other arguments"),
        (
            lambda m, f, x, y: f(input=x @ torch.ones(5, 3), target=y) + F.cross_entropy(m(x), y),
            "the optimizer's model had not been",
        ),
        (lambda m, f, x, y: f(m.body(x), y), r"a submodule called directly"),
        (lambda m, f, x, y: f(m(x, pair=True)[0], y), "not the model's output"),
    ],
    ids=[
        "other-loss",
        "sliced-outputs",
        "two-passes",
        "keyword-targets",
        "keywords",
        "loss-before-model",
        "submodule",
        "tuple-outputs",
    ],
)
def test_a_pass_that_gives_no_batch_is_named_in_the_error(
    training_pass: Callable[[nn.Module, nn.Module, Tensor, Tensor], Tensor], reason: str
) -> None:
    model, loss_fn = Keyword(make_mlp()), nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn)
    x, y = make_data()
    training_pass(model, loss_fn, x, y).backward()
    with pytest.raises(ValueError, match=f"need the loss: call step.*; none could be taken.*{reason}"):
        opt.step()
    assert opt.preconditioner.steps == 0


def test_a_model_called_with_keywords_gives_the_step_of_its_arguments() -> None:
    """model(input=x) leaves Arguments(kwargs={'input': x}); its step is the positional one's."""

    def run(keywords: bool) -> list[Tensor]:
        model, loss_fn = Keyword(make_mlp()), nn.CrossEntropyLoss()
        opt = presets.adaptive(model, loss_fn, qmodel_batch_size=8, fisher_batch_size=8)
        for i in range(4):
            x, y = make_data(seed=i)
            torch.manual_seed(i)
            opt.zero_grad()
            if keywords:
                loss_fn(model(input=x), y).backward()
                opt.step()
            else:
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step(loss=loss, batch=(x, y))
        return [p.detach() for p in model.parameters()]

    assert all(torch.equal(p, q) for p, q in zip(run(True), run(False), strict=True))


def test_fisher_pass_without_a_batch_names_the_reason() -> None:
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = KFAC(model, lr=0.1, loss_fn=loss_fn, fisher_type="mc")
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"fisher_type='mc' needs step.*none could be taken.*was not called"):
        opt.step()


def precondition_and_step(bare: bool, fisher_type: str, micro: int = 1, steps: int = 4) -> list[Tensor]:
    """`KFACPreconditioner` in front of SGD, its Fisher batch given or taken from the pass; with
    `micro` > 1 micro-batches per step, the last one's (accumulated_passes='last')."""
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    last = {"accumulated_passes": "last"} if micro > 1 else {}
    pre = KFACPreconditioner(
        model, damping=1e-2, loss_fn=loss_fn, fisher_type=fisher_type, warmup_steps=0, **last
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(steps):
        x, y = make_data(seed=i)
        torch.manual_seed(100 + i)  # the MC Fisher's labels
        opt.zero_grad()
        for inputs, targets in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (loss_fn(model(inputs), targets) / micro).backward()
        pre.step() if bare else pre.step(batch=(inputs, targets))
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("micro", [1, 2], ids=["one-pass", "two-micro-batches"])
@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_the_preconditioner_takes_its_fisher_batch_from_the_training_pass(
    fisher_type: str, micro: int
) -> None:
    bare = precondition_and_step(True, fisher_type, micro)
    explicit = precondition_and_step(False, fisher_type, micro)
    assert all(torch.equal(p, q) for p, q in zip(bare, explicit, strict=True))


def test_the_preconditioner_names_why_no_fisher_batch_was_taken() -> None:
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    pre = KFACPreconditioner(model, loss_fn=loss_fn, fisher_type="mc")
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"fisher_type='mc' needs step.*none could be taken.*was not called"):
        pre.step()
    pre.close()
    assert not model._forward_hooks and not loss_fn._forward_hooks


def test_lightning_runs_the_preconditioner_in_a_hook_without_the_batch() -> None:
    """Automatic optimization with `pre.step()` in `on_before_optimizer_step` (after the closure's
    backward pass, before the optimizer's step): the MC Fisher's batch is the training step's."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.loss_fn = make_mlp(), nn.CrossEntropyLoss()
            self.pre = KFACPreconditioner(
                self, damping=1e-2, loss_fn=self.loss_fn, fisher_type="mc", warmup_steps=0
            )

        def forward(self, inputs: Tensor) -> Tensor:
            return self.net(inputs)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            torch.manual_seed(100 + batch_idx)  # the MC Fisher's labels
            return self.loss_fn(self(batch[0]), batch[1])

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            self.pre.step()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = (
        torch.cat([make_data(seed=i)[0] for i in range(4)]),
        torch.cat([make_data(seed=i)[1] for i in range(4)]),
    )
    module = Module()
    trainer = L.Trainer(
        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    expected = precondition_and_step(False, "mc")
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), expected, strict=True))


class Keyword(nn.Module):
    """The MLP, callable as model(x) or model(input=x); with pair=True its output twice, as a tuple."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input: Tensor, pair: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        out = self.body(input)
        return (out, out) if pair else out


def test_the_step_keeps_no_reference_to_the_batch_or_the_outputs() -> None:
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn)
    x, y = make_data()
    outputs = model(x)
    loss_fn(outputs, y).backward()
    refs = [weakref.ref(t) for t in (x, y, outputs)]
    opt.step()
    del x, y, outputs
    assert [r() for r in refs] == [None, None, None]


def test_an_optimizer_that_never_steps_holds_one_batch_at_most() -> None:
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    presets.adaptive(model, loss_fn)  # replaced, not closed: its hooks stay
    opt = presets.adaptive(model, loss_fn)
    refs = []
    for i in range(3):
        x, y = make_data(seed=i)
        refs.append(weakref.ref(x))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        del x, y
    assert [r() is None for r in refs] == [True, True, False]


def test_close_removes_the_hooks_from_the_model_and_the_loss() -> None:
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn)
    assert model._forward_hooks and loss_fn._forward_hooks
    opt.close()
    assert not model._forward_hooks and not loss_fn._forward_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def fit_preset_in_lightning(
    x: Tensor, y: Tensor, automatic: bool = True, accumulate: int = 1, **options: Any
) -> list[Tensor]:
    """`presets.adaptive(module, loss_fn, **options)` on the MLP, trained by a Lightning Trainer on
    (x, y) in batches of 16 (each batch's MC labels seeded by its index), one step per `accumulate`
    batches; the parameters after all of them."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.loss_fn = make_mlp(), nn.CrossEntropyLoss()
            self.automatic_optimization = automatic

        def forward(self, inputs: Tensor) -> Tensor:
            return self.net(inputs)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
            inputs, targets = batch
            torch.manual_seed(batch_idx)  # the MC Fisher's labels
            loss = self.loss_fn(self(inputs), targets)
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None

        def configure_optimizers(self) -> KFAC:
            return presets.adaptive(self, self.loss_fn, **options)

    module = Module()
    trainer = L.Trainer(
        max_steps=len(x) // 16 // accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    return [p.detach() for p in module.net.parameters()]


def preset_explicit_loop(x: Tensor, y: Tensor, accumulate: int = 1) -> list[Tensor]:
    """What `fit_preset_in_lightning` must give: each batch's loss divided by `accumulate` and
    back-propagated, and every `accumulate` batches a step given the last batch and its loss."""
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn)
    for i, (inputs, targets) in enumerate(zip(x.split(16), y.split(16), strict=True)):
        if i % accumulate == 0:
            opt.zero_grad()
        torch.manual_seed(i)
        loss = loss_fn(model(inputs), targets)
        (loss / accumulate).backward()
        if i % accumulate == accumulate - 1:
            opt.step(loss=loss, batch=(inputs, targets))
    return [p.detach() for p in model.parameters()]


def test_lightning_drives_the_preset_in_both_optimization_modes() -> None:
    """Automatic optimization calls opt.step(closure); manual optimization's opt.step() passes a
    closure that evaluates nothing. Both train as the explicit loop does, step for step."""
    x, y = make_data(n=64)
    expected = preset_explicit_loop(x, y)
    for automatic in (True, False):
        assert all(
            torch.equal(p, q) for p, q in zip(fit_preset_in_lightning(x, y, automatic), expected, strict=True)
        )


def micro_batches(opt: KFAC, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, bare: bool) -> None:
    """Gradient accumulation over two micro-batches, each loss weighted by its share 1/2; then a
    bare step, or the step given the last micro-batch and its loss."""
    opt.zero_grad()
    for inputs, targets in zip(x.split(8), y.split(8), strict=True):
        loss = loss_fn(model(inputs), targets)
        (loss / 2).backward()
    opt.step() if bare else opt.step(loss=loss, batch=(inputs, targets))


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_accumulation_takes_the_last_micro_batch_when_asked(config: str) -> None:
    """Several passes before a step raise, naming accumulated_passes; with 'last' the bare step is
    the step given the last micro-batch and its loss, bit for bit."""
    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = CONFIGS[config](model, loss_fn)
    with pytest.raises(ValueError, match=r"2 training passes.*accumulated_passes='last'"):
        micro_batches(opt, model, loss_fn, *make_data(), bare=True)

    def run(bare: bool) -> tuple[list[Tensor], list[str]]:
        model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
        opt = CONFIGS[config](model, loss_fn, accumulated_passes="last")
        stats = []
        for i in range(5):
            torch.manual_seed(100 + i)  # the MC Fisher's labels
            micro_batches(opt, model, loss_fn, *make_data(seed=i), bare=bare)
            stats.append(str({k: v for k, v in opt.last_stats.items() if k in COMPARED}))
        return [p.detach().clone() for p in model.parameters()], stats

    (params, stats), (expected, expected_stats) = run(True), run(False)
    assert all(torch.equal(p, q) for p, q in zip(params, expected, strict=True))
    assert stats == expected_stats


def test_a_summed_loss_steps_as_a_mean_one_when_the_step_takes_the_last_micro_batch() -> None:
    """reduction='sum': the accumulated gradient sums over all 16 examples, the last micro-batch's
    loss and curvature over its 8; each is put on the mean-loss scale by its own count, so the
    preset steps as with the mean loss (with 1/16 for both, rho and the quadratic model's
    coefficients came out on two scales)."""

    def run(reduction: str) -> list[Tensor]:
        model, loss_fn = make_mlp(), nn.CrossEntropyLoss(reduction=reduction)
        opt = CONFIGS["preset"](model, loss_fn, accumulated_passes="last")
        for i in range(5):
            x, y = make_data(seed=i)
            torch.manual_seed(100 + i)
            opt.zero_grad()
            for inputs, targets in zip(x.split(8), y.split(8), strict=True):
                loss = loss_fn(model(inputs), targets)
                (loss if reduction == "sum" else loss / 2).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(run("sum"), run("mean"), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_a_closure_of_a_scaled_loss_steps_as_its_training_pass() -> None:
    """The loss after the step is loss_fn's on the pass's batch: the step compares it with the pass's
    own loss_fn value, not with a closure's value of another scale (Lightning's under
    accumulate_grad_batches=2), which made rho -1181 and the damping 416 in two steps."""

    def run(scale: float) -> tuple[list[Tensor], list[str]]:
        model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
        opt = CONFIGS["preset"](model, loss_fn)
        stats = []
        for i in range(5):
            x, y = make_data(seed=i)
            torch.manual_seed(100 + i)

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss * scale

            opt.step(closure)
            stats.append(str({k: v for k, v in opt.last_stats.items() if k in COMPARED}))
        return [p.detach().clone() for p in model.parameters()], stats

    (params, stats), (expected, expected_stats) = run(0.5), run(1.0)
    assert all(torch.equal(p, q) for p, q in zip(params, expected, strict=True))
    assert stats == expected_stats


def test_lightning_accumulates_gradients_for_the_preset() -> None:
    """accumulate_grad_batches=2 calls opt.step(closure) after the second micro-batch, with the
    closure's loss divided by 2: with accumulated_passes='last' the preset steps as the explicit
    loop given the last micro-batch and its loss; without it the step raises, naming the option."""
    x, y = make_data(n=64)
    with pytest.raises(ValueError, match="accumulated_passes='last'"):
        fit_preset_in_lightning(x, y, accumulate=2)
    expected = preset_explicit_loop(x, y, accumulate=2)
    fitted = fit_preset_in_lightning(x, y, accumulate=2, accumulated_passes="last")
    assert all(torch.equal(p, q) for p, q in zip(fitted, expected, strict=True))


def test_a_compiled_model_gives_the_same_bare_steps() -> None:
    """torch.compile(model): the hooks on the model run outside the graph and see the output the
    compiled call returns, so the bare steps are the explicit eager ones."""
    torch._dynamo.reset()

    def run(compiled: bool) -> list[Tensor]:
        model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
        opt = presets.adaptive(model, loss_fn, qmodel_batch_size=8, fisher_batch_size=8)
        forward = torch.compile(model, backend="eager") if compiled else model
        for i in range(4):
            x, y = make_data(seed=i)
            torch.manual_seed(i)
            opt.zero_grad()
            loss = loss_fn(forward(x), y)
            loss.backward()
            opt.step() if compiled else opt.step(loss=loss, batch=(x, y))
        return [p.detach() for p in model.parameters()]

    assert all(torch.equal(p, q) for p, q in zip(run(True), run(False), strict=True))


def test_a_ddp_copy_of_the_freed_output_is_recognised_by_its_mark_alone() -> None:
    """DDP (find_unused_parameters) returns `_DDPSink` copies of the module's outputs and the
    originals are freed: a loss on the copy of the model's output is a training pass, a loss on a
    copy of anything else is not (single-process stand-in for the distributed test)."""
    from torch.nn.parallel.distributed import _DDPSink

    class Owner:
        _ddp_sink_clone = True  # what the sink reads from its DDP module

    owner = Owner()

    def sink(tensor: Tensor) -> Tensor:
        return _DDPSink.apply(weakref.ref(owner), tensor)[0]

    model, loss_fn = make_mlp(), nn.CrossEntropyLoss()
    opt = presets.adaptive(model, loss_fn)
    x, y = make_data()
    copy = sink(model(x))  # the module's own output is gone once the sink holds its copy
    assert type(copy.grad_fn).__name__ == "_DDPSinkBackward"
    loss_fn(copy, y)
    found = opt.preconditioner.last_batch.take()
    assert isinstance(found, TrainingPass) and found.inputs[0] is x and found.targets is y

    loss_fn(sink(model(x) * 2), y)  # a copy of another tensor, whose parent bears no mark
    assert "not the model's output" in str(opt.preconditioner.last_batch.take())
