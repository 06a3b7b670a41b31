"""Dataset loading shared by the examples and the benchmarks (no network access at run time)."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "fashion-mnist", "mnist")
"""Names accepted by :func:`load_dataset`."""

DEFAULT_DATA_DIRS: dict[str, str] = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "data/mnist",
}
"""Where :func:`load_dataset` looks when no ``data_dir`` is given."""

_HOW_TO_GET: dict[str, str] = {
    "fashion-mnist": (
        "On Debian/Ubuntu `apt-get install dataset-fashion-mnist` installs them in "
        "/usr/share/datasets/fashion-mnist; otherwise download the four *-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into that folder."
    ),
    "mnist": (
        "Download the four *-ubyte.gz files of MNIST (for example from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/) into that folder; a torchvision "
        "MNIST/raw folder works as well."
    ),
}

_SPLIT_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images", "train-labels"),
    "test": ("t10k-images", "t10k-labels"),
}


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors: images (N, 1, H, W) float32 in [0, 1], labels (N,) int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return int(self.x_train.shape[-1])

    @property
    def num_classes(self) -> int:
        """Number of classes (10 for all bundled datasets)."""
        return int(torch.cat([self.y_train, self.y_test]).max().item()) + 1


def load_digits_tensors(test_size: int = 297, seed: int = 0) -> Dataset:
    """Scikit-learn's bundled 8x8 digits (1797 images) with a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
    )


def _candidate_names(stem: str, kind: str) -> list[str]:
    """File names under which an IDX file is commonly distributed (gzipped or not)."""
    dotted = stem + "." + kind  # e.g. train-images.idx3-ubyte (Kaggle / unzipped archives)
    dashed = stem + "-" + kind  # e.g. train-images-idx3-ubyte (LeCun, Zalando, torchvision)
    return [dashed + ".gz", dashed, dotted + ".gz", dotted]


def _find_idx_file(data_dir: Path, stem: str, kind: str) -> Path | None:
    """First existing candidate for ``stem`` in ``data_dir`` or a torchvision-style subfolder."""
    for folder in (data_dir, data_dir / "raw", data_dir / "MNIST" / "raw"):
        for name in _candidate_names(stem, kind):
            path = folder / name
            if path.is_file():
                return path
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (unsigned-byte data, optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4]!r})")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if data.size != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), found {data.size}")
    return data.reshape(shape)


def load_idx_dataset(name: str, data_dir: str | Path) -> Dataset:
    """Load an MNIST-format dataset (raw IDX files, gzipped or not) from a local folder."""
    folder = Path(data_dir).expanduser()
    arrays: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for split, (image_stem, label_stem) in _SPLIT_STEMS.items():
        for key, stem, kind in (("x", image_stem, "idx3-ubyte"), ("y", label_stem, "idx1-ubyte")):
            path = _find_idx_file(folder, stem, kind)
            if path is None:
                missing.append(f"{stem}-{kind}[.gz]")
            else:
                arrays[key + "_" + split] = read_idx(path)
    if missing:
        raise FileNotFoundError(
            f"{name}: missing {', '.join(missing)} in {folder.resolve()} "
            f"(also looked in its raw/ and MNIST/raw/ subfolders). {_HOW_TO_GET.get(name, '')} "
            "Then pass --data-dir PATH pointing at that folder."
        )

    def images(a: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        """uint8 (N,) -> int64 (N,)."""
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        name=name,
        x_train=images(arrays["x_train"]),
        y_train=labels(arrays["y_train"]),
        x_test=images(arrays["x_test"]),
        y_test=labels(arrays["y_test"]),
    )


def load_fashion_mnist(data_dir: str | Path = DEFAULT_DATA_DIRS["fashion-mnist"]) -> Dataset:
    """Fashion-MNIST (60000 + 10000 28x28 images) from local IDX files."""
    return load_idx_dataset("fashion-mnist", data_dir)


def load_mnist(data_dir: str | Path = DEFAULT_DATA_DIRS["mnist"]) -> Dataset:
    """MNIST (60000 + 10000 28x28 images) from local IDX files."""
    return load_idx_dataset("mnist", data_dir)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load ``digits``, ``fashion-mnist`` or ``mnist`` (the latter two from ``data_dir``)."""
    if name == "digits":
        return load_digits_tensors()
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dataset(name, data_dir if data_dir is not None else DEFAULT_DATA_DIRS[name])
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
