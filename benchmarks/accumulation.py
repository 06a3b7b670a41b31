"""The adaptive preset under gradient accumulation against the same batches in one pass.

`torch_kfac.presets.adaptive` trains the race's workloads (`race.py`: same data, initialization and
batches) for a fixed number of steps, twice: each batch in one pass with `opt.step(loss=loss,
batch=batch)`, and each batch split into `--micro` equal micro-batches, every loss back-propagated
at its share, then a bare `opt.step()` with `accumulated_passes='last'` (the quadratic model, the
MC Fisher's own pass and the damping's loss change then use the last micro-batch). The held-out
loss every `--every` steps shows what estimating the curvature on a micro-batch costs in progress
per step. Results: benchmarks/results/accumulation.{json,md}.

    python benchmarks/accumulation.py [--workloads autoencoder convnet] [--steps 80] [--micro 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from common import RESULTS_DIR, command_line, environment, machine_line, make_trainer, seeded, write_results
from race import WORKLOADS, RaceWorkload, batch_indices, get_batch, make_workload
from race import parse_args as race_args
from time_to_loss import evaluate


def train(work: RaceWorkload, micro: int, steps: int, every: int, seed: int) -> list[float]:
    """Held-out losses at steps 0, every, 2 every, ... of the preset on `work`: each batch in one
    pass (`micro` 1) or in `micro` accumulated micro-batches with a bare step."""
    with seeded(seed):
        model = work.build()
    last = {"accumulated_passes": "last"} if micro > 1 else {}
    trainer = make_trainer("kfac-auto", model, work.loss_fn, last)  # the race's preset
    opt, loss_fn = trainer.optimizer, trainer.module
    losses = [evaluate(model, work.loss_fn, work.eval_set, 1000)]
    with seeded(seed):
        for step, rows in enumerate(batch_indices(work, steps, seed), start=1):
            x, y = get_batch(work, rows)
            opt.zero_grad()
            if micro == 1:
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step(loss=loss, batch=(x, y))
            else:
                for xi, yi in zip(x.chunk(micro), y.chunk(micro), strict=True):
                    # 'sum' adds the micro-batches' sums; the means are weighted by their share
                    share = 1.0 if trainer.sums else xi.shape[0] / x.shape[0]
                    (loss_fn(model(xi), yi) * share).backward()
                opt.step()
            if step % every == 0:
                losses.append(evaluate(model, work.loss_fn, work.eval_set, 1000))
    return losses


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train each workload in one pass and accumulated; write the losses side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["autoencoder", "convnet"], choices=WORKLOADS)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--micro", type=int, default=2, help="micro-batches per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the race's tiny workloads (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # every run on one thread, as the race's
    result: dict[str, Any] = {
        "command": command_line(__file__, argv if argv is not None else sys.argv[1:]),
        "environment": environment(torch.device("cpu")),
        "steps": args.steps,
        "micro": args.micro,
        "workloads": {},
    }
    lines = [
        "# The adaptive preset under gradient accumulation",
        "",
        f"Command: `{result['command']}`",
        "",
        machine_line(result["environment"]),
        "",
        f"Held-out loss of `presets.adaptive` every {args.every} steps, seed {args.seed}: each batch "
        f"in one pass, and in {args.micro} accumulated micro-batches with a bare `opt.step()` and "
        "`accumulated_passes='last'` (curvature and loss change on the last micro-batch).",
        "",
    ]
    for name in args.workloads:
        work = make_workload(name, race_args(["--quick"] if args.quick else []))
        runs = {mode: train(work, m, args.steps, args.every, args.seed) for mode, m in
                (("one pass", 1), (f"{args.micro} micro-batches", args.micro))}  # fmt: skip
        result["workloads"][name] = runs
        header = " | ".join(f"step {i * args.every}" for i in range(len(next(iter(runs.values())))))
        lines += [f"## {name}", "", f"| batch | {header} |", "|---|" + "---:|" * (header.count("|") + 1)]
        lines += [f"| {mode} | " + " | ".join(f"{v:.4g}" for v in vs) + " |" for mode, vs in runs.items()]
        lines.append("")
    write_results(args.out, "accumulation", result, "\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
