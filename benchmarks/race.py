"""A side-by-side race to held-out loss targets: Adam, SGD, torch_kfac's adaptive preset and kfac-jax.

Every optimizer starts from the same PyTorch initialization and sees the same batch indices
(exported, with the initial weights, to the kfac-jax run on the autoencoder). Adam and SGD run a
small learning-rate grid (the best run counts); `torch_kfac.presets.adaptive` runs with no number
chosen; kfac-jax (when importable) runs with its own autoencoder example's settings. Each run
uses one CPU thread and trains for the same budget of seconds; the loss on held-out data is
evaluated about `--evals` times per run with the clock stopped.

The default clock is the process's CPU time, not wall time: on a machine shared with other
work, a process that waits for a core is not charged for the wait, so runs measured side by side
stay comparable (`--clock wall` for an idle machine).

Run from the repository root: ``python benchmarks/race.py`` (about 25 minutes of CPU time;
``--jobs 3`` runs three trainings at once). Results: benchmarks/results/race.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    FASHION_MNIST_DIR,
    RESULTS_DIR,
    TinyTransformerLM,
    Trainer,
    autoencoder,
    class_ce,
    command_line,
    convnet,
    environment,
    lm_batch,
    load_examples_data,
    machine_line,
    make_trainer,
    markov_corpus,
    pixel_bce,
    seeded,
    synthetic_images,
    token_ce,
    write_results,
)
from time_to_loss import evaluate, summarize
from torch import Tensor, nn

BENCH_DIR = Path(__file__).resolve().parent
WORKLOADS = ("autoencoder", "convnet", "transformer")


@dataclass
class RaceWorkload:
    """A model, training and held-out data, batch size, budget, grids and fixed targets."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    loss_fn: Callable[..., Tensor]
    train: tuple[Tensor, Tensor]
    eval_set: tuple[Tensor, Tensor]
    batch_size: int
    budget_s: float
    grids: dict[str, list[dict[str, Any]]]
    targets: list[float] = field(default_factory=list)
    #: Token stream for the language model (batches are windows of it, not rows of `train`).
    corpus: Tensor | None = None
    context: int = 0


