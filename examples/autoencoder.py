"""The deep autoencoder of Martens & Grosse (2015) on Fashion-MNIST, with fully adaptive K-FAC.

784-1000-500-250-30-250-500-1000-784 with tanh units (the 30-unit code layer is linear), trained
on the sigmoid cross-entropy of the reconstruction, summed over pixels and averaged over the batch.
K-FAC picks its own learning rate and momentum from the exact quadratic model and adapts the
damping with the Levenberg-Marquardt rule: there is no learning rate to tune.

    python examples/autoencoder.py                         # /usr/share/datasets/fashion-mnist
    python examples/autoencoder.py --synthetic --steps 50  # no dataset needed
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch
from data import DEFAULT_DATA_DIRS, load_fashion_mnist
from example_utils import (
    add_common_arguments,
    add_image_arguments,
    batch_indices,
    image_split,
    pick_device,
    progress,
    run,
)
from torch import nn

from torch_kfac import KFAC

LAYERS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
"""Widths of the Martens & Grosse autoencoder."""


def autoencoder(widths: Sequence[int] = LAYERS) -> nn.Sequential:
    """tanh MLP autoencoder; the middle (code) layer and the output layer are linear."""
    code = len(widths) // 2
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(d_in, d_out))
        if i + 1 not in (code, len(widths) - 1):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


@torch.no_grad()
def reconstruction_error(model: nn.Module, images: torch.Tensor) -> float:
    """Squared error of the reconstructed pixels, summed over pixels, averaged over the images."""
    return (model(images).sigmoid() - images).square().sum(1).mean().item()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=1000, batch_size=1000)
    add_image_arguments(parser, DEFAULT_DATA_DIRS["fashion-mnist"], "Fashion-MNIST folder")
    parser.add_argument(
        "--widths", type=int, nargs="+", default=list(LAYERS), help="layer widths (first = last = 784)"
    )
    parser.add_argument("--damping", type=float, default=1.0, help="initial damping (adapted)")
    parser.add_argument("--inverse-update-steps", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, print the reconstruction error, return the per-step losses and statistics."""
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    images = image_split(args, load_fashion_mnist, 1, 28)[0]
    images = images.flatten(1).to(device)
    if images.shape[1] != args.widths[0] or args.widths[-1] != args.widths[0]:
        raise ValueError(f"--widths must start and end with {images.shape[1]}, got {args.widths}")

    model = autoencoder(args.widths).to(device)
    # Summed over pixels *and* examples; reduction='sum' tells K-FAC, which divides by the batch
    # size, so the curvature is that of the per-example loss averaged over the batch.
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    opt = KFAC(
        model,
        damping=args.damping,
        loss_fn=loss_fn,
        reduction="sum",
        adaptive_learning_rate=True,
        adaptive_momentum=True,
        adapt_damping=True,
        inverse_update_steps=args.inverse_update_steps,
    )
    sample = images[:2000]
    initial_error = reconstruction_error(model, sample)
    batches = batch_indices(len(images), args.batch_size, torch.Generator().manual_seed(args.seed))
    losses: list[float] = []
    stats: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = progress(args.steps, args, "autoencoder adaptive k-fac")
    for _ in bar:
        x = images[next(batches).to(device)]
        opt.zero_grad()
        loss = loss_fn(model(x), x)
        loss.backward()
        opt.step(loss=loss, batch=(x, x))
        losses.append(loss.item() / len(x))  # summed over pixels, averaged over the batch
        s = opt.last_stats
        stats.append(
            {k: float(s[k]) for k in ("learning_rate", "momentum", "damping") if s.get(k) is not None}
        )
        bar.set_postfix(loss=f"{losses[-1]:.2f}", **{k: f"{v:.3g}" for k, v in stats[-1].items()})
    seconds = time.perf_counter() - start
    error = reconstruction_error(model, sample)
    print(
        f"{args.steps} steps in {seconds:.1f}s: loss {losses[0]:.2f} -> {losses[-1]:.2f}, squared "
        f"reconstruction error {initial_error:.2f} -> {error:.2f}, final damping {opt.damping.item():.3g}"
    )
    return {
        "losses": losses,
        "stats": stats,
        "initial_reconstruction_error": initial_error,
        "reconstruction_error": error,
        "seconds": seconds,
    }


if __name__ == "__main__":
    run(main)
