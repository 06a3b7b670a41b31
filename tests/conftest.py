"""Shared fixtures: tiny float64 models and data."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator

import pytest
import torch
from hypothesis import Phase, settings
from torch import nn

# The suite is thousands of tiny kernels: one thread avoids oversubscribing a small CI machine.
torch.set_num_threads(1)

# Property-based tests (tests/blocks/test_properties.py): 'ci' replays a fixed set of examples so the
# suite is deterministic and fast; 'thorough' draws ten times as many at random. Choose with
# `--hypothesis-profile=thorough` or HYPOTHESIS_PROFILE=thorough. 'ci' reports a failing example
# as found (no minutes of shrinking); 'thorough' shrinks it.
settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def float64() -> Iterator[None]:
    """Run a test in float64 from a fixed seed, restoring the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def layout_warnings(recorded: Iterable[warnings.WarningMessage]) -> list[str]:
    """K-FAC's warnings among `recorded` of an embedding lookup shared by the batch or of layers
    counting different numbers of examples (both: a layout whose factors are on the wrong scale)."""
    messages = [str(w.message) for w in recorded if str(w.message).startswith("K-FAC")]
    return [m for m in messages if "looked up with ids" in m or "count different numbers of examples" in m]


def make_mlp(seed: int = 0) -> nn.Sequential:
    """5-8-3 MLP with an in-place ReLU right after the first Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))


def make_data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 5) and class labels in {0, 1, 2}."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


class AttentionLSTM(nn.Module):
    """Blocks that hook their own tensors and replace their module's forward: attention projections
    and recurrent gates; inputs (N, 5), each repeated over 3 positions."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(5, 1, batch_first=True)
        self.lstm = nn.LSTM(5, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.shape[0], 1, 5).expand(-1, 3, -1)
        h = self.attention(h, h, h, need_weights=False)[0]
        return self.head(self.lstm(h)[0][:, -1])
