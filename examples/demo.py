"""K-FAC versus Adam on small image classifiers, each given the same training-time budget.

Run ``python examples/demo.py`` (scikit-learn's bundled digits, ~15 s on a laptop CPU) or
``python examples/demo.py --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist``.

For each model, every optimizer trains a copy of the same initial network on the same sequence
of mini-batches until its own clock, which counts only the optimization steps (forward, backward,
``step``) and never the evaluations, reaches the budget. The runs advance in turns, always the one
whose clock is behind, so that a busy machine slows them alike. The table reports the loss on the
whole training set at the budget, the test accuracy, the steps taken and the seconds each needed to
reach a common target loss (by default Adam's loss at the budget), with the ratio K-FAC/Adam.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from data import DATASETS, Dataset, load_dataset
from example_utils import batch_indices
from models import MODELS
from torch import nn
from tqdm import tqdm

OPTIMIZERS = ("kfac", "adam")
"""Optimizers compared by the demo, in the order they take turns."""

KFAC_HPARAMS: dict[str, dict[str, float | int | None]] = {
    "mlp": {
        "lr": 0.3,
        "damping": 0.03,
        "momentum": 0.9,
        "norm_constraint": None,
        "cov_ema_decay": 0.95,
        "factor_update_steps": 10,
        "inverse_update_steps": 10,
    },
    "cnn": {
        "lr": 0.03,
        "damping": 0.03,
        "momentum": 0.9,
        "norm_constraint": 1e-2,
        "cov_ema_decay": 0.95,
        "factor_update_steps": 10,
        "inverse_update_steps": 10,
    },
}
"""The K-FAC configuration the demo races, per model: the one place to change it.

The best measured on digits at batch 256 for equal training time. Factors and inverses are
refreshed every 10 steps after the library's 20-step warm-up (every step), which makes a step
~2x cheaper than refreshing every step (the settings tuned for 150 equal steps: MLP lr 0.2, CNN
norm_constraint 1e-3, both refreshed every step) at little loss per step. Against those, on
seed 0 (loss on the training set): the MLP with lr 0.3 reaches 3.3e-5 after 100 steps instead of
1.0e-4, and 4.8e-6 after 1000 instead of 1.4e-5; the CNN with the norm constraint at 1e-2 reaches
7.9e-6 after 120 steps instead of 1.9e-4, and 2.5e-6 after 300 instead of 3.7e-5 (checked on
seeds 1-3). Early on the factors change by orders of magnitude (the output-gradient factor of
the CNN's first layer grows ~1000x), which the warm-up follows; without it the CNN diverges with
inverse_update_steps=10 unless the learning rate is tiny.
"""

ADAM_LR: dict[str, float] = {"mlp": 3e-2, "cnn": 3e-2}
"""Adam learning rates: the best final training loss on digits over the grid 1e-3, 3e-3, 1e-2,
3e-2, 1e-1, both at 150 equal steps (batch 256, seeds 0-7; 1e-1 is worse or diverges) and at
equal time (2 s races of the whole grid, seeds 0-2; and after 4000 MLP or 800 CNN steps, where
3e-2 still beats 1e-2 by 3x)."""

DEFAULT_BUDGET = {"digits": 2.0}
"""Training seconds per optimizer and model by dataset; other datasets get ``OTHER_BUDGET``."""

OTHER_BUDGET = 30.0
"""Training seconds per optimizer and model for the 28x28 datasets."""

CURVE_POINTS = 40
"""Training-loss evaluations per run, evenly spaced in training time (the plot and time to target)."""

CURVE_SUBSET = 5000
"""Training examples used for the loss curve (the loss at the budget uses the whole training set)."""


@dataclass
class RunResult:
    """Outcome of one training run."""

    optimizer: str
    model: str
    steps: int
    seconds: float
    final_train_loss: float
    test_accuracy: float
    last_step_seconds: float = 0.0
    curve_seconds: list[float] = field(default_factory=list)
    curve_loss: list[float] = field(default_factory=list)

    @property
    def ms_per_step(self) -> float:
        """Mean wall-clock milliseconds per optimization step."""
        return 1000.0 * self.seconds / max(self.steps, 1)


def _kfac_class() -> type[torch.optim.Optimizer]:
    """Import ``torch_kfac.KFAC``, falling back to this checkout's ``src`` folder."""
    try:
        from torch_kfac import KFAC
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from torch_kfac import KFAC
    return KFAC


def make_optimizer(
    name: str,
    model: nn.Module,
    model_name: str,
    hparams: Mapping[str, float | int | None] | None = None,
) -> torch.optim.Optimizer:
    """Build the named optimizer: the demo's hyperparameters for ``model_name``, or ``hparams``."""
    if name == "kfac":
        kwargs = dict(KFAC_HPARAMS[model_name]) if hparams is None else dict(hparams)
        return _kfac_class()(model, **kwargs)
    if name == "adam":
        kwargs = {"lr": ADAM_LR[model_name]} if hparams is None else dict(hparams)
        return torch.optim.Adam(model.parameters(), **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        target = y[i : i + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == target).sum().item())
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


class Run:
    """One optimizer training a fresh model: its batches, its step count and its training clock."""

    def __init__(
        self,
        optimizer_name: str,
        model_name: str,
        data: Dataset,
        *,
        batch_size: int,
        seed: int,
        hparams: Mapping[str, float | int | None] | None = None,
    ) -> None:
        torch.manual_seed(seed)
        self.model = MODELS[model_name](image_size=data.image_size, num_classes=data.num_classes)
        self.optimizer = make_optimizer(optimizer_name, self.model, model_name, hparams)
        self.batches: Iterator[torch.Tensor] = batch_indices(
            len(data.x_train), batch_size, torch.Generator().manual_seed(seed)
        )
        self.data = data
        self.result = RunResult(optimizer_name, model_name, 0, 0.0, math.nan, math.nan)

    def step(self) -> None:
        """One optimization step on the next batch, its time added to the clock."""
        idx = next(self.batches)
        start = time.perf_counter()
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(self.data.x_train[idx]), self.data.y_train[idx]).backward()
        self.optimizer.step()
        self.result.last_step_seconds = time.perf_counter() - start
        self.result.seconds += self.result.last_step_seconds
        self.result.steps += 1

    def record_curve(self) -> None:
        """Append the current training loss (on the first ``CURVE_SUBSET`` examples) to the curve."""
        x, y = self.data.x_train[:CURVE_SUBSET], self.data.y_train[:CURVE_SUBSET]
        self.result.curve_seconds.append(self.result.seconds)
        self.result.curve_loss.append(evaluate(self.model, x, y)[0])

    def finish(self) -> RunResult:
        """Evaluate the loss on the whole training set and the test accuracy; return the result."""
        self.result.final_train_loss = evaluate(self.model, self.data.x_train, self.data.y_train)[0]
        self.result.test_accuracy = evaluate(self.model, self.data.x_test, self.data.y_test)[1]
        return self.result


