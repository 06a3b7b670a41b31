"""Progress per step against cost per step on the race's workloads: Adam, SGD, K-FAC at fixed settings
and `torch_kfac.presets.adaptive`, from the same initialization and batches.

A time target against Adam splits into two factors: how many fewer steps an optimizer needs to
reach Adam's loss (its per-step advantage) and how much more a step costs. This script trains every
configuration for the same number of steps on `race.py`'s workloads (same model, data, batches and
seeding), evaluates the held-out loss every `--every` steps and measures the CPU time of each step.
Its table gives, against the best Adam run's loss at the last step, each configuration's steps to
that loss, the advantage (Adam's steps / its steps), the step-cost ratio and their quotient, the
time ratio (below 1: it reaches Adam's final loss sooner than Adam).

Run from the repository root: ``python benchmarks/per_step.py --workloads transformer`` (about
10 minutes of CPU time with ``--jobs 2``). Results: benchmarks/results/per_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    command_line,
    environment,
    machine_line,
    median,
    seeded,
    write_results,
)
from race import WORKLOADS, get_batch, prepare_run
from race import parse_args as race_args
from time_to_loss import evaluate

#: Per workload, the (optimizer, options) runs of the default grid: Adam and SGD over the race's
#: learning rates, plain K-FAC over a small grid of learning rate and damping, and the preset.
GRIDS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "transformer": [
        ("adam", {"lr": 1e-3}),
        ("adam", {"lr": 3e-3}),
        ("sgd", {"lr": 0.1, "momentum": 0.9}),
        ("sgd", {"lr": 0.3, "momentum": 0.9}),
        *[("kfac", {"lr": lr, "damping": d}) for lr in (0.01, 0.03) for d in (0.01, 0.03)],
        ("kfac-auto", {}),
    ],
    "autoencoder": [
        ("adam", {"lr": 1e-3}),
        ("adam", {"lr": 3e-3}),
        ("sgd", {"lr": 3e-3, "momentum": 0.9}),
        *[("kfac", {"lr": lr, "damping": 1.0, "norm_constraint": 0.01}) for lr in (0.1, 0.3)],
        ("kfac-auto", {}),
    ],
    "convnet": [
        ("adam", {"lr": 3e-3}),
        ("adam", {"lr": 1e-2}),
        ("sgd", {"lr": 0.1, "momentum": 0.9}),
        *[("kfac", {"lr": lr, "damping": 0.1, "norm_constraint": 0.01}) for lr in (0.1, 0.3)],
        ("kfac-auto", {}),
    ],
}
QUICK_GRID: list[tuple[str, dict[str, Any]]] = [
    ("adam", {"lr": 1e-3}),
    ("kfac", {"lr": 0.1, "damping": 0.1}),
    ("kfac-auto", {}),
]


def train(job: tuple[str, str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One run of `args.steps` steps (in a worker process): held-out losses every `args.every` steps."""
    name, kind, hparams = job
    work, model, trainer, indices = prepare_run(
        name, kind, hparams, race_args(race_options(args)), args.seed, args.steps
    )
    losses = [evaluate(model, work.loss_fn, work.eval_set, 1000)]
    step_s: list[float] = []
    with seeded(args.seed):
        for step in range(args.steps):
            x, y = get_batch(work, indices[step])
            t0 = time.process_time()
            batch_loss = float(trainer.step(x, y))
            step_s.append(time.process_time() - t0)
            if not math.isfinite(batch_loss):
                losses.append(math.nan)
                break
            if (step + 1) % args.every == 0:
                losses.append(evaluate(model, work.loss_fn, work.eval_set, 1000))
    # The median step, so that the first steps' one-off work (calibration, warm-up) does not count.
    run = {
        "workload": name,
        "optimizer": kind,
        "hparams": hparams,
        "losses": losses,
        "ms_per_step": 1e3 * median(step_s),
    }
    print(f"{name} {kind} {hparams}: {' '.join(f'{v:.4g}' for v in losses[1:])}", flush=True)
    return run


def steps_to(run: dict[str, Any], loss: float, every: int) -> int | None:
    """The first evaluated step at which the run's held-out loss is at or below `loss`."""
    hit = next((i for i, v in enumerate(run["losses"]) if v <= loss), None)
    return None if hit is None else hit * every


