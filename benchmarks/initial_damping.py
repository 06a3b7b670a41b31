"""The adaptive preset's initial damping: damping='auto' against a grid of fixed initial dampings.

On each model of tests/test_models.py (full-batch float32 training, as tests/test_presets.py runs
it) the preset trains for `--steps` steps with every initial damping of the grid (half decades
from 1e-5 to 10, the preset otherwise unchanged) and with damping='auto', from `--seeds` seeds
of the MC Fisher's label sampling (seed 0: the test's own random state). The best fixed initial
damping of a model is the one with the lowest median final loss above the data's floor; the
table gives every loss, the damping 'auto' chose, and its ratio to the best fixed one.

    python benchmarks/initial_damping.py [--steps 50] [--seeds 2] [--cases lstm transformer resnet]

Results go to benchmarks/results/initial_damping.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS_DIR, command_line, environment, machine_line, write_results

from tests import test_models
from tests.test_presets import train_preset

GRID = [round(m * 10.0**e, 10) for e in range(-5, 2) for m in (1.0, 3.0)][:-1]  # 1e-5, 3e-5, ..., 10


def reseeded(model_fn: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    """`model_fn` (which seeds its own initialization), then the global seed for the label sampling;
    seed 0 leaves the random state as the model left it (the test's run)."""

    def build() -> nn.Module:
        model = model_fn()
        if seed:
            torch.manual_seed(seed)
        return model

    return build


def run_case(case: str, steps: int, seeds: int, grid: list[float]) -> dict[str, Any]:
    """Final losses above the floor for every damping of `grid` and 'auto', per seed."""
    torch.set_num_threads(1)
    model_fn, data_fn, _, _ = test_models.CASES[case]
    data = data_fn()
    floor = test_models.bayes_floor(*data)
    runs: dict[str, list[float]] = {}
    chosen: list[float] = []
    for damping in [*grid, "auto"]:
        finals = []
        for seed in range(seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # skipped non-finite steps of diverging runs
                loss, opt = train_preset(reseeded(model_fn, seed), data, steps, damping=damping)
            finals.append(loss - floor if math.isfinite(loss) else math.inf)
            if damping == "auto":
                chosen.append(opt.preconditioner.calibrated_damping)
        runs[str(damping)] = finals
        print(f"{case} damping={damping}: {[f'{v:.3g}' for v in finals]}", flush=True)
    medians = {d: statistics.median(v) for d, v in runs.items()}
    best = min(grid, key=lambda d: medians[str(d)])
    auto = statistics.median(chosen)
    return {
        "case": case,
        "floor": floor,
        "runs": runs,
        "median": medians,
        "best_fixed": best,
        "auto_dampings": chosen,
        "auto_over_best": auto / best,
    }


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: one column per model."""
    cases = result["cases"]
    lines = [
        "# Initial damping of the adaptive preset: 'auto' against fixed values",
        "",
        f"Command: `{result['command']}`",
        "",
        machine_line(result["environment"]),
        "",
        f"Median over {result['seeds']} seeds of the final training loss above the floor after "
        f"{result['steps']} full-batch steps of `presets.adaptive` (float32), by initial damping; "
        "**bold**: the best fixed value.",
        "",
        "| initial damping | " + " | ".join(c["case"] for c in cases) + " |",
        "|---|" + "---:|" * len(cases),
    ]
    for damping in [*map(str, result["grid"]), "auto"]:
        cells = []
        for c in cases:
            value = f"{c['median'][damping]:.3g}"
            cells.append(f"**{value}**" if damping == str(c["best_fixed"]) else value)
        lines.append(f"| {damping} | " + " | ".join(cells) + " |")
    lines += [
        "| auto chose | "
        + " | ".join(", ".join(f"{d:.3g}" for d in c["auto_dampings"]) for c in cases)
        + " |",
        "| auto / best fixed | " + " | ".join(f"{c['auto_over_best']:.3g}" for c in cases) + " |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the grid on every selected model; write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(test_models.CASES))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--grid", type=float, nargs="+", default=GRID)
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once (one process each)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": command_line(__file__, argv),
        "environment": environment(torch.device("cpu")),
        "steps": args.steps,
        "seeds": args.seeds,
        "grid": args.grid,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(run_case, case, args.steps, args.seeds, args.grid) for case in args.cases]
        result["cases"] = []
        for job in jobs:  # the files are rewritten as each model finishes
            result["cases"].append(job.result())
            result["seconds"] = time.perf_counter() - start
            write_results(args.out, "initial_damping", result, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
