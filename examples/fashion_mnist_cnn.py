"""A small CNN classifier on Fashion-MNIST trained with `torch_kfac.KFAC`.

python examples/fashion_mnist_cnn.py                       # /usr/share/datasets/fashion-mnist
python examples/fashion_mnist_cnn.py --fisher-type mc      # Monte-Carlo Fisher (sampled labels)
python examples/fashion_mnist_cnn.py --synthetic --steps 50  # no dataset needed
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from data import DEFAULT_DATA_DIRS, load_fashion_mnist
from example_utils import (
    accuracy,
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


def cnn(channels: Sequence[int] = (32, 64), hidden: int = 128, num_classes: int = 10) -> nn.Sequential:
    """Two 3x3 conv + ReLU + max-pool stages, 3x3 average pooling, then two Linear layers."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14x14
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7x7
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(c2 * 9, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=500, batch_size=128)
    add_image_arguments(parser, DEFAULT_DATA_DIRS["fashion-mnist"], "Fashion-MNIST folder")
    parser.add_argument("--channels", type=int, nargs=2, default=(32, 64), help="conv widths")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--norm-constraint", type=float, default=1e-2, help="bound on lr^2 g^T F^-1 g")
    parser.add_argument("--inverse-update-steps", type=int, default=10)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="learning rate")
    parser.add_argument("--fisher-type", choices=("empirical", "mc", "type-2"), default="empirical")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, print the test accuracy, return the losses and the accuracy."""
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = image_split(args, load_fashion_mnist, 1, 28)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))

    model = cnn(args.channels).to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(
        model,
        lr=args.lr,
        damping=args.damping,
        momentum=args.momentum,
        norm_constraint=args.norm_constraint,
        inverse_update_steps=args.inverse_update_steps,
        fisher_type=args.fisher_type,
        loss_fn=loss_fn,
    )
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
        if args.schedule == "cosine"
        else None
    )
    batches = batch_indices(len(x_train), args.batch_size, torch.Generator().manual_seed(args.seed))
    losses: list[float] = []
    start = time.perf_counter()
    bar = progress(args.steps, args, "cnn k-fac")
    for step in bar:
        idx = next(batches).to(device)
        x, y = x_train[idx], y_train[idx]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(batch=(x, y))  # the batch is used only by fisher_type 'mc' and 'type-2'
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, x_test, y_test)
    print(f"{args.steps} steps in {seconds:.1f}s, last loss {losses[-1]:.4f}, test accuracy {test_acc:.4f}")
    return {"losses": losses, "test_accuracy": test_acc, "seconds": seconds}


if __name__ == "__main__":
    run(main)
