"""Where the time of a preset step goes, on the race's workloads, next to Adam's step.

`torch_kfac.presets.adaptive` and Adam train copies of one model on the same batches, taking turns
step by step (one CPU thread, process CPU time). The preset's step is split into the parts below
by timing the methods that do them (each part's own time, without the parts it calls):

- user pass: the training loop's forward and backward of the loss;
- Fisher pass: the MC Fisher's own forward and backward passes on sampled labels, with the factor
  statistics they record;
- quadratic model: the forward-mode pass of the exact quadratic model (learning rate, momentum);
- preconditioning: (G + d I)^-1 M (A + d I)^-1 for every layer's gradient M;
- inverses: the damped factors' inverses, refreshed every `inverse_update_steps`;
- loss after the step: the extra forward pass of damping adaptation, every
  `damping_adaptation_interval` steps;
- rest: everything else in `KFAC.step` (folding statistics into the factors, finiteness masks,
  the quadratic model's small solve, moving the parameters).

Times are amortized over a whole number of inverse and damping intervals after `--warmup` untimed
steps (the automatic damping's search and the warm-up's inverses are in those). This is the
measured answer to "what costs it" where the race (`race.py`) misses a target.

Run from the repository root: ``python benchmarks/step_breakdown.py`` (about 3 minutes).
Results: benchmarks/results/step_breakdown.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import race
import torch
from common import RESULTS_DIR, command_line, environment, machine_line, make_trainer, seeded, write_results

from torch_kfac import KFAC

#: The parts of a preset step: (label, owner of the method, method name), owner 'trainer', 'opt'
#: (the KFAC), 'pre' (its preconditioner) or 'exact' (its quadratic model).
PARTS: tuple[tuple[str, str, str], ...] = (
    ("user pass", "trainer", "forward_backward"),
    ("Fisher pass", "pre", "fisher_pass"),
    ("quadratic model", "exact", "gram"),
    ("preconditioning", "pre", "precondition_all"),
    ("inverses", "pre", "_refresh_inverses"),
    ("loss after the step", "opt", "_evaluate"),
)


class PartTimer:
    """Process CPU time of wrapped methods, each part's own (time in nested wrapped calls excluded)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per active call: [start, time of nested parts]

    def wrap(self, owner: object, method: str, label: str) -> None:
        """Replace `owner.method` by a timed call of it (an instance attribute, the class untouched)."""
        inner: Callable[..., Any] = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([time.process_time(), 0.0])
            try:
                return inner(*args, **kwargs)
            finally:
                start, nested = self._stack.pop()
                spent = time.process_time() - start
                self.totals[label] = self.totals.get(label, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1][1] += spent

        setattr(owner, method, timed)

    def reset(self) -> None:
        """Forget the totals (after the warm-up)."""
        self.totals = {}


def owners(trainer: Any) -> dict[str, object]:
    """The objects that own the parts' methods, for a preset trainer."""
    opt: KFAC = trainer.optimizer
    return {"trainer": trainer, "opt": opt, "pre": opt.preconditioner, "exact": opt._exact}


