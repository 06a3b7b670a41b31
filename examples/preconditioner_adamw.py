"""`KFACPreconditioner` in front of `torch.optim.AdamW` with a cosine learning-rate schedule.

The preconditioner replaces each Linear layer's gradient by (A (x) G + damping)^-1 grad; AdamW,
its weight decay and the scheduler are used exactly as without K-FAC. `--no-kfac` runs the same
loop with plain AdamW for comparison.

    python examples/preconditioner_adamw.py                 # Fashion-MNIST, MLP 784-256-128-10
    python examples/preconditioner_adamw.py --no-kfac       # the same without the preconditioner
    python examples/preconditioner_adamw.py --synthetic --steps 50
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
from models import mlp
from torch import nn

from torch_kfac import KFACPreconditioner


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=1000, batch_size=128)
    add_image_arguments(parser, DEFAULT_DATA_DIRS["fashion-mnist"], "Fashion-MNIST folder")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 128], help="hidden widths")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--damping", type=float, default=1e-2, help="K-FAC damping")
    parser.add_argument("--factor-update-steps", type=int, default=1)
    parser.add_argument("--inverse-update-steps", type=int, default=10)
    parser.add_argument("--no-kfac", action="store_true", help="plain AdamW (baseline)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, print the test accuracy, return the losses and the accuracy."""
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = image_split(args, load_fashion_mnist, 1, 28)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))

    model = mlp(image_size=28, hidden=args.hidden).to(device)
    pre = None
    if not args.no_kfac:
        pre = KFACPreconditioner(
            model,
            damping=args.damping,
            factor_update_steps=args.factor_update_steps,
            inverse_update_steps=args.inverse_update_steps,
        )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    loss_fn = nn.CrossEntropyLoss()
    batches = batch_indices(len(x_train), args.batch_size, torch.Generator().manual_seed(args.seed))
    losses: list[float] = []
    start = time.perf_counter()
    bar = progress(args.steps, args, "adamw" if pre is None else "k-fac + adamw")
    for step in bar:
        idx = next(batches).to(device)
        opt.zero_grad()
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        loss.backward()
        if pre is not None:
            pre.step()  # .grad <- (A (x) G + damping)^-1 .grad for every Linear layer
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, x_test, y_test)
    print(f"{args.steps} steps in {seconds:.1f}s, last loss {losses[-1]:.4f}, test accuracy {test_acc:.4f}")
    return {"losses": losses, "test_accuracy": test_acc, "seconds": seconds}


if __name__ == "__main__":
    run(main)