def race(
    runs: Sequence[Run],
    *,
    budget: float | None = None,
    steps: int | None = None,
    curve_points: int = CURVE_POINTS,
    progress: bool = True,
    desc: str = "",
) -> list[RunResult]:
    """Train ``runs`` in turns until each has used ``budget`` training seconds or taken ``steps`` steps.

    The run furthest behind (its fraction of the limit) always steps next, so the runs share the
    machine's slow and fast moments. A run stops at the first step that takes it to the limit: with
    a budget, its training time ends within one step's time past the budget. The loss curve is
    recorded at ``curve_points`` evenly spaced fractions of the limit, outside the clock.
    """
    if budget is None and steps is None:
        raise ValueError("race needs a budget (seconds) or a number of steps")
    if (budget is not None and budget <= 0) or (steps is not None and steps < 1):
        raise ValueError(f"budget must be positive and steps at least 1, got {budget=} and {steps=}")

    def fraction(run: Run) -> float:
        """How much of its limit the run has used (1 or more: done)."""
        r = run.result
        return max(
            r.seconds / budget if budget is not None else 0.0, r.steps / steps if steps is not None else 0.0
        )

    marks = max(curve_points - 1, 1)
    next_mark = [1] * len(runs)
    for run in runs:
        run.record_curve()
    bar = tqdm(total=100, desc=desc, unit="%", disable=not progress, leave=False, dynamic_ncols=True)
    active = list(range(len(runs)))
    while active:
        i = min(active, key=lambda k: fraction(runs[k]))
        runs[i].step()
        done = fraction(runs[i])
        if done >= 1.0:
            active.remove(i)
            runs[i].record_curve()  # the last point: the state the table reports
        elif done >= next_mark[i] / marks:
            runs[i].record_curve()
            next_mark[i] = math.floor(done * marks) + 1
        bar.update(int(100 * min(1.0, *(fraction(run) for run in runs))) - bar.n)
    bar.close()
    return [run.finish() for run in runs]


def train(
    optimizer_name: str,
    model_name: str,
    data: Dataset,
    *,
    batch_size: int,
    budget: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    curve_points: int = CURVE_POINTS,
    hparams: Mapping[str, float | int | None] | None = None,
) -> RunResult:
    """Train a fresh ``model_name`` with ``optimizer_name`` alone, for ``budget`` seconds or ``steps``."""
    run = Run(optimizer_name, model_name, data, batch_size=batch_size, seed=seed, hparams=hparams)
    desc = f"{optimizer_name:>4} {model_name}"
    return race([run], budget=budget, steps=steps, curve_points=curve_points, progress=progress, desc=desc)[0]


