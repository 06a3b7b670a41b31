"""Runs examples/demo.py end to end with tiny settings, and checks the examples' data loaders."""

from __future__ import annotations

import gzip
import importlib
import struct
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    """The examples' ``demo`` and ``data`` modules, imported from examples/."""
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    return {name: importlib.import_module(name) for name in ("demo", "data", "models")}


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write a uint8 array as an IDX file (gzipped when ``compress``)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_fake_mnist(folder: Path, n_train: int, n_test: int, compress: bool) -> None:
    """Write a random 28x28 MNIST-format dataset with the standard file names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10, compress)


def check_output(out: str, results: list, png: Path, steps: int) -> None:
    """The summary table lists every run and the PNG exists."""
    assert "optimizer" in out and "test acc" in out and "ms/step" in out
    assert {(r.optimizer, r.model) for r in results} == {
        (o, m) for o in ("kfac", "adam") for m in ("mlp", "cnn")
    }
    for r in results:
        assert r.steps == steps
        assert np.isfinite(r.final_train_loss)
        assert 0.0 <= r.test_accuracy <= 1.0
        assert len(r.curve_seconds) == len(r.curve_loss) >= 2
    table_rows = [line.split() for line in out.splitlines()]
    for opt in ("kfac", "adam"):
        for model in ("mlp", "cnn"):
            assert [opt, model, str(steps)] in [row[:3] for row in table_rows]
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000


def test_demo_digits_tiny(
    examples: dict[str, ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Default dataset, a few steps: table printed, PNG written where --out says."""
    png = tmp_path / "sub" / "digits.png"
    results = examples["demo"].main(["--max-steps", "6", "--out", str(png), "--no-progress"])
    check_output(capsys.readouterr().out, results, png, steps=6)


def test_demo_idx_dataset_tiny(
    examples: dict[str, ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dataset mnist --data-dir reads local IDX files (28x28 images) and trains on them."""
    write_fake_mnist(tmp_path / "mnist", n_train=96, n_test=20, compress=True)
    png = tmp_path / "mnist.png"
    argv = ["--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--batch-size", "32"]
    results = examples["demo"].main([*argv, "--out", str(png), "--no-progress"])
    check_output(capsys.readouterr().out, results, png, steps=3)


def test_load_digits_tensors(examples: dict[str, ModuleType]) -> None:
    """Digits: 1797 images in [0, 1], shapes (N, 1, 8, 8), int64 labels, fixed split."""
    data = examples["data"].load_digits_tensors()
    assert len(data.x_train) + len(data.x_test) == 1797
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == torch.float32
    assert data.y_train.dtype == torch.int64 and data.num_classes == 10
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) == 1.0
    again = examples["data"].load_digits_tensors()
    assert torch.equal(data.x_test, again.x_test) and torch.equal(data.y_train, again.y_train)


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_dataset(examples: dict[str, ModuleType], tmp_path: Path, compress: bool) -> None:
    """IDX files, gzipped or not, load as float images in [0, 1] and int64 labels."""
    write_fake_mnist(tmp_path, n_train=12, n_test=5, compress=compress)
    data = examples["data"].load_fashion_mnist(tmp_path)
    assert data.x_train.shape == (12, 1, 28, 28) and data.x_test.shape == (5, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and float(data.x_train.max()) <= 1.0
    assert data.y_test.tolist() == [0, 1, 2, 3, 4] and data.y_train.dtype == torch.int64


def test_missing_idx_files_error(examples: dict[str, ModuleType], tmp_path: Path) -> None:
    """A missing dataset names the folder, the files and how to get them."""
    with pytest.raises(FileNotFoundError) as info:
        examples["data"].load_dataset("fashion-mnist", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "train-images-idx3-ubyte" in message and "dataset-fashion-mnist" in message
    assert "--data-dir" in message
