"""Runs every example script's `main()` for a few steps on tiny synthetic data and checks the results."""

from __future__ import annotations

import gzip
import importlib
import math
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.conftest import layout_warnings

Loader = Callable[[str], ModuleType]
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
COMMON = ["--device", "cpu", "--no-progress"]
EXAMPLES = (
    "fashion_mnist_cnn",
    "autoencoder",
    "cifar10_resnet",
    "char_transformer",
    "lstm_sequence",
    "preconditioner_adamw",
    "lightning_kfac",
    "original_api",
    "hf_trainer",
    "hf_classifier",
)


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """A function importing an example module by name from examples/."""
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    return importlib.import_module


def assert_learned(losses: Sequence[float], k: int = 3, factor: float = 1.0) -> None:
    """All losses finite and the mean of the last k below `factor` times the mean of the first k."""
    assert losses and all(math.isfinite(v) for v in losses), losses
    first, last = np.mean(losses[:k]), np.mean(losses[-k:])
    assert last < factor * first, f"loss did not decrease: first {first:.4g}, last {last:.4g}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_help(load: Loader, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every example has argparse options for steps, batch size and device, and a tiny-data switch."""
    with pytest.raises(SystemExit) as info:
        load(name).main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(opt in text for opt in ("--steps", "--batch-size", "--device", "--no-progress"))
    assert "--synthetic" in text or name in (
        "char_transformer",
        "lstm_sequence",
        "hf_trainer",
        "hf_classifier",
    )  # these make their data


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_fashion_mnist_cnn(load: Loader, fisher_type: str) -> None:
    """The CNN learns the synthetic classes; the MC Fisher runs through `step(batch=...)`."""
    argv = ["--synthetic", "--synthetic-size", "256", "--steps", "30", "--batch-size", "32"]
    out = load("fashion_mnist_cnn").main(
        [*argv, "--channels", "4", "8", "--fisher-type", fisher_type, *COMMON]
    )
    assert len(out["losses"]) == 30
    assert_learned(out["losses"], factor=0.5)
    assert 0.5 < out["test_accuracy"] <= 1.0  # chance is 0.1


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_cnn_reads_idx_files(load: Loader, tmp_path: Path) -> None:
    """--data-dir loads Fashion-MNIST-format files through examples/data.py."""
    rng = np.random.default_rng(0)
    for stem, n in (("train", 64), ("t10k", 20)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    argv = ["--data-dir", str(tmp_path), "--steps", "3", "--batch-size", "16", "--channels", "4", "8"]
    out = load("fashion_mnist_cnn").main([*argv, *COMMON])
    assert len(out["losses"]) == 3 and all(math.isfinite(v) for v in out["losses"])
    assert out["test_accuracy"] in {i / 20 for i in range(21)}


def test_autoencoder_fully_adaptive(load: Loader) -> None:
    """Learning rate, momentum and damping come from K-FAC itself; the reconstruction improves."""
    argv = ["--synthetic", "--synthetic-size", "256", "--steps", "15", "--batch-size", "64"]
    out = load("autoencoder").main([*argv, "--widths", "784", "64", "16", "64", "784", *COMMON])
    # Summed over 784 pixels: about 784 log 2 at the start, above the targets' entropy (~500) at best.
    assert out["losses"][0] > 500 and out["losses"][-1] < out["losses"][0] - 10
    assert_learned(out["losses"])
    assert out["reconstruction_error"] < 0.5 * out["initial_reconstruction_error"]
    stats = out["stats"]
    assert all({"learning_rate", "momentum", "damping"} <= set(s) for s in stats[1:])
    assert all(math.isfinite(v) for s in stats for v in s.values())
    assert len({round(s["learning_rate"], 6) for s in stats}) > 1  # chosen anew every step


def test_autoencoder_rejects_bad_widths(load: Loader) -> None:
    """The first and last widths must be the 784 pixels."""
    with pytest.raises(ValueError, match="--widths"):
        load("autoencoder").main(
            ["--synthetic", "--synthetic-size", "8", "--widths", "784", "8", "10", *COMMON]
        )


def write_fake_cifar(folder: Path, per_batch: int) -> None:
    """A cifar-10-batches-py folder with random images, in the python-pickle format."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_resnet_synthetic(load: Loader) -> None:
    """The BatchNorm ResNet trains with K-FAC on synthetic 32x32 images."""
    argv = ["--synthetic", "--synthetic-size", "128", "--steps", "12", "--batch-size", "32", "--width", "4"]
    out = load("cifar10_resnet").main([*argv, "--inverse-update-steps", "4", *COMMON])
    assert_learned(out["losses"], factor=0.8)
    assert 0.0 <= out["test_accuracy"] <= 1.0


def test_cifar10_loader_and_resnet(load: Loader, tmp_path: Path) -> None:
    """load_cifar10 reads the pickled batches (also from the parent folder) and the example trains."""
    write_fake_cifar(tmp_path / "cifar-10-batches-py", per_batch=8)
    data = load("cifar").load_cifar10(tmp_path)
    assert data.x_train.shape == (40, 3, 32, 32) and data.x_test.shape == (8, 3, 32, 32)
    assert float(data.x_train.max()) <= 1.0 and data.y_train.dtype.is_floating_point is False
    argv = ["--data-dir", str(tmp_path / "cifar-10-batches-py"), "--steps", "3", "--batch-size", "8"]
    out = load("cifar10_resnet").main([*argv, "--width", "4", *COMMON])
    assert len(out["losses"]) == 3 and all(math.isfinite(v) for v in out["losses"])


def test_cifar10_missing_folder_is_a_clear_error(
    load: Loader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No download: a missing folder names the files and how to get them; the CLI exits with it."""
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*cifar-10-python\.tar\.gz.*--data-dir"):
        load("cifar10_resnet").main(["--data-dir", str(tmp_path / "nowhere"), *COMMON])
    monkeypatch.setattr("sys.argv", ["cifar10_resnet.py", "--data-dir", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="does not download"):
        load("example_utils").run(load("cifar10_resnet").main)


def test_char_transformer(load: Loader, tmp_path: Path) -> None:
    """The character model learns the generated text and from a local text file."""
    argv = ["--steps", "20", "--batch-size", "8", "--context", "16", "--dim", "16", "--layers", "1"]
    argv += ["--heads", "2", "--sentences", "200", "--inverse-update-steps", "5"]
    out = load("char_transformer").main([*argv, *COMMON])
    assert_learned(out["losses"], factor=0.8)
    assert out["losses"][0] == pytest.approx(math.log(out["vocab"]), rel=0.3)  # near uniform at the start
    assert isinstance(out["sample"], str) and len(out["sample"]) == 16 + 60
    text = tmp_path / "text.txt"
    text.write_text("abcdefgh" * 40)
    out = load("char_transformer").main([*argv, "--text-file", str(text), *COMMON])
    assert out["vocab"] == 8
    assert_learned(out["losses"], factor=0.5)


@pytest.mark.parametrize("cell", ["linear", "torch"])
def test_lstm_sequence(load: Loader, cell: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The LSTM (Linear-gate cell or nn.LSTM) learns next-step prediction."""
    argv = ["--steps", "15", "--batch-size", "16", "--length", "12", "--hidden", "8", "--cell", cell]
    out = load("lstm_sequence").main([*argv, "--show-registration", *COMMON])
    assert "K-FAC registration" in capsys.readouterr().out
    assert_learned(out["losses"], factor=0.5)
    assert out["test_mse"] < 0.5


def test_preconditioner_adamw(load: Loader) -> None:
    """KFACPreconditioner + AdamW + cosine schedule learns, and differs from plain AdamW."""
    argv = ["--synthetic", "--synthetic-size", "256", "--steps", "15", "--batch-size", "32", "--hidden", "32"]
    argv += ["--lr", "3e-3"]
    module = load("preconditioner_adamw")
    kfac = module.main([*argv, *COMMON])
    plain = module.main([*argv, "--no-kfac", *COMMON])
    assert_learned(kfac["losses"], factor=0.8)
    assert_learned(plain["losses"])
    assert kfac["losses"][0] == pytest.approx(plain["losses"][0])  # same init and first batch
    assert np.mean(kfac["losses"][-3:]) < np.mean(plain["losses"][-3:])  # K-FAC helps here


@pytest.mark.parametrize("preset", [False, True], ids=["fixed", "preset"])
def test_lightning_kfac(load: Loader, preset: bool) -> None:
    """A Lightning Trainer drives KFAC, and the adaptive preset, through automatic optimization."""
    argv = ["--preset"] * preset + [
        "--synthetic",
        "--synthetic-size",
        "256",
        "--steps",
        "10",
        "--batch-size",
        "32",
        "--val-every",
        "5",
    ]
    out = load("lightning_kfac").main([*argv, *COMMON])
    assert out["steps"] == 10 and len(out["losses"]) == 10
    assert_learned(out["losses"], factor=0.8)
    assert len(out["val_accuracy"]) == 2 and 0.0 <= out["val_accuracy"][-1] <= 1.0


@pytest.mark.parametrize("preset", [False, True], ids=["fixed", "preset"])
def test_hf_trainer(load: Loader, preset: bool, recwarn: pytest.WarningsRecorder) -> None:
    """The Hugging Face Trainer drives KFAC, and the adaptive preset (its own optimizer.step() with
    the batch of the trainer's pass), on a GPT-2; every projection, embedding and norm has a block,
    and the position table is looked up per example (no warning of a lookup shared by the batch)."""
    argv = ["--steps", "15", "--batch-size", "8", "--context", "16", "--width", "32", "--warmup", "2"]
    out = load("hf_trainer").main([*argv, *["--preset"] * preset, *COMMON])  # bfloat16 autocast on the CPU
    assert not layout_warnings(recwarn)
    assert len(out["losses"]) == 15
    assert_learned(out["losses"], factor=0.9)
    if preset:  # NextTokenLogits holds the language model
        out["coverage"] = {name.removeprefix("lm."): line for name, line in out["coverage"].items()}
    blocks = out["coverage"]
    # Two embeddings (the output head shares the token embedding's weight), four Conv1D with bias
    # and two LayerNorms per layer (two layers), the final LayerNorm.
    assert len(blocks) == 2 + 2 * (4 * 2 + 2 * 2) + 2
    assert all(not line.startswith("fallback") for line in blocks.values()), blocks
    assert sum("Conv1DBlock" in line for line in blocks.values()) == 2 * 4 * 2
    assert "TiedBlock" in blocks["transformer.wte.weight"] and "lm_head" in blocks["transformer.wte.weight"]


@pytest.mark.parametrize("optimizer", ["preset", "kfac", "adamw"])
def test_hf_classifier(load: Loader, optimizer: str, recwarn: pytest.WarningsRecorder) -> None:
    """A BERT classifier fine-tuned by the Trainer: the preset through `Logits`/`logits_loss` and
    the trainer's own `optimizer.step()`, fixed K-FAC, and the trainer's AdamW; the position table
    is looked up per example (no warning of a lookup shared by the batch)."""
    argv = ["--steps", "30", "--batch-size", "64", "--train-size", "960", "--test-size", "128"]
    lr = ["--lr", "3e-3"] if optimizer == "adamw" else []
    out = load("hf_classifier").main([*argv, "--optimizer", optimizer, *lr, *COMMON])
    assert not layout_warnings(recwarn)
    assert len(out["losses"]) == 30
    assert_learned(out["losses"], factor=0.8)
    assert 0.0 <= out["test_accuracy"] <= 1.0 and math.isfinite(out["test_loss"])


@pytest.mark.parametrize("loop", ["tracked", "manual-mc"])
def test_original_api(load: Loader, loop: str) -> None:
    """The original port's loops: tracked contexts with step(loss=...), and the manual MC Fisher."""
    argv = ["--synthetic", "--synthetic-size", "256", "--steps", "16", "--batch-size", "32", "--loop", loop]
    out = load("original_api").main([*argv, *COMMON])
    assert_learned(out["losses"], factor=0.8)
    assert all(d > 0 and math.isfinite(d) for d in out["dampings"])
    assert len(set(out["dampings"])) > 1  # adapt_damping=True moved it
