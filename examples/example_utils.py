"""Helpers shared by the example scripts: common options, device choice, batches, synthetic data."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm


def add_common_arguments(parser: argparse.ArgumentParser, steps: int, batch_size: int) -> None:
    """Add --steps, --batch-size, --device, --seed and --no-progress to an example's parser."""
    parser.add_argument("--steps", type=int, default=steps, help="optimization steps")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="examples per step")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda:0', ...")
    parser.add_argument("--seed", type=int, default=0, help="random seed (model init and batches)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_image_arguments(parser: argparse.ArgumentParser, data_dir: str, what: str) -> None:
    """Add --data-dir (default `data_dir`), --synthetic and --synthetic-size to an image example."""
    parser.add_argument("--data-dir", default=data_dir, help=what)
    parser.add_argument("--synthetic", action="store_true", help="random template images instead of data")
    parser.add_argument("--synthetic-size", type=int, default=2048, help="training images with --synthetic")


def image_split(
    args: argparse.Namespace, load: Callable[[str], Any], channels: int, size: int, test_size: int = 512
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): `load(args.data_dir)`'s splits, or synthetic images."""
    if args.synthetic:
        x, y = synthetic_images(args.synthetic_size + test_size, channels, size, seed=args.seed)
        return x[:-test_size], y[:-test_size], x[-test_size:], y[-test_size:]
    data = load(args.data_dir)
    return data.x_train, data.y_train, data.x_test, data.y_test


def pick_device(name: str) -> torch.device:
    """The device named by --device; 'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def progress(steps: int, args: argparse.Namespace, desc: str) -> tqdm:
    """A tqdm progress bar over range(steps), hidden with --no-progress."""
    return tqdm(range(steps), desc=desc, disable=args.no_progress, dynamic_ncols=True)


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled mini-batches of indices into n examples (epoch after epoch)."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def synthetic_images(
    n: int, channels: int, size: int, num_classes: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Images in [0, 1]: a fixed smooth random template per class plus pixel noise, and labels.

    The templates are random 4x4 patterns upsampled to the image size, so that convolutional and
    pooling layers see them as well as fully connected ones do.
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
    templates = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    noise = torch.rand(n, channels, size, size, generator=gen)
    return (0.6 * templates[labels] + 0.4 * noise).clamp(0, 1), labels


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification accuracy of `model` on (x, y), in eval mode, without recording statistics."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return correct / max(len(x), 1)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN for an empty sequence)."""
    return sum(values) / len(values) if values else math.nan


def summary(losses: Sequence[float], window: int = 10) -> tuple[float, float]:
    """Mean loss of the first and of the last `window` steps."""
    k = max(1, min(window, len(losses) // 2))
    return mean(losses[:k]), mean(losses[-k:])


def run(main: Callable[[], Any]) -> None:
    """Run an example's `main()` from the command line; a missing dataset exits with its message."""
    try:
        main()
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
