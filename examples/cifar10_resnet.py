"""A small ResNet with BatchNorm on CIFAR-10 trained with `torch_kfac.KFAC` and a cosine schedule.

CIFAR-10 is read from a local copy of the python release (the `cifar-10-batches-py` folder of
cifar-10-python.tar.gz); nothing is downloaded. K-FAC preconditions the convolutions and the
classifier with Kronecker factors and the batch-norm scales and shifts with their exact
per-channel Fisher blocks.

    python examples/cifar10_resnet.py --data-dir ~/data/cifar-10-batches-py
    python examples/cifar10_resnet.py --blocks 3 ...        # ResNet-20 (6n+2 layers, n=3)
    python examples/cifar10_resnet.py --synthetic --steps 50  # no dataset needed
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from cifar import DEFAULT_CIFAR10_DIR, augment, load_cifar10, normalize
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
from torch import Tensor, nn

from torch_kfac import KFAC


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): 3 stages of `blocks` basic blocks, widths w, 2w, 4w."""

    def __init__(self, blocks: int = 1, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            for i in range(blocks):
                layers.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of (N, 3, 32, 32) images."""
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, steps=2000, batch_size=128)
    add_image_arguments(parser, DEFAULT_CIFAR10_DIR, "the cifar-10-batches-py folder")
    parser.add_argument(
        "--blocks", type=int, default=1, help="basic blocks per stage (1: ResNet-8, 3: ResNet-20)"
    )
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine decay)")
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--norm-constraint", type=float, default=1e-3, help="bound on lr^2 g^T F^-1 g")
    parser.add_argument("--factor-update-steps", type=int, default=5)
    parser.add_argument("--inverse-update-steps", type=int, default=20)
    parser.add_argument("--no-augment", action="store_true", help="no random flips and crops")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, print the test accuracy, return the losses and the accuracy."""
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = image_split(args, load_cifar10, 3, 32)
    x_train, x_test = normalize(x_train).to(device), normalize(x_test).to(device)
    y_train, y_test = y_train.to(device), y_test.to(device)

    model = ResNet(args.blocks, args.width).to(device)
    opt = KFAC(
        model,
        lr=args.lr,
        damping=args.damping,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        norm_constraint=args.norm_constraint,
        factor_update_steps=args.factor_update_steps,
        inverse_update_steps=args.inverse_update_steps,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    batches = batch_indices(len(x_train), args.batch_size, gen)
    losses: list[float] = []
    start = time.perf_counter()
    bar = progress(args.steps, args, "resnet k-fac")
    for step in bar:
        idx = next(batches).to(device)
        x = x_train[idx] if args.no_augment else augment(x_train[idx], gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y_train[idx])
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.3g}")
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, x_test, y_test)
    print(f"{args.steps} steps in {seconds:.1f}s, last loss {losses[-1]:.4f}, test accuracy {test_acc:.4f}")
    return {"losses": losses, "test_accuracy": test_acc, "seconds": seconds}


if __name__ == "__main__":
    run(main)
