"""The API of the original torch_kfac port: tracking contexts, `step(loss=...)`, manual factor updates.

Two loops on the same MLP (Fashion-MNIST, or synthetic images with --synthetic):

* `--loop tracked` (the port's README loop): statistics are recorded only inside
  `track_forward()` / `track_backward()`, and `step(loss=loss)` hands the loss to the
  Levenberg-Marquardt damping rule (`adapt_damping=True`), which compares it with the loss the
  last step's quadratic model predicted.
* `--loop manual-mc`: `update_cov_manually=True` and a Monte-Carlo Fisher by hand: a backward
  pass on labels sampled from the model's own predictive distribution is tracked and folded into
  the factors with `update_cov()`; the gradient for the step comes from an untracked backward
  pass on the true labels.

    python examples/original_api.py --loop tracked
    python examples/original_api.py --loop manual-mc --synthetic --steps 50
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
from torch import Tensor, nn

from torch_kfac import KFAC


def tracked_step(opt: KFAC, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """One step of the original API's loop; returns the loss."""
    model.zero_grad()
    with opt.track_forward():
        loss = F.cross_entropy(model(x), y)
    with opt.track_backward():
        loss.backward()
    opt.step(loss=loss)
    return loss


def manual_mc_step(opt: KFAC, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """One step with a hand-made Monte-Carlo Fisher and `update_cov()`; returns the loss."""
    model.zero_grad()
    with opt.track_forward():
        logits = model(x)
    with torch.no_grad():
        sampled = torch.distributions.Categorical(logits=logits).sample()
    with opt.track_backward():  # the Fisher's statistics: gradients of the sampled-label loss
        F.cross_entropy(logits, sampled).backward(retain_graph=True)
    opt.update_cov()  # fold them into the factors now
    model.zero_grad()  # the step's gradient comes from the true labels (not tracked)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step(loss=loss)
    return loss


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=500, batch_size=128)
    parser.add_argument("--loop", choices=("tracked", "manual-mc"), default="tracked")
    add_image_arguments(parser, DEFAULT_DATA_DIRS["fashion-mnist"], "Fashion-MNIST folder")
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--damping", type=float, default=0.1, help="initial damping (adapted)")
    parser.add_argument("--momentum", type=float, default=0.9)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train with the chosen loop, print the test accuracy, return losses and damping values."""
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = image_split(args, load_fashion_mnist, 1, 28)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))

    model = mlp(image_size=28, hidden=(256, 128)).to(device)
    # Positional learning rate and damping, as in the original port.
    opt = KFAC(
        model,
        args.learning_rate,
        args.damping,
        momentum_type="regular",
        momentum=args.momentum,
        adapt_damping=True,
        update_cov_manually=args.loop == "manual-mc",
    )
    step_fn = tracked_step if args.loop == "tracked" else manual_mc_step
    batches = batch_indices(len(x_train), args.batch_size, torch.Generator().manual_seed(args.seed))
    losses: list[float] = []
    dampings: list[float] = []
    start = time.perf_counter()
    bar = progress(args.steps, args, f"{args.loop} k-fac")
    for step in bar:
        idx = next(batches).to(device)
        losses.append(step_fn(opt, model, x_train[idx], y_train[idx]).item())
        dampings.append(opt.damping.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", damping=f"{dampings[-1]:.3g}", lr=opt.learning_rate)
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, x_test, y_test)
    print(
        f"{args.loop}: {args.steps} steps in {seconds:.1f}s, last loss {losses[-1]:.4f}, "
        f"damping {args.damping:.3g} -> {dampings[-1]:.3g}, test accuracy {test_acc:.4f}"
    )
    return {"losses": losses, "dampings": dampings, "test_accuracy": test_acc, "seconds": seconds}


if __name__ == "__main__":
    run(main)