def time_to_target(result: RunResult, target: float) -> float | None:
    """Training seconds at which the loss curve first reaches ``target``; None if it never does.

    Between the last point above the target and the first at or below it the log-loss is
    interpolated linearly in time.
    """
    points = list(zip(result.curve_seconds, result.curve_loss, strict=True))
    for k, (seconds, loss) in enumerate(points):
        if loss <= target:
            if k == 0:
                return seconds
            t0, l0 = points[k - 1]
            if loss <= 0.0:
                return seconds
            weight = math.log(l0 / target) / math.log(l0 / loss)
            return t0 + weight * (seconds - t0)
    return None


def adam_targets(results: Sequence[RunResult]) -> dict[str, float]:
    """Target loss per model: Adam's training loss at the budget (the last point of its curve)."""
    return {r.model: r.curve_loss[-1] for r in results if r.optimizer == "adam"}


def _ratio_cell(seconds: float | None, adam_seconds: float | None) -> str:
    """K-FAC's time to target over Adam's; n/a without an Adam time (or Adam's is 0: no progress)."""
    if seconds is None:
        return "not reached"
    return f"{seconds / adam_seconds:.2f}" if adam_seconds else "n/a"


def format_table(results: Sequence[RunResult], targets: Mapping[str, float]) -> str:
    """Plain-text summary table of the runs, with each one's time to its model's target loss."""
    header = (
        "optimizer",
        "model",
        "steps",
        "ms/step",
        "seconds",
        "train loss",
        "test acc",
        "target",
        "s to target",
        "K-FAC/Adam",
    )
    reached = {(r.optimizer, r.model): time_to_target(r, targets[r.model]) for r in results}
    rows = []
    for r in results:
        seconds = reached[r.optimizer, r.model]
        adam = reached.get(("adam", r.model))
        ratio = "-" if r.optimizer != "kfac" else _ratio_cell(seconds, adam)
        rows.append(
            (
                r.optimizer,
                r.model,
                str(r.steps),
                f"{r.ms_per_step:.2f}",
                f"{r.seconds:.2f}",
                f"{r.final_train_loss:.2e}",
                f"{100 * r.test_accuracy:.2f}%",
                f"{targets[r.model]:.2e}",
                "not reached" if seconds is None else f"{seconds:.2f}",
                ratio,
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        """One row: text columns left-aligned, numbers right-aligned."""
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def plot(results: Sequence[RunResult], targets: Mapping[str, float], out: Path, title: str) -> Path:
    """Save training loss against training seconds, one subplot per model, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(model_names), figsize=(5.5 * len(model_names), 4.2), squeeze=False)
    colors = {"kfac": "tab:red", "adam": "tab:blue"}
    labels = {"kfac": "K-FAC", "adam": "Adam"}
    for ax, model_name in zip(axes[0], model_names, strict=True):
        for r in results:
            if r.model != model_name:
                continue
            ax.plot(
                r.curve_seconds,
                r.curve_loss,
                marker=".",
                color=colors.get(r.optimizer),
                label=f"{labels.get(r.optimizer, r.optimizer)} ({r.steps} steps, "
                f"{r.ms_per_step:.1f} ms/step)",
            )
        ax.axhline(targets[model_name], color="gray", linestyle="--", linewidth=1, label="target loss")
        ax.set_yscale("log")
        ax.set_title(model_name.upper())
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel("training loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the raw IDX files (fashion-mnist defaults to "
        "/usr/share/datasets/fashion-mnist, mnist to data/mnist)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"training seconds per optimizer and model (default: {DEFAULT_BUDGET['digits']:g} for "
        f"digits, {OTHER_BUDGET:g} otherwise)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="training loss whose time to reach is reported (default: Adam's loss at the budget)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: demo_results/DATASET.png)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: comparable timings, and the digits' tiny steps gain "
        "nothing from more)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """Race K-FAC and Adam on every model, print a summary table and save the loss plot."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET.get(args.dataset, OTHER_BUDGET)
    if budget <= 0:
        raise SystemExit(f"--budget must be positive, got {budget:g}")
    out = args.out if args.out is not None else Path("demo_results") / f"{args.dataset}.png"
    data = load_dataset(args.dataset, args.data_dir)
    print(
        f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} test images, batch "
        f"{args.batch_size}, {budget:g} s of training per optimizer and model, torch threads: "
        f"{torch.get_num_threads()}"
    )
    results: list[RunResult] = []
    for model_name in args.models:
        runs = [Run(opt, model_name, data, batch_size=args.batch_size, seed=args.seed) for opt in OPTIMIZERS]
        results += race(runs, budget=budget, progress=not args.no_progress, desc=model_name)
    targets = adam_targets(results) if args.target is None else dict.fromkeys(args.models, args.target)
    what = "Adam's training loss at the budget" if args.target is None else "--target"
    print(f"target: {what}; K-FAC/Adam: ratio of the seconds to reach it")
    print(format_table(results, targets))
    title = f"{data.name}: {budget:g} s of training each, batch {args.batch_size}, seed {args.seed}"
    print(f"plot saved to {plot(results, targets, out, title)}")
    return results


if __name__ == "__main__":
    main()
