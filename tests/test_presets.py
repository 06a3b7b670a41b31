"""torch_kfac.presets: the adaptive preset builds the documented KFAC and beats tuned Adam untuned."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests import test_models
from torch_kfac import KFAC, presets


@pytest.fixture(autouse=True)
def _float32() -> None:
    """Models train in float32, as users run them."""
    torch.set_default_dtype(torch.float32)


class SumBCE(nn.BCEWithLogitsLoss):
    """Pixel cross-entropy summed over pixels and examples (the autoencoder's loss)."""

    def __init__(self) -> None:
        super().__init__(reduction="sum")


def test_adaptive_is_kfac_with_the_preset_and_overrides() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = presets.adaptive(model, SumBCE(), min_damping=1e-6)
    assert isinstance(opt, KFAC)
    assert opt.adaptive_learning_rate and opt.adaptive_momentum and opt.adapt_damping
    assert opt.options.damping == "auto"
    assert opt.options.reduction == "sum"  # from the loss module
    assert opt.options.fisher_type == presets.ADAPTIVE["fisher_type"]
    assert opt.damping_adaptation_decay == presets.ADAPTIVE["damping_adaptation_decay"]
    assert opt.min_damping == 1e-6
    mean = presets.adaptive(model, nn.CrossEntropyLoss(), reduction="mean_positions")
    assert mean.options.reduction == "mean_positions"
    # The empirical Fisher runs no own pass: the preset's size for that pass goes with the MC Fisher.
    empirical = presets.adaptive(model, SumBCE(), fisher_type="EMPIRICAL")
    assert empirical.options.fisher_type == "empirical" and empirical.options.fisher_batch_size is None
    with pytest.raises(ValueError, match="fisher_batch_size sets the size of the own pass"):
        presets.adaptive(model, SumBCE(), fisher_type="empirical", fisher_batch_size=32)
    with pytest.raises(ValueError, match="loss_fn"):
        presets.adaptive(model, F.cross_entropy)  # type: ignore[arg-type]
    # A loss reduced otherwise is named as the loss's problem, not as K-FAC's reduction option.
    with pytest.raises(ValueError, match=r"CrossEntropyLoss\(reduction='none'\) is not supported"):
        presets.adaptive(model, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="loss_fn KLDivLoss is not supported"):
        presets.adaptive(model, nn.KLDivLoss(reduction="batchmean"))


def train_preset(
    model_fn: Callable[[], nn.Module], data: tuple[Tensor, Tensor], steps: int, **overrides: object
) -> tuple[float, KFAC]:
    """Full-batch training with the preset; the final training loss in float64 (as test_models)."""
    model = model_fn()
    x, y = data
    loss_fn = nn.CrossEntropyLoss()
    reduction = "mean_positions" if y.dim() > 1 else "mean"
    opt = presets.adaptive(model, loss_fn, reduction=reduction, **overrides)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss, batch=(x, y))
    model.eval().double()
    with torch.no_grad():
        return F.cross_entropy(model(x.double() if x.is_floating_point() else x), y).item(), opt


STEPS = 100


def preset_losses(model: nn.Module, loss_fn: nn.Module, inputs: object, y: Tensor, steps: int) -> list[float]:
    """The training losses of `steps` preset steps on one batch; every step must move."""
    opt = presets.adaptive(model, loss_fn)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(inputs), y)
        loss.backward()
        opt.step(loss=loss, batch=(inputs, y))
        losses.append(loss.item())
        assert float(opt.last_stats["update_norm"]) > 0
    return losses


def two_feature_classes(n: int) -> tuple[Tensor, Tensor]:
    """Inputs (n, 5) and 3 classes from the signs of their first two features."""
    x = torch.randn(n, 5)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_preset_trains_a_model_without_forward_mode_derivatives() -> None:
    """weight_norm (no forward-mode derivative in PyTorch, and a parametrized weight left to the
    plain update): the quadratic model warns once and uses reverse mode; the loss falls."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(5, 32)), nn.ReLU(), nn.Linear(32, 3)
    )
    x, y = two_feature_classes(64)
    with pytest.warns(RuntimeWarning, match="two reverse-mode passes") as caught:
        losses = preset_losses(model, nn.CrossEntropyLoss(), x, y, 20)
    assert sum("reverse-mode" in str(w.message) for w in caught) == 1
    assert losses[-1] < 0.5 * losses[0], losses


def test_preset_slices_dict_inputs_larger_than_its_sub_batches() -> None:
    """A model taking a tokenizer-style dict, on a batch larger than the Fisher pass's and the
    quadratic model's sub-batches (64 and 128 examples): both take the dict's first examples."""

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, batch: dict[str, Tensor]) -> Tensor:
            return self.body(batch["features"] * batch["mask"])

    torch.manual_seed(0)
    x, y = two_feature_classes(300)
    losses = preset_losses(Keyed(), nn.CrossEntropyLoss(), {"features": x, "mask": torch.ones(300, 1)}, y, 10)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    ("model_fn", "loss_fn"),
    [
        (
            lambda: nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3)),
            nn.CrossEntropyLoss(),
        ),
        (
            lambda: nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 3)),
            nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1),
        ),
    ],
    ids=["dropout", "class-weights-label-smoothing"],
)
def test_preset_takes_common_training_setups(model_fn: Callable[[], nn.Module], loss_fn: nn.Module) -> None:
    """A dropout layer (the quadratic model's forward-mode pass draws its mask) and a weighted,
    smoothed cross-entropy (the MC Fisher's labels weighed as the loss does) train with the preset:
    every step moves and the loss falls."""
    torch.manual_seed(0)
    model = model_fn()
    losses = preset_losses(model, loss_fn, *two_feature_classes(64), 20)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("case", list(test_models.CASES))
def test_preset_trains_every_model_below_tuned_adam(case: str) -> None:
    """No number chosen: the preset ends below Adam's best learning rate after the same steps."""
    model_fn, data_fn, _, _ = test_models.CASES[case]
    data = data_fn()
    floor = test_models.bayes_floor(*data)
    adam = test_models.tuned_adam(model_fn, data, STEPS) - floor
    kfac, _ = train_preset(model_fn, data, STEPS)
    assert math.isfinite(kfac) and kfac - floor < adam, (kfac - floor, adam)


#: The preset's best fixed initial damping per model: the lowest median loss above the floor after
#: 50 full-batch steps, over half decades from 1e-5 to 10 and 2 seeds
#: (`python benchmarks/initial_damping.py`, results/initial_damping.md).
BEST_FIXED_DAMPING = {"lstm": 1e-2, "transformer": 1.0}


@pytest.mark.parametrize("case", list(BEST_FIXED_DAMPING))
def test_auto_damping_is_within_10x_of_the_best_fixed_initial_damping(case: str) -> None:
    model_fn, data_fn, _, _ = test_models.CASES[case]
    _, opt = train_preset(model_fn, data_fn(), 1)
    chosen = opt.preconditioner.calibrated_damping
    assert chosen is not None and 0.1 < chosen / BEST_FIXED_DAMPING[case] < 10, chosen
