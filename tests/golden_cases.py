"""Golden trajectories: the parameters after 30 float64 steps of a dozen configurations.

Written once by `python -m tests.golden_cases` on the code before a refactor; `test_golden.py`
replays every case and requires the same parameters (bit-identical, or to 1e-12 where a case
says why). Each case also stores the optimizer's `state_dict` after 15 steps, so that a state
written by the old code must load into the new one and continue to the same end point.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac import KFAC, KFACPreconditioner

GOLDEN = Path(__file__).parent / "golden" / "trajectories.pt"
STEPS, HALF = 30, 15
#: Short intervals so that 30 steps exercise the warm-up, factor and inverse schedules.
INTERVALS = {"factor_update_steps": 3, "inverse_update_steps": 5, "warmup_steps": 4}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))


class TiedLM(nn.Module):
    """Embedding, a hidden Linear, an output projection tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 5)
        self.hidden = nn.Linear(5, 5)
        self.head = nn.Linear(5, 7)
        self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(ids)))).transpose(1, 2)


class Attention(nn.Module):
    """Self-attention with a layer norm and a linear head over the mean position."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x + self.attn(x, x, x, need_weights=False)[0]).mean(1))


class Recurrent(nn.Module):
    """An LSTM and a linear head on its last output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(6, 7, batch_first=True)
        self.head = nn.Linear(7, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def data(kind: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    if kind == "image":
        x = torch.randn(16, 1, 5, 5, generator=gen)
    elif kind == "sequence":
        x = torch.randn(16, 3, 6, generator=gen)
    elif kind == "tokens":
        ids = torch.randint(0, 7, (8, 6), generator=gen)
        return ids, torch.roll(ids, -1, dims=1)
    else:
        x = torch.randn(16, 6, generator=gen)
    return x, torch.randint(0, 4, (16,), generator=gen)


#: name -> (model, data kind, KFAC options or None for the preconditioner + SGD, step mode).
#: Step modes: 'plain' (step()), 'batch' (step(loss=, batch=)), 'loss' (step(loss=)),
#: 'original' (track_forward/track_backward and step(loss=)).
CASES: dict[str, tuple[Callable[[], nn.Module], str, dict[str, Any] | None, str]] = {
    "plain": (mlp, "vector", {"lr": 0.1, "damping": 1e-2}, "plain"),
    "adam_momentum": (mlp, "vector", {"lr": 0.05, "damping": 1e-2, "momentum_type": "adam"}, "plain"),
    "norm_constraint": (mlp, "vector", {"lr": 0.3, "damping": 1e-2, "norm_constraint": 1e-3}, "plain"),
    "weight_decay": (mlp, "vector", {"lr": 0.1, "damping": 1e-2, "weight_decay": 1e-2}, "plain"),
    "lr_schedule": (
        mlp,
        "vector",
        {"lr": lambda k: 0.1 / (1 + k), "damping": 1e-2, "momentum": lambda k: 0.5},
        "plain",
    ),
    "sum_exact_damping": (
        mlp,
        "vector",
        {"lr": 0.1, "damping": 1e-2, "reduction": "sum", "inverse_method": "eigh", "damping_type": "exact"},
        "plain",
    ),
    "ekfac": (
        convnet,
        "image",
        {"lr": 0.1, "damping": 1e-2, "approximation": "ekfac", "inverse_method": "eigh"},
        "plain",
    ),
    "diagonal": (convnet, "image", {"lr": 0.1, "damping": 1e-2, "approximation": "diagonal"}, "plain"),
    "forward_only": (mlp, "vector", {"lr": 0.1, "damping": 1e-2, "approximation": "forward-only"}, "plain"),
    "inverse_sqrt": (
        mlp,
        "vector",
        {"lr": 0.05, "damping": 1e-2, "inverse_power": -0.5, "inverse_method": "eigh"},
        "plain",
    ),
    "mc_fisher": (
        mlp,
        "vector",
        {"lr": 0.1, "damping": 1e-2, "fisher_type": "mc", "loss_fn": nn.CrossEntropyLoss()},
        "batch",
    ),
    "adaptive": (
        mlp,
        "vector",
        {
            "damping": 1.0,
            "adapt_damping": True,
            "damping_adaptation_interval": 2,
            "adaptive_learning_rate": True,
            "adaptive_momentum": True,
            "reject_steps": True,
            "qmodel_curvature": "exact",
            # Recorded with the quadratic model on the whole batch (the default before issue 9).
            "qmodel_batch_size": None,
            "loss_fn": nn.CrossEntropyLoss(),
            "l2_reg": 1e-5,
        },
        "batch",
    ),
    "adaptive_damping_kfac_model": (
        convnet,
        "image",
        {
            "lr": 0.1,
            "damping": 1e-1,
            "adapt_damping": True,
            "damping_adaptation_interval": 2,
            "loss_fn": nn.CrossEntropyLoss(),
        },
        "batch",
    ),
    "original_api": (
        mlp,
        "vector",
        {
            "lr": 0.1,
            "damping": 1e-2,
            "adapt_damping": True,
            "damping_adaptation_interval": 1,
            "momentum": 0.95,
        },
        "original",
    ),
    "tied": (
        TiedLM,
        "tokens",
        {"lr": 0.1, "damping": 1e-2, "reduction": "mean_positions", "loss_fn": nn.CrossEntropyLoss()},
        "plain",
    ),
    "attention": (Attention, "sequence", {"lr": 0.1, "damping": 1e-2, "center": True}, "plain"),
    "lstm": (Recurrent, "sequence", {"lr": 0.1, "damping": 1e-2, "kfac_approx": "reduce"}, "plain"),
    "preconditioner_sgd": (mlp, "vector", None, "plain"),
}


def build(name: str) -> tuple[nn.Module, Any, tuple[Tensor, Tensor]]:
    """Model (float64), optimizer and data of a case."""
    model_fn, kind, options, _ = CASES[name]
    model = model_fn().double()
    x, y = data(kind)
    if x.is_floating_point():
        x = x.double()
    if options is None:
        pre = KFACPreconditioner(model, damping=1e-2, **INTERVALS)
        opt: Any = (pre, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    else:
        opt = KFAC(model, **{**INTERVALS, **options})
    return model, opt, (x, y)


def run(name: str, model: nn.Module, opt: Any, batch: tuple[Tensor, Tensor], start: int, stop: int) -> None:
    """Steps start..stop-1 of a case; the MC Fisher's sampling is seeded per step."""
    mode = CASES[name][3]
    x, y = batch
    for k in range(start, stop):
        torch.manual_seed(1000 + k)
        if isinstance(opt, tuple):
            pre, sgd = opt
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            sgd.step()
            continue
        opt.zero_grad()
        if mode == "original":
            with opt.track_forward():
                loss = F.cross_entropy(model(x), y)
            with opt.track_backward():
                loss.backward()
            opt.step(loss=loss)
            continue
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if mode == "plain":
            opt.step()
        else:
            opt.step(loss=loss, batch=(x, y))


def state_of(opt: Any) -> Any:
    """The optimizer-side state dict of a case."""
    if isinstance(opt, tuple):
        return {"pre": opt[0].state_dict(), "sgd": opt[1].state_dict()}
    return opt.state_dict()


def load_state(opt: Any, state: Any) -> None:
    if isinstance(opt, tuple):
        opt[0].load_state_dict(state["pre"])
        opt[1].load_state_dict(state["sgd"])
    else:
        opt.load_state_dict(state)


def trajectory(name: str) -> dict[str, Any]:
    """Parameters after HALF and STEPS steps, and the state dict after HALF steps."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, opt, batch = build(name)
        run(name, model, opt, batch, 0, HALF)
        half = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = _strip(state_of(opt))  # state_dict() shares the live tensors
        run(name, model, opt, batch, HALF, STEPS)
        final = {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        torch.set_default_dtype(old)
    return {"half": half, "state": state, "final": final}


def _strip(state: Any) -> Any:
    """A copy of a state dict whose tensors no longer change with the optimizer."""
    if isinstance(state, dict):
        return {k: _strip(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_strip(v) for v in state)
    return state.detach().clone() if isinstance(state, Tensor) else state


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    torch.save({name: trajectory(name) for name in CASES}, GOLDEN)
    print(f"wrote {GOLDEN}")
