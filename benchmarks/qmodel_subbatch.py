"""How far the quadratic model's learning rate and momentum on a sub-batch are from the whole batch's.

Trains `torch_kfac.presets.adaptive` with the quadratic model on the whole batch
(`qmodel_batch_size=None`) on the race's autoencoder (same data, initialization and batches as
`race.py`), and at every step also solves the model with its curvature on the batch's first m
examples, for the same directions, gradient and damping. Writes the median and 90th percentile of
|sub-batch / whole-batch - 1| for the learning rate and the momentum to
`benchmarks/results/qmodel_subbatch.{json,md}`.

    python benchmarks/qmodel_subbatch.py [--steps 60] [--sizes 64 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS_DIR, make_trainer, seeded
from race import batch_indices, get_batch, make_workload
from race import parse_args as race_args

from torch_kfac import optimizer
from torch_kfac.qmodel import ExactCurvature


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train on the whole batch's model; compare every step's coefficients with the sub-batches'."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = make_workload("autoencoder", race_args([]))
    with seeded(0):
        model = work.build()
    trainer = make_trainer("kfac-auto", model, work.loss_fn, {"qmodel_batch_size": None})
    opt = trainer.optimizer
    subs = {m: ExactCurvature(model, opt.loss_fn, m) for m in args.sizes}
    whole_solve = optimizer.choose_coefficients
    seen: dict[str, Any] = {}
    ratios: dict[int, list[np.ndarray]] = {m: [] for m in args.sizes}

    def gram(inputs: Any, targets: torch.Tensor, directions: Any) -> torch.Tensor:
        seen["subs"] = {m: c.gram(inputs, targets, directions) for m, c in subs.items()}
        return whole_gram(inputs, targets, directions)

    def solve(curvature: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:
        coeffs, q = whole_solve(curvature, *rest)
        if coeffs.numel() == 2:  # from the second step on: learning rate and momentum
            for m, sub in seen["subs"].items():
                scaled = sub * opt.preconditioner.grad_scale()  # as the optimizer scales the whole's
                ratios[m].append((whole_solve(scaled, *rest)[0] / coeffs).numpy())
        return coeffs, q

    assert opt._exact is not None
    whole_gram = opt._exact.gram
    opt._exact.gram = gram  # type: ignore[method-assign]
    optimizer.choose_coefficients = solve  # type: ignore[assignment]
    for rows in batch_indices(work, args.steps, 0):
        trainer.step(*get_batch(work, rows))
    rows_out = {}
    for m, values in ratios.items():
        err = np.abs(np.stack(values) - 1.0)
        rows_out[m] = {
            "lr_median": float(np.median(err[:, 0])),
            "lr_p90": float(np.percentile(err[:, 0], 90)),
            "momentum_median": float(np.median(err[:, 1])),
            "momentum_p90": float(np.percentile(err[:, 1], 90)),
            "steps": len(values),
        }
    command = "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:])
    lines = [
        f"Command: `{command.strip()}`: autoencoder, batch {work.batch_size}, the race's data and "
        f"batches; the preset trained with the whole batch's quadratic model for {args.steps} steps.",
        "",
        "| sub-batch | lr: median | lr: 90th pct | momentum: median | momentum: 90th pct | steps |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {m} | {r['lr_median']:.3f} | {r['lr_p90']:.3f} | {r['momentum_median']:.3f} "
        f"| {r['momentum_p90']:.3f} | {r['steps']} |"
        for m, r in rows_out.items()
    ]
    lines.append("")
    lines.append("Entries: |sub-batch value / whole-batch value - 1| over the steps.")
    out = RESULTS_DIR / "qmodel_subbatch"
    payload = {"command": command.strip(), "results": rows_out}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows_out


if __name__ == "__main__":
    main()
