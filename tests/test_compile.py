"""A `torch.compile`d model gives K-FAC the same statistics as the eager model, for every block family.

The statistics hooks run in Python outside the compiled graphs (they are `torch.compiler.disable`d):
a graph break at each hooked module, no recompilation as the step counter advances, and
`fullgraph=True`, which allows no graph break, is refused with dynamo's error naming K-FAC's reason.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac import KFAC

pytestmark = pytest.mark.usefixtures("float64")

N, CLASSES, STEPS = 8, 3, 3
Batch = Callable[[torch.Generator], Tensor]


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class GraphBreak(nn.Module):
    """Two Linear layers with an explicit graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(5, 8), nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(self.first(x))
        torch._dynamo.graph_break()
        return self.second(hidden)


class Attention(nn.Module):
    """Embedding, self-attention, LayerNorm, RMSNorm and a Linear head over the mean position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm, self.rms = nn.LayerNorm(6), nn.RMSNorm(6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        h = self.norm(h + self.attention(h, h, h, need_weights=False)[0])
        return self.head(self.rms(h).mean(1))


class Recurrent(nn.Module):
    """A recurrent layer (LSTM or GRU) and a Linear head on the last output."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn, self.head = kind(5, 4, batch_first=True), nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, CLASSES))


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.ConvTranspose2d(3, 2, 2, stride=2),
        nn.GroupNorm(1, 2),
        Flatten(),
        nn.Linear(2 * 8 * 8, CLASSES),
    )


def features(*shape: int) -> Batch:
    return lambda gen: torch.randn(N, *shape, generator=gen)


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Batch]] = {
    "linear": (mlp, features(5)),
    "conv-norm": (convnet, features(2, 4, 4)),
    "embedding-attention-norm": (Attention, lambda gen: torch.randint(0, 10, (N, 4), generator=gen)),
    "lstm": (lambda: Recurrent(nn.LSTM), features(4, 5)),
    "gru": (lambda: Recurrent(nn.GRU), features(4, 5)),
    "graph-break": (GraphBreak, features(5)),
}


def train(
    family: str, backend: str | Callable[..., object] | None, steps: int = STEPS
) -> tuple[KFAC, dict[str, Tensor]]:
    """A few K-FAC steps (factors and inverses refreshed every step) through the model, compiled
    with `backend` (None: eager); returns the optimizer and the parameters."""
    make, batch = FAMILIES[family]
    torch.manual_seed(0)
    model = make()
    opt = KFAC(model, lr=0.1, factor_update_steps=1, inverse_update_steps=1)
    forward = model if backend is None else torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs, targets = batch(gen), torch.randint(0, CLASSES, (N,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(forward(inputs), targets).backward()
        opt.step()
    return opt, {n: p.detach().clone() for n, p in model.named_parameters()}


def factors(opt: KFAC) -> dict[str, Tensor]:
    """Every block's running factors, keyed by block and factor name."""
    return {f"{n}.{k}": v for n, b in opt.blocks.items() for k, v in b.state.items() if k.endswith("_ema")}


def assert_same_training(family: str, backend: str, rtol: float) -> None:
    eager_opt, eager_params = train(family, None)
    torch._dynamo.reset()
    compiled_opt, compiled_params = train(family, backend)
    expected, got = factors(eager_opt), factors(compiled_opt)
    assert expected and got.keys() == expected.keys()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0.0)
    torch.testing.assert_close(compiled_params, eager_params, rtol=rtol, atol=1e-15)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_model_gives_eager_factors(family: str) -> None:
    """aot_eager: dynamo's graphs and AOT autograd's forward and backward, eager kernels."""
    assert_same_training(family, "aot_eager", rtol=1e-13)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_other_backends_give_eager_factors(backend: str) -> None:
    """Dynamo alone, and inductor's generated kernels (which may reorder sums: a tolerance)."""
    assert_same_training("linear", backend, rtol=1e-12 if backend == "inductor" else 1e-13)


def test_statistics_hooks_stay_out_of_the_compiled_graphs() -> None:
    """No graph holds K-FAC's statistics code: traced by dynamo, the hooks would be compiled once
    per block type and layer shape, and again as the step counter they read changes."""
    traced: list[str] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., object]:
        traced.extend(node.meta.get("stack_trace") or "" for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    opt, _ = train("conv-norm", recording)
    assert traced and all(b.has_factors() for b in opt.blocks.values())
    assert not [trace for trace in traced if "torch_kfac" in trace]


def test_fullgraph_is_refused_with_the_reason() -> None:
    """The statistics hooks cannot be inside one graph: fullgraph=True fails naming K-FAC's hooks."""
    torch._dynamo.reset()
    model = mlp()
    KFAC(model, lr=0.1)
    forward = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="K-FAC records layer statistics"):
        forward(torch.randn(N, 5))


