"""CIFAR-10 from a local `cifar-10-batches-py` folder (the python-pickle release); never downloads."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from data import Dataset

DEFAULT_CIFAR10_DIR = "data/cifar-10-batches-py"
"""Where `load_cifar10` looks when no folder is given (relative to the working directory)."""

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
"""The five training batches of the python release (10000 images each)."""

TEST_FILE = "test_batch"
"""The test batch of the python release (10000 images)."""

MEAN = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of the CIFAR-10 training images."""

STD = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of the CIFAR-10 training images."""


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one pickled batch file."""
    with path.open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (no 'data'/'labels' entries)")
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(data_dir: str | Path = DEFAULT_CIFAR10_DIR) -> Dataset:
    """CIFAR-10 as float32 images (N, 3, 32, 32) in [0, 1] and int64 labels, from local files."""
    folder = Path(data_dir).expanduser()
    if folder.is_dir() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"  # the parent folder of the extracted archive
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10: missing {', '.join(missing)} in {folder.resolve()}. This example does not "
            "download data: get cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
            "extract it (tar xzf cifar-10-python.tar.gz) and pass --data-dir PATH/cifar-10-batches-py "
            "(or run with --synthetic)."
        )
    train = [_read_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = _read_batch(folder / TEST_FILE)

    def images(a: np.ndarray) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) -> float32 in [0, 1]."""
        return torch.from_numpy(a.astype(np.float32) / 255.0)

    return Dataset(
        name="cifar10",
        x_train=images(np.concatenate([x for x, _ in train])),
        y_train=torch.from_numpy(np.concatenate([y for _, y in train])),
        x_test=images(x_test),
        y_test=torch.from_numpy(y_test),
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Standardize each channel with the CIFAR-10 training mean and standard deviation."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flips and random 32x32 crops of the 4-pixel zero-padded images."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.to(images.device).view(n, 1, 1, 1), images.flip(-1), images)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()  # one shift per batch: cheap
    return padded[..., dy : dy + 32, dx : dx + 32]