def optimizer_grids(
    name: str, quick: bool, kfac_grid: list[dict[str, Any]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Adam's and SGD's learning-rate grids (around the best of time_to_loss.py), the preset's one run."""
    adam_lrs = {"autoencoder": (3e-4, 1e-3, 3e-3), "convnet": (1e-3, 3e-3, 1e-2), "transformer": (1e-3, 3e-3)}
    sgd_lrs = {"autoencoder": (1e-3, 3e-3), "convnet": (3e-2, 1e-1), "transformer": (1e-1, 3e-1)}
    if quick:
        adam_lrs = dict.fromkeys(WORKLOADS, (1e-3,))
        sgd_lrs = dict.fromkeys(WORKLOADS, (1e-2,))
    return {
        "adam": [{"lr": lr} for lr in adam_lrs[name]],
        "sgd": [{"lr": lr, "momentum": 0.9} for lr in sgd_lrs[name]],
        "kfac-auto": kfac_grid or [{}],
    }


def make_workload(name: str, args: argparse.Namespace) -> RaceWorkload:
    """Build one workload (its data are loaded or generated here, in the process that trains)."""
    quick = args.quick
    grids = optimizer_grids(name, quick, args.kfac_grid)
    default_budget = {"autoencoder": 60.0, "convnet": 30.0, "transformer": 30.0}[name]
    budget = args.budget or args.budget_scale * default_budget
    batch_size = getattr(args, "batch_size", None)  # scripts with parsers of their own have none
    if name == "transformer":
        cfg = (
            {"vocab": 32, "width": 32, "depth": 1, "heads": 2, "context": 16}
            if quick
            else {"vocab": 64, "width": 128, "depth": 2, "heads": 4, "context": 64}
        )
        corpus = markov_corpus(length=20_000 if quick else 400_000, vocab=cfg["vocab"])
        split = int(0.9 * corpus.tokens.numel())
        held_out = lm_batch(
            corpus.tokens[split:], 8 if quick else 64, cfg["context"], torch.Generator().manual_seed(1234)
        )
        return RaceWorkload(
            name,
            "causal transformer LM (vocab {vocab}, width {width}, {depth} blocks, {heads} heads, context "
            "{context}) on a synthetic order-2 Markov corpus (first 90 % for training, windows of the rest "
            "for evaluation), ".format(**cfg)
            + f"entropy rate {corpus.entropy_rate:.3f} nats",
            lambda: TinyTransformerLM(**cfg),
            token_ce,
            (corpus.tokens[:split], corpus.tokens[:split]),
            held_out,
            batch_size or (8 if quick else 32),
            budget,
            grids,
            [] if quick else [4.1, 4.0],
            corpus=corpus.tokens[:split],
            context=cfg["context"],
        )
    if quick:
        x, y = synthetic_images(640)
        x, y, x_eval, y_eval = x[:512], y[:512], x[512:], y[512:]
        source = "synthetic 28x28 images (512 train, 128 held out)"
    else:
        data = load_examples_data().load_fashion_mnist(FASHION_MNIST_DIR)
        x, y, x_eval, y_eval = data.x_train, data.y_train, data.x_test, data.y_test
        source = "Fashion-MNIST"
    n_eval = min(args.eval_examples, x_eval.shape[0])
    if name == "autoencoder":
        dims = (784, 64, 32, 8, 32, 64, 784) if quick else (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
        n_train = min(20_000, x.shape[0])
        flat, flat_eval = x[:n_train].flatten(1), x_eval[:n_eval].flatten(1)
        return RaceWorkload(
            name,
            f"{'-'.join(map(str, dims))} tanh autoencoder on {source} ({n_train} training images, "
            f"{n_eval} held-out images), sigmoid cross-entropy summed over pixels, mean over the batch",
            lambda: autoencoder(dims),
            pixel_bce,
            (flat, flat),
            (flat_eval, flat_eval),
            batch_size or (16 if quick else 250),
            budget,
            grids,
            [] if quick else [300.0, 250.0],
        )
    channels = (4, 8, 8) if quick else (16, 32, 64)
    return RaceWorkload(
        name,
        f"convnet ({channels} channels) classifier on {source} ({x.shape[0]} training images, {n_eval} "
        "held-out images), softmax cross-entropy",
        lambda: convnet(channels),
        class_ce,
        (x, y),
        (x_eval[:n_eval], y_eval[:n_eval]),
        batch_size or (16 if quick else 256),
        budget,
        grids,
        [] if quick else [0.5, 0.4],
    )


def batch_indices(work: RaceWorkload, steps: int, seed: int) -> np.ndarray:
    """The (steps, batch) row indices (or window starts) every optimizer trains on, in order."""
    gen = torch.Generator().manual_seed(seed + 1)
    high = work.corpus.numel() - work.context - 1 if work.corpus is not None else work.train[0].shape[0]
    return torch.randint(0, high, (steps, work.batch_size), generator=gen).numpy()


def get_batch(work: RaceWorkload, rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """The batch of step `rows` (image rows, or windows of the token stream starting there)."""
    idx = torch.from_numpy(rows)
    if work.corpus is not None:
        windows = work.corpus[idx[:, None] + torch.arange(work.context + 1)]
        return windows[:, :-1], windows[:, 1:]
    return work.train[0][idx], work.train[1][idx]


def make_clock(kind: str) -> Callable[[], float]:
    """The race clock: this process's CPU time ('cpu') or wall time ('wall')."""
    return time.process_time if kind == "cpu" else time.perf_counter


def prepare_run(
    name: str, kind: str, hparams: dict[str, Any], args: argparse.Namespace, seed: int, steps: int
) -> tuple[RaceWorkload, nn.Module, Trainer, np.ndarray]:
    """A worker's run as the race sets it up: one thread, flushed denormals, workload `name` (built
    with the race's `args`), the model initialized from `seed`, its trainer and `steps` batches."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    work = make_workload(name, args)
    with seeded(seed):
        model = work.build()
    return work, model, make_trainer(kind, model, work.loss_fn, hparams), batch_indices(work, steps, seed)


def train_torch(name: str, kind: str, hparams: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One torch run of `kind` on workload `name` under the budget (runs in a worker process)."""
    work, model, trainer, indices = prepare_run(name, kind, hparams, args, args.seed, args.max_steps)
    clock = make_clock(args.clock)
    curve: list[dict[str, float]] = []
    initial = evaluate(model, work.loss_fn, work.eval_set, args.eval_chunk)
    curve.append({"steps": 0, "seconds": 0.0, "loss": initial})
    interval = work.budget_s / args.evals
    train_s, steps, next_eval, diverged = 0.0, 0, interval, False
    # The random draws of training (the MC Fisher's labels) from the run's seed, not from whatever
    # the worker process ran before: a run is repeatable step for step.
    with seeded(args.seed):
        while train_s < work.budget_s and steps < len(indices):
            x, y = get_batch(work, indices[steps])
            t0 = clock()
            batch_loss = float(trainer.step(x, y))
            train_s += clock() - t0
            steps += 1
            if not math.isfinite(batch_loss) or batch_loss > 1e3 * max(abs(initial), 1.0):
                diverged = True
                break
            if train_s >= next_eval or train_s >= work.budget_s:
                curve.append(
                    {
                        "steps": steps,
                        "seconds": train_s,
                        "loss": evaluate(model, work.loss_fn, work.eval_set, args.eval_chunk),
                    }
                )
                next_eval += interval
    return finish_run(kind, {**hparams, "batch_size": work.batch_size}, steps, train_s, diverged, curve)


def finish_run(
    kind: str,
    hparams: dict[str, Any],
    steps: int,
    train_s: float,
    diverged: bool,
    curve: list[dict[str, float]],
) -> dict[str, Any]:
    """A run record in time_to_loss.py's format (what its `summarize` reads)."""
    losses = [p["loss"] for p in curve if math.isfinite(p["loss"])]
    return {
        "optimizer": kind,
        "hparams": hparams,
        "steps": steps,
        "train_seconds": train_s,
        "diverged": diverged,
        "final_loss": curve[-1]["loss"],
        "best_loss": min(losses) if losses else math.nan,
        "curve": curve,
    }


def kfac_jax_missing() -> str | None:
    """Why kfac-jax cannot run here (None if it can)."""
    missing = [m for m in ("jax", "kfac_jax") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"kfac-jax skipped: {', '.join(missing)} not importable "
            "(pip install -c <(echo torch==2.13.0) kfac-jax 'jax[cpu]==0.8.2' dm-haiku optax)"
        )
    return None


def train_kfac_jax(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Export the initial weights and batch indices, and run race_kfac_jax.py on them."""
    work = make_workload(name, args)
    with seeded(args.seed):
        model = work.build()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    arrays: dict[str, Any] = {
        "x_train": work.train[0].numpy(),
        "x_eval": work.eval_set[0].numpy(),
        "indices": batch_indices(work, args.max_steps, args.seed),
        "n_layers": np.array(len(linears)),
        "config": np.array(
            json.dumps(
                {
                    "budget_s": work.budget_s,
                    "evals": args.evals,
                    "eval_chunk": args.eval_chunk,
                    "clock": args.clock,
                    "seed": args.seed,
                }
            )
        ),
    }
    for i, lin in enumerate(linears):
        arrays[f"w{i}"] = lin.weight.detach().numpy()
        arrays[f"b{i}"] = lin.bias.detach().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.npz", Path(tmp) / "out.json"
        np.savez(src, **arrays)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(BENCH_DIR / "race_kfac_jax.py"), str(src), str(out)]
        subprocess.run(cmd, check=True, env=env)
        run = json.loads(out.read_text())
    losses = [p["loss"] for p in run["curve"] if math.isfinite(p["loss"])]
    run["final_loss"] = run["curve"][-1]["loss"]
    run["best_loss"] = min(losses) if losses else math.nan
    return run


def run_job(job: tuple[str, str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any] | str:
    """One (workload, optimizer, hyperparameters) job; kfac-jax in its own subprocess, whose failure
    (an incompatible jax, say) is returned as a note instead of ending the race."""
    name, kind, hparams = job
    if kind == "kfac-jax":
        try:
            run = train_kfac_jax(name, args)
        except subprocess.CalledProcessError as err:
            note = f"kfac-jax failed (exit status {err.returncode}; its traceback is in the race's output)"
            print(note, flush=True)
            return note
    else:
        run = train_torch(name, kind, hparams, args)
    run["workload"] = name
    print(f"{name} {kind} {hparams}: {run['steps']} steps, best {run['best_loss']:.4g}", flush=True)
    return run


# ------------------------------------------------------------------------------------- reporting
def loss_at(run: dict[str, Any], seconds: float) -> float:
    """Eval loss at the last evaluation at or before `seconds` of training."""
    before = [p["loss"] for p in run["curve"] if p["seconds"] <= seconds + 1e-9]
    return before[-1] if before else math.nan


def best_run(work: dict[str, Any], optimizer: str) -> dict[str, Any]:
    """The run of `optimizer` that the workload's summary counts as its best."""
    hparams = work["summary"]["best"][optimizer]["hparams"]
    return next(r for r in work["runs"] if r["optimizer"] == optimizer and r["hparams"] == hparams)


def markdown(result: dict[str, Any]) -> str:
    """Per workload: each optimizer's best run, its time and steps to every target, its loss at the budget."""
    env = result["environment"]
    lines = [
        "# Race: time and steps to held-out loss targets",
        "",
        f"Command: `{result['command']}`",
        "",
        machine_line(env),
        "",
        f"Clock: {'process CPU time' if result['clock'] == 'cpu' else 'wall time'}; one thread per run; "
        f"{result['jobs']} run(s) at a time. Every optimizer starts from the same initialization and "
        "trains on the same batches, its random draws (kfac-auto's sampled labels) seeded per run; the "
        "held-out loss is evaluated with the clock stopped about "
        f"{result['evals']} times per run (a target counts at the first evaluation at or below it). "
        "Adam and SGD: best run of the learning-rate grid; kfac-auto: `torch_kfac.presets.adaptive(model, "
        "loss_fn)`, nothing tuned; kfac-jax: its autoencoder example's settings.",
        "",
    ]
    for work in result["workloads"]:
        s = work["summary"]
        lines += [
            f"## {work['name']} (budget {work['budget_s']:g} s per run)",
            "",
            work["description"] + ".",
            "",
        ]
        names = [t["name"] for t in s["targets"]]
        header = "| optimizer | config | ms/step | loss at budget | " + " | ".join(
            f"to {t['loss']:.4g} ({n}): s (steps)" for n, t in zip(names, s["targets"], strict=True)
        )
        lines += [header + " |", "|---|---|---:|---:|" + "---:|" * len(names)]
        for opt, rec in s["best"].items():
            run = best_run(work, opt)
            hp = ", ".join(f"{k}={v}" for k, v in rec["hparams"].items() if isinstance(v, (int, float, str)))
            cells = []
            for n in names:
                hit = rec["to_target"][n]
                cells.append(f"{hit['seconds']:.1f} ({hit['steps']})" if hit else "not reached")
            lines.append(
                f"| {opt} | {hp} | {rec['ms_per_step']:.0f} | {loss_at(run, work['budget_s']):.4g} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
        for other in ("adam", "kfac-jax"):
            if other not in s["best"] or "kfac-auto" not in s["best"]:
                continue
            ratios = []
            for n in names:
                a, k = s["best"]["kfac-auto"]["to_target"][n], s["best"][other]["to_target"][n]
                ratios.append(
                    f"{n}: {a['seconds'] / k['seconds']:.2f}" if a and k and k["seconds"] > 0 else f"{n}: n/a"
                )
            lines.append(f"kfac-auto's time / {other}'s time: {', '.join(ratios)}.")
        for note in work.get("notes", []):
            lines.append(f"\n{note}")
        lines += ["", "All runs (* diverged):", "", "| optimizer | config | steps | best loss | final loss |"]
        lines.append("|---|---|---:|---:|---:|")
        for run in work["runs"]:
            hp = ", ".join(f"{k}={v}" for k, v in run["hparams"].items() if isinstance(v, (int, float, str)))
            mark = "*" if run["diverged"] else ""
            lines.append(
                f"| {run['optimizer']}{mark} | {hp} | {run['steps']} | {run['best_loss']:.4g} "
                f"| {run['final_loss']:.4g} |"
            )
        lines.append("")
    lines.append(f"Plot: `{result['plot']}`.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out loss against seconds and steps, the best run of each optimizer, one row per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = result["workloads"]
    fig, axes = plt.subplots(len(works), 2, figsize=(12, 4 * len(works)), squeeze=False)
    colors = {"adam": "tab:blue", "sgd": "tab:green", "kfac-auto": "tab:red", "kfac-jax": "tab:orange"}
    for row, work in enumerate(works):
        for opt in work["summary"]["best"]:
            run = best_run(work, opt)
            curve = [p for p in run["curve"] if math.isfinite(p["loss"])]
            for col, key in enumerate(("seconds", "steps")):
                axes[row, col].plot(
                    [p[key] for p in curve], [p["loss"] for p in curve], color=colors.get(opt, "k"), label=opt
                )
        finite = [p["loss"] for r in work["runs"] for p in r["curve"] if math.isfinite(p["loss"])]
        for col, key in enumerate(("seconds", "steps")):
            ax = axes[row, col]
            for t in work["summary"]["targets"]:
                ax.axhline(t["loss"], color="gray", linestyle=":", linewidth=0.8)
            if finite:
                lo, hi = min(finite), sorted(finite)[int(0.8 * (len(finite) - 1))]
                ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
            ax.set_title(f"{work['name']}: held-out loss vs {key}")
            ax.set_xlabel(f"training {key}" + (f" ({result['clock']} time)" if key == "seconds" else ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[row, 1].set_xscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--optimizers", nargs="+", default=["adam", "sgd", "kfac-auto", "kfac-jax"])
    parser.add_argument("--budget", type=float, help="seconds per run (default: autoencoder 60, others 30)")
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply the default budgets (a loaded machine)"
    )
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--evals", type=int, default=30, help="held-out evaluations per run")
    parser.add_argument("--eval-examples", type=int, default=5000)
    parser.add_argument("--eval-chunk", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=20_000, help="length of the exported batch sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size", type=int, help="examples (windows) per batch (default: the workload's own)"
    )
    parser.add_argument(
        "--kfac-grid",
        type=json.loads,
        help="KFAC options overriding the preset, a JSON list of runs (default: [{}], the preset as is)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (each on one thread)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, synthetic data, 1 s per run (tests)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.budget = args.budget or 1.0
        args.evals = min(args.evals, 4)
        args.eval_examples = min(args.eval_examples, 128)
        args.max_steps = min(args.max_steps, 2000)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every job, summarize per workload, write race.{json,md,png}."""
    args = parse_args(argv)
    env = environment(torch.device("cpu"))
    env["torch_threads"] = 1
    env["flush_denormal"] = True
    jax_missing = kfac_jax_missing() if "kfac-jax" in args.optimizers else None
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for name in args.workloads:
        grids = optimizer_grids(name, args.quick, args.kfac_grid)
        for kind in args.optimizers:
            if kind == "kfac-jax":
                if name == "autoencoder" and jax_missing is None:
                    jobs.append((name, kind, {}))
                continue
            jobs += [(name, kind, h) for h in grids.get(kind, [])]
    if jax_missing:
        print(jax_missing, flush=True)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            done = list(pool.map(run_job, jobs, [args] * len(jobs)))
    else:
        done = [run_job(job, args) for job in jobs]
    runs = [run for run in done if not isinstance(run, str)]
    failures = [run for run in done if isinstance(run, str)]
    result: dict[str, Any] = {
        "command": command_line(__file__, argv),
        "environment": env,
        "clock": args.clock,
        "seed": args.seed,
        "jobs": args.jobs,
        "evals": args.evals,
        "workloads": [],
    }
    for name in args.workloads:
        work = make_workload(name, args)
        mine = [r for r in runs if r["workload"] == name]
        notes = [*([jax_missing] if jax_missing else []), *failures] if name == "autoencoder" else []
        result["workloads"].append(
            {
                "name": name,
                "description": work.description,
                "budget_s": work.budget_s,
                "runs": mine,
                "notes": notes,
                "summary": summarize(work.targets, work.budget_s, mine),
            }
        )
    env["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "race.png"
    result["plot"] = str(png.relative_to(RESULTS_DIR.parent.parent)) if args.out == RESULTS_DIR else str(png)
    plot(result, png)
    text = markdown(result)
    write_results(args.out, "race", result, text)
    print(text)
    return result


if __name__ == "__main__":
    main()
