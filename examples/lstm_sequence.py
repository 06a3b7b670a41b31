"""An LSTM sequence model trained with `torch_kfac.KFAC`: next-step prediction of noisy waves.

Each sequence is a sum of two sines with random frequencies, phases and amplitudes plus noise;
the model reads it step by step and predicts the next value at every position (squared error
averaged over the batch and the positions: `reduction='mean_positions'` with `nn.MSELoss()`).

The default cell computes its gates with two `nn.Linear` layers applied at every time step, so
K-FAC treats the time steps as positions sharing those weights (the expand convention of
Eschenhagen et al. 2023). `--cell torch` uses `nn.LSTM` instead: its parameters get a curvature
block only if a block type is registered for `nn.LSTM`, otherwise the plain momentum update
(the registration report printed with --show-registration says which).

    python examples/lstm_sequence.py
    python examples/lstm_sequence.py --cell torch --show-registration
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from example_utils import add_common_arguments, pick_device, progress, run
from torch import Tensor, nn

from torch_kfac import KFAC


class LinearLSTM(nn.Module):
    """Single-layer LSTM whose gates come from nn.Linear layers (input and hidden), one step at a time."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_gates = nn.Linear(input_size, 4 * hidden_size)
        self.hidden_gates = nn.Linear(hidden_size, 4 * hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Hidden states (N, T, hidden) for inputs (N, T, input_size)."""
        n, t, _ = x.shape
        h = x.new_zeros(n, self.hidden_size)
        c = x.new_zeros(n, self.hidden_size)
        pre = self.input_gates(x)  # all time steps at once: T positions share the weight
        outputs = []
        for step in range(t):
            i, f, g, o = (pre[:, step] + self.hidden_gates(h)).chunk(4, dim=1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class SequenceModel(nn.Module):
    """LSTM (ours or torch's) followed by a Linear read-out at every step."""

    def __init__(self, hidden_size: int, cell: str) -> None:
        super().__init__()
        self.lstm: nn.Module = (
            LinearLSTM(1, hidden_size) if cell == "linear" else nn.LSTM(1, hidden_size, batch_first=True)
        )
        self.readout = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Predictions (N, T, 1) of the next value for inputs (N, T, 1)."""
        out = self.lstm(x)
        return self.readout(out[0] if isinstance(out, tuple) else out)


def waves(n: int, length: int, generator: torch.Generator, noise: float = 0.05) -> Tensor:
    """n sequences (n, length + 1, 1): two random sines plus Gaussian noise."""
    t = torch.arange(length + 1, dtype=torch.float32)
    freq = 0.05 + 0.25 * torch.rand(n, 2, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(n, 2, 1, generator=generator)
    amp = 0.5 + 0.5 * torch.rand(n, 2, 1, generator=generator)
    clean = (amp * torch.sin(freq * t + phase)).sum(1)
    return (clean + noise * torch.randn(clean.shape, generator=generator)).unsqueeze(-1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=300, batch_size=64)
    parser.add_argument("--length", type=int, default=50, help="time steps per sequence")
    parser.add_argument("--hidden", type=int, default=64, help="LSTM hidden size")
    parser.add_argument("--cell", choices=("linear", "torch"), default="linear")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--norm-constraint", type=float, default=1e-2, help="bound on lr^2 g^T F^-1 g")
    parser.add_argument("--inverse-update-steps", type=int, default=10)
    parser.add_argument("--show-registration", action="store_true", help="print which layers K-FAC handles")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, print the test error next to the repeat-last-value baseline, return the losses."""
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = SequenceModel(args.hidden, args.cell).to(device)
    loss_fn = nn.MSELoss()  # mean over the batch, the positions (and the single feature)
    opt = KFAC(
        model,
        lr=args.lr,
        damping=args.damping,
        momentum=args.momentum,
        norm_constraint=args.norm_constraint,
        inverse_update_steps=args.inverse_update_steps,
        reduction="mean_positions",
        loss_fn=loss_fn,
    )
    if args.show_registration:
        print(opt)
    losses: list[float] = []
    start = time.perf_counter()
    bar = progress(args.steps, args, f"lstm ({args.cell}) k-fac")
    for step in bar:
        seq = waves(args.batch_size, args.length, gen).to(device)
        opt.zero_grad()
        loss = loss_fn(model(seq[:, :-1]), seq[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    test = waves(512, args.length, torch.Generator().manual_seed(args.seed + 1)).to(device)
    with torch.no_grad():
        test_mse = loss_fn(model(test[:, :-1]), test[:, 1:]).item()
    baseline = loss_fn(test[:, :-1], test[:, 1:]).item()
    print(
        f"{args.steps} steps in {seconds:.1f}s: train loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"test MSE {test_mse:.4f} (repeat-last-value baseline {baseline:.4f})"
    )
    return {"losses": losses, "test_mse": test_mse, "baseline_mse": baseline, "seconds": seconds}


if __name__ == "__main__":
    run(main)
