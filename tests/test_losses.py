"""Output Hessians of the supported losses against torch.func.hessian; their sampled targets,
terms per example and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian
from torch.nn import functional as F

from torch_kfac.losses import MSECurvature, loss_curvature, register_loss

pytestmark = pytest.mark.usefixtures("float64")


def dense_output_hessian(loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hessian of the reduced loss w.r.t. the flattened outputs."""
    shape = outputs.shape
    return hessian(lambda o: loss_fn(o.reshape(shape), targets))(outputs.reshape(-1))


CASES = {
    "ce-mean": (nn.CrossEntropyLoss(), (6, 4), "class"),
    "ce-sum": (nn.CrossEntropyLoss(reduction="sum"), (6, 4), "class"),
    "ce-seq": (nn.CrossEntropyLoss(), (3, 4, 5), "class"),
    "ce-ignore": (nn.CrossEntropyLoss(ignore_index=1), (6, 4), "class"),
    "ce-weight": (
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)),
        (6, 4),
        "class",
    ),
    "ce-smooth": (nn.CrossEntropyLoss(label_smoothing=0.1), (6, 4), "class"),
    "ce-probs": (nn.CrossEntropyLoss(), (6, 4), "probs"),
    "mse-mean": (nn.MSELoss(), (6, 3), "real"),
    "mse-sum": (nn.MSELoss(reduction="sum"), (6, 3), "real"),
    "bce-mean": (nn.BCEWithLogitsLoss(), (6, 3), "binary"),
    "bce-weight": (
        nn.BCEWithLogitsLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
        (6, 3),
        "binary",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matvec_equals_the_dense_hessian(case: str) -> None:
    loss_fn, shape, kind = CASES[case]
    outputs = torch.randn(*shape)
    if kind == "class":
        targets = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    elif kind == "probs":
        targets = torch.rand(*shape).softmax(1)
    elif kind == "binary":
        targets = torch.randint(0, 2, shape).double()
    else:
        targets = torch.randn(*shape)
    dense = dense_output_hessian(loss_fn, outputs, targets)
    u = torch.randn(*shape)
    hu = loss_curvature(loss_fn).matvec(outputs, targets, u)
    torch.testing.assert_close(hu.reshape(-1), dense @ u.reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (nn.L1Loss(), r"loss_fn L1Loss is not supported \(supported: .*CrossEntropyLoss.*\); add it with "),
        (nn.CrossEntropyLoss(reduction="none"), r"CrossEntropyLoss\(reduction='none'\) is not supported"),
        (F.cross_entropy, r"loss_fn must be a loss module such as nn\.CrossEntropyLoss\(\)"),
    ],
)
def test_unsupported_losses_are_refused_clearly(loss_fn: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loss_curvature(loss_fn)


def test_register_loss_refuses_what_is_not_a_module_class() -> None:
    for wrong in (nn.MSELoss(), F.mse_loss, int):
        with pytest.raises(TypeError, match=r"loss_type must be an nn\.Module subclass"):
            register_loss(wrong, MSECurvature)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("loss_fn", "shape", "terms"),
    [
        (nn.CrossEntropyLoss(), (6, 4), 1),
        (nn.CrossEntropyLoss(), (3, 4, 5), 5),  # classes on dim 1, 5 positions
        (nn.MSELoss(), (3, 5, 2), 5),  # features on the last dim, 5 positions
        (nn.MSELoss(), (6, 2), 1),
        (nn.BCEWithLogitsLoss(), (6,), 1),  # one output per example
    ],
)
def test_terms_per_example_are_the_positions_outside_batch_and_class(
    loss_fn: nn.Module, shape: tuple[int, ...], terms: int
) -> None:
    assert loss_curvature(loss_fn).terms_per_example(torch.zeros(shape)) == terms


def test_bce_pos_weight_is_refused() -> None:
    fn = loss_curvature(nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)))
    with pytest.raises(ValueError, match="pos_weight"):
        fn.matvec(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3))


# ------------------------------------------------------------------------ sampled targets (MC)
def _peaked_logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits (N, C, *) whose softmax puts all but e^-60 of the mass on `labels` (N, *)."""
    return 60.0 * nn.functional.one_hot(labels, classes).movedim(-1, 1).double()


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.NLLLoss()], ids=["ce", "nll"])
def test_sampled_classes_follow_the_class_dimension_of_sequence_outputs(loss_fn: nn.Module) -> None:
    """(N, C, T) outputs: classes along dimension 1, one draw per (example, position); NLLLoss
    (log-probabilities, no label_smoothing attribute) samples like CrossEntropyLoss."""
    labels = torch.tensor([[0, 3, 1, 2, 4, 4], [2, 2, 0, 4, 1, 3]])  # (N=2, T=6), 5 classes
    logits = _peaked_logits(labels, 5)
    outputs = logits.log_softmax(1) if isinstance(loss_fn, nn.NLLLoss) else logits
    targets = torch.zeros_like(labels)
    sampled = loss_curvature(loss_fn).sample_targets(outputs, targets, torch.Generator().manual_seed(0))
    assert torch.equal(sampled, labels)


def test_ignored_positions_stay_ignored_when_sampled() -> None:
    labels = torch.tensor([0, 3, 1, 2, 4, 1])
    targets = torch.tensor([1, -100, 2, -100, 0, 3])
    sampled = loss_curvature(nn.CrossEntropyLoss()).sample_targets(
        _peaked_logits(labels, 5), targets, torch.Generator().manual_seed(0)
    )
    assert torch.equal(sampled, torch.where(targets == -100, targets, labels))


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.ones(5, dtype=torch.float64)),
    ],
    ids=["label-smoothing", "weight"],
)
def test_sampled_targets_are_refused_where_they_have_no_meaning(loss_fn: nn.Module) -> None:
    with pytest.raises(
        ValueError, match=r"fisher_type='mc' with CrossEntropyLoss\(weight=... or label_smoothing"
    ):
        loss_curvature(loss_fn).sample_targets(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), None)