# ------------------------------------------------------------------------------ compiled step
def train_step_compiled(compile_step: bool | str, steps: int = 7) -> list[Tensor]:
    """K-FAC with momentum, weight decay, a learning-rate schedule and a non-finite step (step 4,
    skipped on the device), inverses refreshed every 3 steps; returns the parameters."""
    torch.manual_seed(0)
    model = mlp()
    opt = KFAC(
        model, lr=0.1, momentum=0.9, weight_decay=1e-3, warmup_steps=1, factor_update_steps=2,
        inverse_update_steps=3, compile_step=compile_step,
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        inputs, targets = torch.randn(N, 5, generator=gen), torch.randint(0, CLASSES, (N,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        if i == 4:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()
        schedule.step()
    with pytest.warns(RuntimeWarning, match="1 since the last host check"):
        assert not opt.last_stats["skipped"]
    return [p.detach().clone() for p in model.parameters()]


def test_compiled_step_equals_the_eager_step_and_compiles_twice() -> None:
    """aot_eager runs the traced step with eager's kernels; its decompositions may regroup element-wise
    arithmetic by an ulp or so (float64: rtol 1e-13). Two graphs: the first step, which starts the
    momentum buffers, and every later one: inverse refreshes, the skipped step and the changing
    learning rate (a symbolic float) compile nothing new. fullgraph: no graph break."""
    eager = train_step_compiled(False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train_step_compiled("aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert all(p.isfinite().all() for p in compiled)
    torch.testing.assert_close(compiled, eager, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"adapt_damping": True}, "does not support adapt_damping"),
        ({"reject_steps": True, "loss_fn": nn.CrossEntropyLoss()}, "does not support reject_steps"),
        ({"adaptive_learning_rate": True, "loss_fn": nn.CrossEntropyLoss()}, "adaptive_learning_rate"),
        ({"compile_step": "no-such-backend"}, "compile_step must be a bool or a torch.compile backend"),
    ],
)
def test_compiled_step_refuses_what_it_cannot_compile(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KFAC(mlp(), **{"lr": 0.1, "compile_step": "eager", **options})  # type: ignore[arg-type]


@pytest.mark.parametrize(("compile_step", "backend"), [(True, "inductor"), ("aot_eager", "aot_eager")])
def test_compile_step_compiles_the_fixed_step_whole_with_the_backend_asked_for(
    monkeypatch: pytest.MonkeyPatch, compile_step: bool | str, backend: str
) -> None:
    """`compile_step=True` is inductor, a string names the backend; one graph (fullgraph) of the
    fixed-hyperparameter step, which then takes every step (torch.compile replaced by a recorder)."""
    calls: list[tuple[object, dict[str, object]]] = []

    def recorder(fn: Callable[..., object] | None = None, **kwargs: object) -> Callable[..., object] | None:
        calls.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", recorder)
    model = mlp()
    opt = KFAC(model, lr=0.1, compile_step=compile_step)
    assert len(calls) == 1
    fn, kwargs = calls[0]
    assert fn == opt._fixed_update and kwargs == {"backend": backend, "fullgraph": True}
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 5), torch.randint(0, CLASSES, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