def summarize(runs: list[dict[str, Any]], steps: int, every: int) -> dict[str, Any]:
    """Against the best Adam run's loss at the last step: each run's steps to it and its time ratio."""
    adams = [r for r in runs if r["optimizer"] == "adam" and len(r["losses"]) == steps // every + 1]
    adam = min(adams, key=lambda r: r["losses"][-1])
    target = adam["losses"][-1]
    adam_steps = steps_to(adam, target, every)
    rows = []
    for run in runs:
        reached = steps_to(run, target, every)
        advantage = adam_steps / reached if reached else None
        cost = run["ms_per_step"] / adam["ms_per_step"]
        rows.append(
            {
                "optimizer": run["optimizer"],
                "hparams": run["hparams"],
                "steps_to_target": reached,
                "advantage": advantage,
                "cost_ratio": cost,
                "time_ratio": cost / advantage if advantage else None,
            }
        )
    return {"target": target, "adam": adam["hparams"], "adam_steps": adam_steps, "rows": rows}


def _cell(value: float | None, fmt: str) -> str:
    """A table cell: the formatted value, or '-' where there is none (target not reached)."""
    return "-" if value is None else format(value, fmt)


def markdown(result: dict[str, Any]) -> str:
    """Per workload: the loss after every evaluated step, and each run's advantage, cost and time ratio."""
    every = result["every"]
    lines = [
        "# Progress per step against cost per step",
        "",
        f"Command: `{result['command']}`",
        "",
        machine_line(result["environment"]),
        "",
        f"Every run: {result['steps']} steps from the same initialization and batches "
        f"(seed {result['seed']}), one thread, the held-out loss of `race.py` evaluated every "
        f"{every} steps; ms/step is the median CPU time of a step. The target is the best Adam run's loss "
        "at the last step. Advantage: Adam's steps to the target over the run's; cost: its ms/step over "
        "Adam's; time ratio: cost / advantage (below 1: the run reaches the target in less time than Adam).",
        "",
    ]
    for work in result["workloads"]:
        s = work["summary"]
        marks = list(range(every, result["steps"] + 1, every))
        shown = [m for m in marks if m % (every * max(1, len(marks) // 8)) == 0 or m == marks[-1]]
        lines += [
            f"## {work['name']}",
            "",
            f"Target: {s['target']:.4g} (Adam {s['adam']}, step {s['adam_steps']}).",
            "",
            "| optimizer | config | ms/step | "
            + " | ".join(f"step {m}" for m in shown)
            + " | steps to target | advantage | cost | time ratio |",
            "|---|---|---:|" + "---:|" * (len(shown) + 4),
        ]
        for run, row in zip(work["runs"], s["rows"], strict=True):
            hp = ", ".join(f"{k}={v}" for k, v in run["hparams"].items())
            losses = [
                run["losses"][m // every] if m // every < len(run["losses"]) else math.nan for m in shown
            ]
            lines.append(
                f"| {run['optimizer']} | {hp} | {run['ms_per_step']:.0f} | "
                + " | ".join(f"{v:.4g}" for v in losses)
                + f" | {_cell(row['steps_to_target'], 'd')} | {_cell(row['advantage'], '.2f')} "
                f"| {row['cost_ratio']:.2f} | {_cell(row['time_ratio'], '.2f')} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def race_options(args: argparse.Namespace) -> list[str]:
    """The options of `race.py` that set up this script's workloads."""
    return (["--quick"] if args.quick else []) + (
        ["--batch-size", str(args.batch_size)] if args.batch_size else []
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["transformer"], choices=WORKLOADS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="steps between held-out evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size", type=int, help="examples (windows) per batch (default: the workload's own)"
    )
    parser.add_argument(
        "--grid", type=json.loads, help='runs replacing the default grid, JSON [["kfac", {"lr": 0.1}], ...]'
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (each on one thread)")
    parser.add_argument(
        "--quick", action="store_true", help="the race's tiny workloads and a 3-run grid (tests)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.steps % args.every:
        parser.error(f"--steps ({args.steps}) must be a multiple of --every ({args.every})")
    if args.grid is not None and not any(kind == "adam" for kind, _ in args.grid):
        parser.error("--grid needs an adam run: the best Adam run's final loss is the target")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every run of every workload, summarize, write per_step.{json,md}."""
    args = parse_args(argv)
    env = environment(torch.device("cpu"))
    jobs = [
        (name, kind, hparams)
        for name in args.workloads
        for kind, hparams in (args.grid or (QUICK_GRID if args.quick else GRIDS[name]))
    ]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            runs = list(pool.map(train, jobs, [args] * len(jobs)))
    else:
        runs = [train(job, args) for job in jobs]
    env["torch_threads"] = 1
    env["flush_denormal"] = True
    env["load_average_at_end"] = os.getloadavg()
    result: dict[str, Any] = {
        "command": command_line(__file__, argv),
        "environment": env,
        "steps": args.steps,
        "every": args.every,
        "seed": args.seed,
        "workloads": [],
    }
    for name in args.workloads:
        mine = [r for r in runs if r["workload"] == name]
        result["workloads"].append(
            {"name": name, "runs": mine, "summary": summarize(mine, args.steps, args.every)}
        )
    write_results(args.out, "per_step", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
