"""Cost of K-FAC's adaptive machinery per step, measured side by side in one run.

Configurations on the Martens & Grosse autoencoder (784-1000-500-250-30-250-500-1000-784, tanh,
sigmoid cross-entropy summed over pixels and averaged over the batch):

* adam: torch.optim.Adam.
* kfac: fixed learning rate, momentum and damping.
* kfac+lm: Levenberg-Marquardt damping from a same-batch loss evaluation every 5 steps.
* preset-whole: `torch_kfac.presets.adaptive`, learning rate and momentum from the exact quadratic
  model every step (one forward-mode pass that carries both directions) plus the
  Levenberg-Marquardt damping of kfac+lm, with the quadratic model's curvature on the whole batch
  (`qmodel_batch_size=None`).
* preset: the preset as shipped (its `qmodel_batch_size`).
* preset-64: the preset with the option's default `qmodel_batch_size` (64 leading examples).
* kfac-dense, preset-dense: kfac and preset with `low_rank_gradients=False` (every gradient
  preconditioned by the dense product G^-1 M A^-1, as before the option): its saving.

Every configuration uses the preset's curvature (MC Fisher on its sub-batch) and update intervals
(factors every step, inverses every 5 steps), so the ratios to `kfac` are those of the adaptive
machinery alone, and runs the same number of steps on the same synthetic binary images (the cost
does not depend on the data) after an untimed warm-up longer than K-FAC's curvature warm-up. The
configurations take turns step by step, so a machine whose load changes during the run slows them
alike. The mean step time (amortized over whole update cycles), the median, and their ratios to
`kfac` are written to `benchmarks/results/adaptive_step_cost_b<batch size>.json` and `.md`.
`--clock cpu` times the process's CPU time instead of the wall clock (steadier on a shared machine;
CPU only).

    python benchmarks/adaptive_step_cost.py [--batch-size 1000] [--steps 30] [--device cpu] [--clock wall]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torch_kfac import KFAC, presets

RESULTS = Path(__file__).resolve().parent / "results"
#: Untimed steps: past K-FAC's curvature warm-up (every-step refreshes), plus a few.
WARMUP = presets.ADAPTIVE["warmup_steps"] + 3
#: The preset's curvature (Fisher type and its pass's sub-batch) and update intervals, shared by
#: every K-FAC configuration.
INTERVALS = {
    k: presets.ADAPTIVE[k]
    for k in (
        "fisher_type",
        "fisher_batch_size",
        "factor_update_steps",
        "inverse_update_steps",
        "warmup_steps",
    )
}
CONFIGS = ("adam", "kfac", "kfac+lm", "preset-whole", "preset", "preset-64", "kfac-dense", "preset-dense")
SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def autoencoder() -> nn.Sequential:
    """The deep autoencoder; no activation on the code layer and on the output logits."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(SIZES)):
        layers.append(nn.Linear(d_in, d_out))
        if i not in (3, len(SIZES) - 2):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class PixelSumBCE(nn.BCEWithLogitsLoss):
    """Sigmoid cross-entropy summed over pixels, averaged over the batch."""

    def __init__(self) -> None:
        super().__init__(reduction="mean")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, target) * logits.shape[-1]


def make_optimizer(name: str, model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of configuration `name`."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    dense = name.endswith("-dense")
    name = name.removesuffix("-dense")
    common = {"damping": 1.0, "loss_fn": loss_fn, **INTERVALS, "low_rank_gradients": not dense}
    if name == "kfac":
        return KFAC(model, 0.05, momentum=0.9, **common)
    if name == "kfac+lm":
        return KFAC(model, 0.05, momentum=0.9, adapt_damping=True, damping_adaptation_interval=5, **common)
    sizes = {"preset-whole": {"qmodel_batch_size": None}, "preset-64": {"qmodel_batch_size": 64}}
    return presets.adaptive(model, loss_fn, low_rank_gradients=not dense, **sizes.get(name, {}))


def time_steps(
    names: list[str], batch: torch.Tensor, steps: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds of each of `steps` optimizer steps (forward, backward and step) of every
    configuration, the configurations taking turns step by step."""
    runs = []
    for name in names:
        torch.manual_seed(0)
        model = autoencoder().to(batch.device)
        loss_fn = PixelSumBCE()
        runs.append((name, model, loss_fn, make_optimizer(name, model, loss_fn)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(steps):
        for name, model, loss_fn, opt in runs:
            start = clock()
            opt.zero_grad()
            loss = loss_fn(model(batch), batch)
            loss.backward()
            if isinstance(opt, KFAC):
                opt.step(loss=loss, batch=(batch, batch))
            else:
                opt.step()
            times[name].append(clock() - start)
    return times


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run every configuration and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="with kfac")
    parser.add_argument("--out", type=Path, help="default: results/adaptive_step_cost_b<batch size>")
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS / f"adaptive_step_cost_b{args.batch_size}"
    if "kfac" not in args.configs:
        raise ValueError("--configs must include kfac (the ratios' reference)")
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu times CPU runs only")

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.process_time() if args.clock == "cpu" else time.perf_counter()

    gen = torch.Generator().manual_seed(0)
    batch = (torch.rand(args.batch_size, 784, generator=gen) > 0.5).float().to(device)
    names = args.configs
    timed = {n: t[WARMUP:] for n, t in time_steps(names, batch, WARMUP + args.steps, clock).items()}
    means = {name: statistics.fmean(t) for name, t in timed.items()}
    medians = {name: statistics.median(t) for name, t in timed.items()}
    rows = {
        n: {
            "mean_ms": 1e3 * means[n],
            "median_ms": 1e3 * medians[n],
            "ratio_to_kfac": means[n] / means["kfac"],
            "median_ratio_to_kfac": medians[n] / medians["kfac"],
        }
        for n in names
    }
    command = "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:])
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command.strip(),
        "device": device_name,
        "batch_size": args.batch_size,
        "clock": args.clock,
        "preset_qmodel_batch_size": presets.ADAPTIVE["qmodel_batch_size"],
        "results": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"Command: `{command.strip()}` on {device_name}, batch {args.batch_size}, "
        f"{args.steps} steps after {WARMUP} untimed ones, {args.clock} clock; every K-FAC configuration "
        f"with the preset's curvature and intervals ({INTERVALS}); the preset's qmodel_batch_size "
        f"{presets.ADAPTIVE['qmodel_batch_size']}.",
        "",
        "| configuration | mean step (ms) | median step (ms) | mean / kfac's | median / kfac's |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {r['mean_ms']:.1f} | {r['median_ms']:.1f} | {r['ratio_to_kfac']:.2f} "
        f"| {r['median_ratio_to_kfac']:.2f} |"
        for n, r in rows.items()
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
