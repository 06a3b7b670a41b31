"""What `patches_per_dim` (a convolution's input factor from drawn patches) saves, and what it costs.

On the race's convnet (3x3 Conv2d+ReLU+MaxPool blocks of 16, 32 and 64 channels on 28x28 images,
then two Linear layers; batch 256), side by side in one run:

* the step of `torch_kfac.presets.adaptive` with every patch (`patches_per_dim=None`) and with
  `patches_per_dim` = 1 and 3, and Adam's, the configurations taking turns step by step;
* the A statistics alone: each convolution's `record_inputs` on the preset's Fisher sub-batch
  (its first 64 examples), exact and drawn;
* their error: ||A_drawn - A||_F / ||A||_F of one pass, the median over 20 draws, per layer.

Steps and statistics are timed with the process's CPU time on one thread (steadier on a shared
machine); results go to `benchmarks/results/patch_sampling.{json,md}`.

    python benchmarks/patch_sampling.py [--steps 20] [--values 1 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    Trainer,
    class_ce,
    command_line,
    convnet,
    make_trainer,
    synthetic_images,
    write_results,
)
from torch import nn

from torch_kfac import presets
from torch_kfac.blocks.conv import ConvBlock, patch_count, patch_view

#: Untimed steps: past the preset's warm-up (inverses every step), plus a few.
WARMUP = presets.ADAPTIVE["warmup_steps"] + 3


def conv_model(quick: bool) -> nn.Module:
    """The race's convnet (narrower channels with --quick)."""
    return convnet((4, 8, 8) if quick else (16, 32, 64))


def time_steps(values: list[float | None], steps: int, batch: int, quick: bool) -> dict[str, list[float]]:
    """CPU seconds of each step of Adam and of the preset at every `patches_per_dim`, taking turns."""
    x, y = synthetic_images(batch, seed=1)
    runs: list[tuple[str, Trainer]] = []
    for value in values:
        torch.manual_seed(0)
        trainer = make_trainer("kfac-auto", conv_model(quick), class_ce, {"patches_per_dim": value})
        runs.append((f"preset, patches_per_dim={value}", trainer))
    torch.manual_seed(0)
    runs.append(("adam", make_trainer("adam", conv_model(quick), class_ce, {"lr": 1e-2})))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for step in range(WARMUP + steps):
        for name, trainer in runs:
            start = time.process_time()
            trainer.step(x, y)
            if step >= WARMUP:
                times[name].append(time.process_time() - start)
    return times


def statistics_cost(values: list[float | None], reps: int, quick: bool) -> dict[str, dict[str, Any]]:
    """Per conv layer and `patches_per_dim`: the median CPU ms of its A statistic on 64 examples and
    the median relative Frobenius error of A over `reps` draws."""
    torch.manual_seed(0)
    model = conv_model(quick)
    x, _ = synthetic_images(presets.ADAPTIVE["fisher_batch_size"], seed=2)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out: dict[str, dict[str, Any]] = {}
    for name, layer_input in inputs.items():
        exact = None
        rows: dict[str, Any] = {}
        for value in values:
            block = ConvBlock(dict(model.named_modules())[name], name)
            block.configure()
            block.patches_per_dim = value
            seconds, errors = [], []
            for _ in range(reps):
                block.clear_pending()
                start = time.process_time()
                block.record_inputs((layer_input,))
                seconds.append(time.process_time() - start)
                a = block.pending("A")
                if exact is None:
                    exact = a.clone()
                errors.append(float(torch.linalg.matrix_norm(a - exact) / torch.linalg.matrix_norm(exact)))
            rows[str(value)] = {
                "ms": 1e3 * statistics.median(seconds),
                "relative_error": statistics.median(errors),
            }
        view = patch_view(layer_input, block.module)  # (N, C, O_1, O_2, K_1, K_2)
        out[name] = {
            "dim": exact.shape[-1],
            "patches": patch_count(view),
            **rows,
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the steps and the statistics, measure the error, write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--values", type=float, nargs="+", default=[1.0, 3.0], help="patches_per_dim")
    parser.add_argument("--reps", type=int, default=20, help="draws per layer for the statistics")
    parser.add_argument("--quick", action="store_true", help="narrow convnet, batch 32 (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    values: list[float | None] = [None, *args.values]
    times = time_steps(values, args.steps, 32 if args.quick else 256, args.quick)
    reference = statistics.median(times[f"preset, patches_per_dim={None}"])
    steps = {
        name: {
            "median_ms": 1e3 * statistics.median(t),
            "mean_ms": 1e3 * statistics.fmean(t),
            "median_over_exact": statistics.median(t) / reference,
        }
        for name, t in times.items()
    }
    stats = statistics_cost(values, args.reps, args.quick)
    result = {"command": command_line(__file__, argv), "steps": steps, "statistics": stats}
    lines = [
        "# Drawn patches for the convolutions' input factors (`patches_per_dim`)",
        "",
        f"Command: `{result['command']}`; torch {torch.__version__}, 1 thread, process CPU time.",
        "",
        f"Steps on the race's convnet, batch {32 if args.quick else 256}, {args.steps} timed steps each "
        f"after {WARMUP} untimed ones, the configurations taking turns:",
        "",
        "| configuration | median step (ms) | mean step (ms) | median / every patch |",
        "|---|---:|---:|---:|",
        *(
            f"| {n} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | {r['median_over_exact']:.3f} |"
            for n, r in steps.items()
        ),
        "",
        f"A statistics of one pass of {presets.ADAPTIVE['fisher_batch_size']} examples (the preset's "
        f"Fisher sub-batch): median CPU ms, and the median of ||A_drawn - A||_F / ||A||_F over "
        f"{args.reps} draws:",
        "",
        "| layer | d | patches | " + " | ".join(f"patches_per_dim={v}: ms (error)" for v in values) + " |",
        "|---|---:|---:|" + "---:|" * len(values),
        *(
            f"| {name} | {row['dim']} | {row['patches']} | "
            + " | ".join(f"{row[str(v)]['ms']:.2f} ({row[str(v)]['relative_error']:.3f})" for v in values)
            + " |"
            for name, row in stats.items()
        ),
        "",
    ]
    text = "\n".join(lines)
    write_results(args.out, "patch_sampling", result, text)
    print(text)
    return result


if __name__ == "__main__":
    main()
