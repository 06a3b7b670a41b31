"""Small classifiers used by the demo, the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(
    image_size: int = 8,
    hidden: Sequence[int] = (128,),
    num_classes: int = 10,
    in_channels: int = 1,
) -> nn.Sequential:
    """Fully connected tanh network on flattened images (64-128-10 for 8x8 digits)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(
    image_size: int = 8,
    channels: tuple[int, int] = (16, 32),
    hidden: int = 64,
    num_classes: int = 10,
    in_channels: int = 1,
) -> nn.Sequential:
    """Two 3x3 Conv2d+ReLU+MaxPool blocks followed by two Linear layers."""
    if image_size % 4:
        raise ValueError(f"image_size must be divisible by 4, got {image_size}")
    c1, c2 = channels
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


MODELS = {"mlp": mlp, "cnn": small_cnn}
"""Model builders by name; each takes ``image_size`` and ``num_classes`` keywords."""
