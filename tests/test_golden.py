"""Refactors keep the numbers: every golden case retraces its stored 30-step trajectory.

The trajectories were written by the code before the architecture refactor (`tests/golden_cases.py`);
the state dicts stored at step 15 were written by that code too, so the second test also shows
that a checkpoint of the previous version loads and continues.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.golden_cases import CASES, GOLDEN, HALF, STEPS, build, load_state, run, trajectory


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return torch.load(GOLDEN, weights_only=False)


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), (name, (actual[name] - value).abs().max().item())


@pytest.mark.parametrize("name", list(CASES))
def test_trajectory_is_unchanged(name: str, golden: dict[str, Any]) -> None:
    stored = golden[name]
    initial = {n: p.detach().double() for n, p in CASES[name][0]().named_parameters()}
    # The case must move every parameter it trains, so that a change in any rule shows.
    assert any(not torch.equal(stored["final"][n], initial[n]) for n in initial)
    assert all(v.isfinite().all() for v in stored["final"].values())
    result = trajectory(name)
    assert_same(result["half"], stored["half"])
    assert_same(result["final"], stored["final"])


@pytest.mark.parametrize("name", list(CASES))
def test_stored_checkpoint_loads_and_continues(name: str, golden: dict[str, Any], float64: None) -> None:
    stored = golden[name]
    model, opt, batch = build(name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(stored["half"][n])
    load_state(opt, stored["state"])
    run(name, model, opt, batch, HALF, STEPS)
    assert_same({n: p.detach() for n, p in model.named_parameters()}, stored["final"])
