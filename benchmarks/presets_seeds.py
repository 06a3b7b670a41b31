"""The adaptive preset over several seeds on every workload of `time_to_loss.py`: does any run diverge?

Runs `time_to_loss.py --optimizers kfac-auto --seeds ...` once per workload (each run on one
thread, process CPU time, its own output folder under `--scratch`) and writes one table of every
run (steps, initial, final and best loss, diverged or not) with the count of divergences to
`results/presets_seeds.md`. A run diverges by time_to_loss.py's rule: a non-finite batch loss or
one above 1000 times the initial loss, or a non-finite evaluation.

    python benchmarks/presets_seeds.py [--seeds 0 1 2] [--budget 20] [--workloads autoencoder ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import time_to_loss

from torch_kfac import presets

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("autoencoder", "convnet", "transformer")


def run_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """time_to_loss.py's result for the preset on workload `name` from every seed."""
    out = args.scratch / f"ttl_{name}"
    argv = ["--workloads", name, "--optimizers", "kfac-auto", "--seeds", *map(str, args.seeds)]
    argv += ["--budget", str(args.budget), "--clock", "cpu", "--evals", str(args.evals)]
    argv += ["--threads", "1", "--out", str(out)] + (["--quick"] if args.quick else [])
    time_to_loss.main(argv)
    return json.loads((out / "time_to_loss.json").read_text())


def markdown(results: dict[str, dict[str, Any]], command: str) -> tuple[str, int, int]:
    """The table of every run, and (diverged, runs)."""
    rows, descriptions, diverged, total = [], [], 0, 0
    for name, result in results.items():
        work = result["workloads"][0]
        descriptions.append(f"* {name}: {work['description']}")
        for run in sorted(work["runs"] + work.get("other_seed_runs", []), key=lambda r: r["seed"]):
            total += 1
            diverged += bool(run["diverged"])
            rows.append(
                f"| {name} | {run['seed']} | {run['steps']} | {run['curve'][0]['loss']:.4g} "
                f"| {run['final_loss']:.4g} | {run['best_loss']:.4g} | {'yes' if run['diverged'] else 'no'} |"
            )
    envs = [r["environment"] for r in results.values()]
    start = ", ".join(f"{v:.2f}" for v in envs[0]["load_average_at_start"])
    end = ", ".join(f"{v:.2f}" for v in envs[-1]["load_average_at_end"])
    first = next(iter(results.values()))
    lines = [
        "# The adaptive preset over several seeds on the workloads of time_to_loss.py",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {envs[0].get('cpu', '')}, torch {envs[0].get('torch', '')}; load average (1, 5, 15 min) "
        f"at the start {start}; at the end {end}.",
        "",
        f"`presets.adaptive` with `presets.ADAPTIVE` = `{presets.ADAPTIVE}` and the library's other "
        f"defaults (kfac-auto), from each seed (initialization and batch order), "
        f"{first['workloads'][0]['budget_s']:g} s of process CPU time per run, one thread. A run diverges "
        "when its batch loss is not finite or exceeds 1000 times the initial loss, or an evaluation is not "
        "finite. Losses: the training loss on time_to_loss.py's fixed evaluation subset.",
        "",
        "| workload | seed | steps | initial loss | final loss | best loss | diverged |",
        "|---|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"Diverged: {diverged} of {total} runs.",
        "",
        "Workloads:",
        "",
        *descriptions,
        "",
    ]
    return "\n".join(lines), diverged, total


def main(argv: list[str] | None = None) -> tuple[int, int]:
    """Run the preset on every workload from every seed; write the table; return (diverged, runs)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of CPU time per run")
    parser.add_argument("--evals", type=int, default=10, help="evaluations per run")
    parser.add_argument("--scratch", type=Path, default=Path(".scratch/presets_seeds"))
    parser.add_argument("--out", type=Path, default=RESULTS / "presets_seeds.md")
    parser.add_argument("--quick", action="store_true", help="time_to_loss.py's tiny models (tests)")
    args = parser.parse_args(argv)
    results = {name: run_workload(name, args) for name in args.workloads}
    command = "python benchmarks/presets_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text, diverged, total = markdown(results, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return diverged, total


if __name__ == "__main__":
    main()
