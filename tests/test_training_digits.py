"""K-FAC reaches a lower training loss than Adam at its best learning rate on scikit-learn's digits.

Both optimizers train the same initial network on the same mini-batches for the same number of
steps (the demo's defaults: batch 256, 150 steps), and the loss on the whole training set is
measured afterwards. Adam's learning rate is the best of a grid run here, so the comparison is
against tuned Adam whatever the platform's rounding does to the ranking of its learning rates.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
STEPS, BATCH_SIZE, SEED = 150, 256, 0
ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Over seeds 0-7 (one thread) K-FAC's final loss is 30x-70x (MLP) and 3.5x-235x (CNN, median 14x)
# below the best Adam's; seed 0 gives 38x and 13x. Requiring 3x leaves room for other platforms' rounding.
MARGIN = 3.0


@pytest.fixture(scope="module")
def demo() -> Iterator[ModuleType]:
    """examples/demo.py, imported with examples/ on sys.path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES_DIR))
        yield importlib.import_module("demo")


@pytest.fixture(scope="module")
def digits(demo: ModuleType) -> object:
    """The digits train/test split used by the demo."""
    return importlib.import_module("data").load_digits_tensors()


def final_loss(demo: ModuleType, digits: object, optimizer: str, model: str, hparams: dict | None) -> float:
    """Full-training-set loss after STEPS steps (inf if it is not finite)."""
    result = demo.train(
        optimizer,
        model,
        digits,
        steps=STEPS,
        batch_size=BATCH_SIZE,
        seed=SEED,
        progress=False,
        hparams=hparams,
    )
    loss = float(result.final_train_loss)
    return loss if math.isfinite(loss) else math.inf


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_kfac_beats_tuned_adam(demo: ModuleType, digits: object, model: str) -> None:
    """K-FAC's final training loss is at least MARGIN times lower than the best Adam's in the grid."""
    adam = {lr: final_loss(demo, digits, "adam", model, {"lr": lr}) for lr in ADAM_GRID}
    best_lr = min(adam, key=adam.__getitem__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # K-FAC warns when it skips a non-finite step
        kfac = final_loss(demo, digits, "kfac", model, None)  # the demo's K-FAC hyperparameters
    report = f"K-FAC {kfac:.3g}; Adam " + ", ".join(f"lr={lr:g}: {v:.3g}" for lr, v in adam.items())
    assert kfac * MARGIN < adam[best_lr], report
    # The demo's Adam learning rate is the grid's best here, and the grid brackets it.
    assert demo.ADAM_LR[model] == best_lr, report
    assert ADAM_GRID[0] < best_lr < ADAM_GRID[-1], report


def test_warmup_keeps_early_inverses_fresh(demo: ModuleType, digits: object) -> None:
    """With inverses refreshed only every 10 steps from the start, the CNN diverges at these settings.

    In the first steps the output-gradient factors grow by about 100x, so an inverse computed at
    step 0 makes the steps up to step 10 far too large; the default warm-up refreshes every step.
    """
    # Without the default norm constraint, which alone also keeps this run from diverging.
    hparams = {
        "lr": 0.01,
        "damping": 0.01,
        "momentum": 0.9,
        "inverse_update_steps": 10,
        "norm_constraint": None,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the stale run skips non-finite steps
        stale = final_loss(demo, digits, "kfac", "cnn", {**hparams, "warmup_steps": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fresh = final_loss(demo, digits, "kfac", "cnn", hparams)
    assert fresh < 0.5 < stale, f"warm-up {fresh:.3g}, none {stale:.3g}"
