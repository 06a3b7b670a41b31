"""Host reads of device tensors in a step (each a full synchronisation on a GPU), counted on the CPU.

A `TorchFunctionMode` records every `item`, `__bool__`, `tolist`, `__float__`, `__int__`, `cpu`,
`numpy` and `__index__` call on a tensor during `opt.step()`. Today a fixed-hyperparameter step
reads once (the finiteness check of gradients and statistics) and once more on inverse-update
steps (the finiteness check of all new inverses together; it was one read per factor). On a GPU,
`python benchmarks/host_reads.py --device cuda` runs the step under `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from torch_kfac import KFAC

READS = {"item", "__bool__", "tolist", "__float__", "__int__", "cpu", "numpy", "__index__"}


class HostReads(TorchFunctionMode):
    """Records (method, library file:line) of every host read of a tensor inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch_kfac" in f.filename]
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].name}" if frames else "outside"
            self.reads.append((name, where))
        return func(*args, **(kwargs or {}))


def reads_per_step(steps: int = 6, **options: Any) -> list[list[tuple[str, str]]]:
    """Host reads of each step of KFAC (3 Linear blocks; factors every 2 steps, inverses every 4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = KFAC(model, lr=0.1, warmup_steps=2, factor_update_steps=2, inverse_update_steps=4, **options)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    batch = (x, y) if "loss_fn" in options else None
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        with HostReads() as mode:
            opt.step(loss=loss, batch=batch)
        out.append(mode.reads)
    return out


INVERSE_STEPS = {0, 1, 4}  # the two warm-up steps and step 4
CHECK = ("__bool__", "preconditioner.py:all_finite")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": 0.9, "norm_constraint": 1e-2, "weight_decay": 1e-4},
        {"adapt_damping": True, "damping_adaptation_interval": 1},
        {"adaptive_learning_rate": True, "adaptive_momentum": True, "loss_fn": nn.CrossEntropyLoss()},
    ],
    ids=["plain", "momentum-clip-decay", "adapt-damping", "qmodel"],
)
def test_a_step_reads_once_and_twice_when_inverses_are_refreshed(options: dict[str, Any]) -> None:
    """The damping rule and the quadratic model decide on the device: no read of their own."""
    for step, reads in enumerate(reads_per_step(**options)):
        assert reads == [CHECK] * (2 if step in INVERSE_STEPS else 1), (step, reads)


def test_step_rejection_reads_its_decision() -> None:
    """reject_steps compares the losses on the host: one read more per step."""
    for reads in reads_per_step(reject_steps=True, loss_fn=nn.CrossEntropyLoss()):
        assert [r for r in reads if r != CHECK] == [("__bool__", "optimizer.py:_update")], reads