def build_trainers(work: race.RaceWorkload, seed: int) -> tuple[Any, Any]:
    """The preset and Adam (lr 1e-3) on copies of one initialisation of `work`'s model.

    Adam's copy is taken before the preset hooks the model: a copy taken after would carry
    K-FAC's hooks, and Adam's step would pay for them.
    """
    with seeded(seed):
        model = work.build()
    adam = make_trainer("adam", copy.deepcopy(model), work.loss_fn, {"lr": 1e-3})
    return make_trainer("kfac-auto", model, work.loss_fn, {}), adam


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved preset and Adam steps on workload `name`; the preset's parts and both steps' means."""
    work = race.make_workload(name, args)
    preset, adam = build_trainers(work, args.seed)
    options = preset.optimizer.options
    period = math.lcm(options.inverse_update_steps, options.damping_adaptation_interval)
    steps = max(period, args.steps // period * period)  # whole inverse and damping intervals
    timer = PartTimer()
    objects = owners(preset)
    for label, owner, method in PARTS:
        timer.wrap(objects[owner], method, label)
    indices = race.batch_indices(work, args.warmup + steps, args.seed)
    totals = {"kfac-auto": 0.0, "adam": 0.0}
    with seeded(args.seed):
        for i, rows in enumerate(indices):
            if i == args.warmup:
                timer.reset()
                totals = dict.fromkeys(totals, 0.0)
            x, y = race.get_batch(work, rows)
            for kind, trainer in (("kfac-auto", preset), ("adam", adam)):
                start = time.process_time()
                trainer.step(x, y)
                totals[kind] += time.process_time() - start
    step_ms = 1000 * totals["kfac-auto"] / steps
    adam_ms = 1000 * totals["adam"] / steps
    parts = {label: 1000 * timer.totals.get(label, 0.0) / steps for label, _, _ in PARTS}
    parts["rest"] = step_ms - sum(parts.values())
    return {
        "name": name,
        "description": work.description,
        "batch_size": work.batch_size,
        "steps": steps,
        "warmup": args.warmup,
        "step_ms": step_ms,
        "adam_ms": adam_ms,
        "parts_ms": parts,
        "intervals": {
            "inverse_update_steps": options.inverse_update_steps,
            "damping_adaptation_interval": options.damping_adaptation_interval,
            "qmodel_batch_size": options.qmodel_batch_size,
            "fisher_batch_size": options.fisher_batch_size,
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """The report: one table per workload."""
    lines = [
        "# Where the time of a preset step goes",
        "",
        f"Command: `{result['command']}`",
        "",
        machine_line(result["environment"]),
        "",
        "Process CPU time, one thread; `presets.adaptive` and Adam (lr 1e-3) take turns step by step "
        "on the same batches from copies of one initialization. Each part is the time of its own "
        "methods, amortized over the timed steps (a whole number of inverse and damping intervals, "
        "after the warm-up). 'x Adam' divides by Adam's mean step.",
    ]
    for w in result["workloads"]:
        lines += [
            "",
            f"## {w['name']}, batch {w['batch_size']}",
            "",
            f"{w['description']}. {w['steps']} timed steps after {w['warmup']}; the preset's "
            + ", ".join(f"{k} {v}" for k, v in w["intervals"].items())
            + ".",
            "",
            "| part | ms/step | share of the step | x Adam's step |",
            "|---|---:|---:|---:|",
        ]
        for label, ms in w["parts_ms"].items():
            lines.append(f"| {label} | {ms:.1f} | {ms / w['step_ms']:.0%} | {ms / w['adam_ms']:.2f} |")
        lines += [
            f"| **preset step** | **{w['step_ms']:.1f}** | 100% | **{w['step_ms'] / w['adam_ms']:.2f}** |",
            f"| Adam step | {w['adam_ms']:.1f} | | 1.00 |",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (those of race.py that build the workloads, and the step counts)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(race.WORKLOADS), choices=race.WORKLOADS)
    parser.add_argument("--steps", type=int, default=50, help="timed steps (rounded to whole intervals)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models and synthetic data (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    # What race.make_workload reads besides these.
    args.kfac_grid, args.budget, args.budget_scale = None, 1.0, 1.0
    args.eval_examples = 128 if args.quick else 5000
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every workload; write step_breakdown.{json,md}."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    env = environment(torch.device("cpu"))
    env["flush_denormal"] = True
    result: dict[str, Any] = {
        "command": command_line(__file__, argv),
        "environment": env,
        "seed": args.seed,
        "workloads": [measure(name, args) for name in args.workloads],
    }
    env["load_average_at_end"] = os.getloadavg()
    text = markdown(result)
    write_results(args.out, "step_breakdown", result, text)
    print(text)
    return result


if __name__ == "__main__":
    main()
