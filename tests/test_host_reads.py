"""Host reads of device tensors in a step (each a full synchronisation on a GPU), counted on the CPU.

`torch_kfac.utils.HostReads`, a `TorchFunctionMode`, records every `item`, `__bool__`, `tolist`,
`__float__`, `__int__`, `cpu`, `numpy` and `__index__` call on a tensor during `opt.step()`. A
fixed-hyperparameter step reads nothing, with or without an inverse update: the non-finite guard
and the inverse-failure fallback decide on the device, and the host learns of them at a host check
(`host_check_interval`, or when `last_stats` is read). The adaptive options read once, in the host
check (`KFACPreconditioner.check`): in `prepare`, or with reject_steps together with the rejection.
On a GPU, `python benchmarks/host_reads.py --device cuda` runs the step under
`torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_kfac import KFAC, KFACPreconditioner
from torch_kfac.utils import HostReads


def counted(step: Callable[[], object]) -> list[tuple[str, str]]:
    """The host reads of one call."""
    with HostReads() as mode:
        step()
    return [(kind, _unmutated(where)) for kind, where in mode.reads]


def _unmutated(where: str) -> str:
    """`file:function` with mutmut's renaming undone (scripts/mutation.sh runs these tests on code
    whose `Class.name` is `xǁClassǁname__mutmut_orig` and whose function `name` is `x_name__mutmut_3`)."""
    file, _, name = where.partition(":")
    if "__mutmut_" not in name:
        return where
    name = name.rpartition("ǁ")[2] if "ǁ" in name else name.removeprefix("x_")
    return f"{file}:{name[: name.index('__mutmut_')]}"


def reads_per_step(
    steps: int = 6, preconditioner: bool = False, **options: Any
) -> list[list[tuple[str, str]]]:
    """Host reads of each step of KFAC, or of a KFACPreconditioner in front of SGD (3 Linear blocks;
    factors every 2 steps, inverses every 4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    schedule = {"warmup_steps": 2, "factor_update_steps": 2, "inverse_update_steps": 4}
    if preconditioner:
        pre = KFACPreconditioner(model, **schedule, **options)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        lr = None if options.get("adaptive_learning_rate") else 0.1  # the adaptive one refuses an lr
        opt = KFAC(model, lr=lr, **schedule, **options)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    batch = (x, y) if "loss_fn" in options else None
    out = []
    for _ in range(steps):
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if preconditioner:
            out.append(counted(pre.step))
            sgd.step()
        else:
            out.append(counted(partial(opt.step, loss=loss, batch=batch)))
    return out


INVERSE_STEPS = {0, 1, 4}  # the two warm-up steps and step 4
CHECK = ("tolist", "preconditioner.py:check")


@pytest.mark.parametrize(
    ("preconditioner", "options"),
    [
        (False, {}),
        (False, {"momentum": 0.9, "norm_constraint": 1e-2, "weight_decay": 1e-4}),
        (False, {"inverse_method": "eigh"}),
        (True, {}),
        (True, {"inverse_method": "eigh"}),
    ],
    ids=["KFAC", "KFAC-momentum-clip-decay", "KFAC-eigh", "KFACPreconditioner", "KFACPreconditioner-eigh"],
)
def test_a_fixed_hyperparameter_step_reads_nothing(preconditioner: bool, options: dict[str, Any]) -> None:
    """Plain and inverse-update steps alike (on the CPU; on a GPU torch's eigh checks its own
    convergence on the host, Cholesky does not)."""
    assert reads_per_step(preconditioner=preconditioner, **options) == [[]] * 6


@pytest.mark.parametrize(
    "options",
    [
        {"adapt_damping": True, "damping_adaptation_interval": 1},
        {"adaptive_learning_rate": True, "adaptive_momentum": True, "loss_fn": nn.CrossEntropyLoss()},
        {"reject_steps": True, "adapt_damping": True, "loss_fn": nn.CrossEntropyLoss()},
        {"max_skipped_steps": 3},
        {"host_check_interval": 1},
    ],
    ids=["adapt-damping", "qmodel", "reject-steps", "max-skipped-steps", "check-every-step"],
)
def test_a_step_that_needs_a_host_decision_reads_once(options: dict[str, Any]) -> None:
    """The damping rule and the quadratic model decide on the device; the one read is the host
    check (with reject_steps, the check and the rejection read together), inverse steps included."""
    assert reads_per_step(**options) == [[CHECK]] * 6


def test_a_read_outside_the_library_is_labelled_outside() -> None:
    assert counted(lambda: torch.ones(2).sum().item()) == [("item", "outside")]


def test_a_check_interval_reads_in_every_kth_step() -> None:
    reads = reads_per_step(host_check_interval=3)
    assert reads == [[], [], [CHECK], [], [], [CHECK]]


def test_reading_last_stats_makes_the_host_check_once() -> None:
    """The skip flag of the last step is read when asked for, once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    opt = KFAC(model, lr=0.1)
    F.cross_entropy(model(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
    assert counted(opt.step) == []
    assert counted(lambda: opt.last_stats["skipped"]) == [CHECK]
    assert counted(lambda: opt.last_stats["skipped"]) == []
    assert opt.last_stats["skipped"] is False and opt.last_stats["skipped_in_a_row"] == 0


PROBE = ("tolist", "lowrank.py:verified_rows")


def _wide_steps(
    free_reads: bool, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> list[list[tuple[str, str]]]:
    """Host reads of 3 steps on Linear layers wide enough for their 4 rows (low-rank preconditioning)."""
    monkeypatch.setattr(KFACPreconditioner, "_reads_are_free", lambda self: free_reads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 5))
    opt = KFAC(model, lr=0.1, **options)
    x, y = torch.randn(4, 30), torch.randint(0, 5, (4,))
    batch = (x, y) if "loss_fn" in options else None
    out = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        out.append(counted(partial(opt.step, loss=loss, batch=batch)))
    return out


def test_low_rank_preconditioning_reads_its_probe_where_reads_are_free_or_made_anyway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU the probe's verdicts are read in every step; on a device where a read waits for
    the queue, a fixed step reads nothing (dense products), a step with a host check reads them too."""
    assert _wide_steps(True, monkeypatch) == [[PROBE]] * 3
    assert _wide_steps(True, monkeypatch, low_rank_gradients=False) == [[]] * 3
    assert _wide_steps(False, monkeypatch) == [[]] * 3
    assert _wide_steps(False, monkeypatch, max_skipped_steps=3) == [[PROBE, CHECK]] * 3
