"""Output Hessians of the supported losses against torch.func.hessian; their sampled targets,
terms per example and errors."""

from __future__ import annotations

import math

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


CLASS_WEIGHT = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
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
    # Class weights with label smoothing: the smoothed part weighs every class.
    "ce-weight-smooth": (nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.2), (6, 4), "class"),
    "ce-seq-weight-smooth-ignore-sum": (
        nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.2, ignore_index=1, reduction="sum"),
        (3, 4, 5),
        "class",
    ),
    "ce-probs": (nn.CrossEntropyLoss(), (6, 4), "probs"),
    # Probability targets: class weights and smoothing act on them; 'mean' counts positions.
    "ce-probs-weight": (nn.CrossEntropyLoss(weight=CLASS_WEIGHT), (6, 4), "probs"),
    "ce-probs-weight-smooth": (
        nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.2),
        (6, 4),
        "probs",
    ),
    "ce-seq-probs-weight-sum": (
        nn.CrossEntropyLoss(weight=CLASS_WEIGHT, reduction="sum"),
        (3, 4, 5),
        "probs",
    ),
    # Soft targets that do not sum to 1 scale each position's Hessian by their sum.
    "ce-mass": (nn.CrossEntropyLoss(), (6, 4), "mass"),
    "mse-mean": (nn.MSELoss(), (6, 3), "real"),
    "mse-sum": (nn.MSELoss(reduction="sum"), (6, 3), "real"),
    "bce-mean": (nn.BCEWithLogitsLoss(), (6, 3), "binary"),
    "bce-weight": (
        nn.BCEWithLogitsLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
        (6, 3),
        "binary",
    ),
    # Features on the last dim of (N, T, F) outputs, T != F.
    "mse-seq": (nn.MSELoss(), (3, 5, 2), "real"),
    "bce-seq": (nn.BCEWithLogitsLoss(), (3, 5, 2), "binary"),
}
#: NLLLoss on log-probabilities, each with the CrossEntropyLoss of the same options on the logits.
NLL_CASES = {
    "nll-mean": (nn.NLLLoss(), nn.CrossEntropyLoss(), (6, 4)),
    "nll-sum": (nn.NLLLoss(reduction="sum"), nn.CrossEntropyLoss(reduction="sum"), (6, 4)),
    "nll-seq": (nn.NLLLoss(), nn.CrossEntropyLoss(), (3, 4, 5)),
    "nll-ignore": (nn.NLLLoss(ignore_index=1), nn.CrossEntropyLoss(ignore_index=1), (6, 4)),
    "nll-weight": (
        nn.NLLLoss(weight=torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)),
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)),
        (6, 4),
    ),
}


def make_targets(kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Targets of a case: class indices (classes on dim 1), class probabilities, 0/1 labels or reals."""
    if kind == "class":
        return torch.randint(0, shape[1], (shape[0], *shape[2:]))
    if kind == "probs":
        return torch.rand(*shape).softmax(1)
    if kind == "mass":
        return 2 * torch.rand(*shape)
    if kind == "binary":
        return torch.randint(0, 2, shape).double()
    return torch.randn(*shape)


@pytest.mark.parametrize("case", list(CASES))
def test_matvec_equals_the_dense_hessian(case: str) -> None:
    loss_fn, shape, kind = CASES[case]
    outputs, targets = torch.randn(*shape), make_targets(kind, shape)
    dense = dense_output_hessian(loss_fn, outputs, targets)
    u = torch.randn(*shape)
    hu = loss_curvature(loss_fn).matvec(outputs, targets, u)
    torch.testing.assert_close(hu.reshape(-1), dense @ u.reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(NLL_CASES))
def test_nll_matvec_through_log_softmax_is_the_cross_entropy_hessian(case: str) -> None:
    """NLL's Fisher in log-probability space, pulled back through log-softmax: J^T diag(w p) J equals
    the Hessian of the cross-entropy of the same options on the logits."""
    nll_fn, ce_fn, shape = NLL_CASES[case]
    logits, u, targets = torch.randn(*shape), torch.randn(*shape), make_targets("class", shape)
    log_probs, vjp = torch.func.vjp(lambda z: z.log_softmax(1), logits)
    ju = torch.func.jvp(lambda z: z.log_softmax(1), (logits,), (u,))[1]
    (ggn_u,) = vjp(loss_curvature(nll_fn).matvec(log_probs, targets, ju))
    dense = dense_output_hessian(ce_fn, logits, targets)
    torch.testing.assert_close(ggn_u.reshape(-1), dense @ u.reshape(-1), rtol=1e-10, atol=1e-12)


def unit_hessian(loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The Hessian of the loss summed over its terms without weights (per term: diag(p) - p p^T,
    2 I, s (1 - s)); it does not depend on class-index targets, which stand in for soft ones."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        index = targets.argmax(1) if targets.is_floating_point() else targets.clamp(min=0)
        return dense_output_hessian(nn.CrossEntropyLoss(reduction="sum"), outputs, index)
    return dense_output_hessian(type(loss_fn)(reduction="sum"), outputs, targets)


def term_weights(loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each loss term's weight w_i in the reduced loss, repeated over the term's outputs: the trace of
    the loss's own output Hessian over that of `unit_hessian`, per term (a position's classes for
    the categorical losses, where NLL's weights are those of the cross-entropy of its options)."""
    if isinstance(loss_fn, nn.NLLLoss):
        loss_fn = nn.CrossEntropyLoss(
            weight=loss_fn.weight, ignore_index=loss_fn.ignore_index, reduction=loss_fn.reduction
        )
    own = dense_output_hessian(loss_fn, outputs, targets).diagonal().reshape(outputs.shape)
    unit = unit_hessian(loss_fn, outputs, targets).diagonal().reshape(outputs.shape)
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # a term per (example, position)
        return (own.sum(1, keepdim=True) / unit.sum(1, keepdim=True)).expand_as(outputs)
    return own / unit  # a term per output element


def same_position(outputs: torch.Tensor, class_dim: int) -> torch.Tensor:
    """(numel, numel) mask of flattened output pairs at the same position (all dims but `class_dim`)."""
    shape = list(outputs.shape)
    shape[class_dim] = 1
    position = torch.arange(math.prod(shape)).reshape(shape).expand_as(outputs).reshape(-1)
    return position[:, None] == position[None, :]


def weighted_fisher_case(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A case's loss, outputs, targets and unweighted Fisher H (the Hessian of the loss summed
    without weights; diag(p) for NLL on log-probabilities)."""
    if case in NLL_CASES:
        loss_fn, _, shape = NLL_CASES[case]
        outputs, targets = torch.randn(*shape).log_softmax(1), make_targets("class", shape)
        return loss_fn, outputs, targets, torch.diag(outputs.exp().reshape(-1))
    loss_fn, shape, kind = CASES[case]
    outputs, targets = torch.randn(*shape), make_targets(kind, shape)
    return loss_fn, outputs, targets, unit_hessian(loss_fn, outputs, targets)


@pytest.mark.parametrize("case", list(CASES) + list(NLL_CASES))
def test_fisher_columns_are_a_square_root_of_the_weighted_fisher(case: str) -> None:
    """At each position, sum_k v_k v_k^T = w_i^2 H_i over its terms i, with H_i the unweighted Fisher
    (the Hessian of the loss summed without weights; diag(p) for NLL on log-probabilities). Products
    across positions do not count: the factors take each position's backpropagated columns apart."""
    loss_fn, outputs, targets, terms = weighted_fisher_case(case)
    columns = loss_curvature(loss_fn).fisher_columns(outputs, targets)
    assert columns.shape[1:] == outputs.shape
    flat = columns.reshape(columns.shape[0], -1)
    weights = term_weights(loss_fn, outputs, targets).reshape(-1, 1)
    per_position = (flat.T @ flat) * same_position(outputs, 1 if case.startswith(("ce", "nll")) else -1)
    torch.testing.assert_close(per_position, weights.square() * terms, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    ("loss_fn", "targets"),
    [
        (nn.CrossEntropyLoss(), torch.tensor([0, 2, 1, 2])),
        (
            nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
            torch.tensor([0, 2, 1, 2]),
        ),
        (nn.NLLLoss(), torch.tensor([0, 2, 1, 2])),
        (nn.MSELoss(), torch.zeros(4, 3)),
        (nn.BCEWithLogitsLoss(), torch.ones(4, 3)),
    ],
    ids=["ce", "ce-float64-weight", "nll", "mse", "bce"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_columns_and_products_keep_the_outputs_dtype(
    loss_fn: nn.Module, targets: torch.Tensor, dtype: torch.dtype
) -> None:
    """Under a float64 default dtype and with float64 class weights: 16- and 32-bit outputs get columns
    and Hessian products of their own dtype (what autograd needs to backpropagate them)."""
    outputs = torch.randn(4, 3).to(dtype)
    targets = targets.to(dtype) if targets.is_floating_point() else targets
    curvature = loss_curvature(loss_fn)
    assert curvature.fisher_columns(outputs, targets).dtype == dtype
    assert curvature.matvec(outputs, targets, torch.ones_like(outputs)).dtype == dtype


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (
            nn.L1Loss(),
            r"loss_fn L1Loss is not supported \(supported: CrossEntropyLoss, NLLLoss, MSELoss, "
            r"BCEWithLogitsLoss[,)].*; add it with ",
        ),
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
    counted = loss_curvature(loss_fn).terms_per_example(torch.zeros(shape))
    assert counted == terms and type(counted) is int


def test_bce_pos_weight_is_refused() -> None:
    fn = loss_curvature(nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)))
    outputs = torch.zeros(2, 3)
    message = r"^BCEWithLogitsLoss\(pos_weight=\.\.\.\) is not supported by the Fisher and GGN curvature$"
    for call in (
        lambda: fn.matvec(outputs, outputs, torch.ones(2, 3)),
        lambda: fn.fisher_columns(outputs, outputs),
        lambda: fn.sample_targets(outputs, outputs, None),
    ):
        with pytest.raises(ValueError, match=message):
            call()


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


def _every_draw(loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> list[tuple]:
    """(probability per output, sampled targets) for each value a draw can take at every position
    at once: class k (ignored positions kept) or a 0/1 label."""
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = outputs.sigmoid()
        return [(s, torch.ones_like(outputs)), (1 - s, torch.zeros_like(outputs))]
    probs = outputs.exp() if isinstance(loss_fn, nn.NLLLoss) else outputs.softmax(1)
    draws = []
    for k in range(outputs.shape[1]):
        index = torch.full(outputs.shape[:1] + outputs.shape[2:], k)
        if not targets.is_floating_point():
            index = torch.where(targets == loss_fn.ignore_index, targets, index)
        draws.append((probs.select(1, k).unsqueeze(1).expand_as(outputs), index))
    return draws


SAMPLED_CASES = [c for c in CASES if not c.startswith("mse")] + list(NLL_CASES)


@pytest.mark.parametrize("case", SAMPLED_CASES)
def test_sampled_loss_gradients_have_the_weighted_fisher_as_second_moment(case: str) -> None:
    """The MC Fisher's sample: with targets drawn by `sample_targets`, the gradient v of `sampled_loss`
    in the outputs has E[v v^T] = w_i^2 H_i at each position, as the type-2 columns (class weights,
    label smoothing, probability targets and ignored positions included). The expectation is exact:
    a position's block of v depends on its own draw only, so it sums over the values of one draw."""
    loss_fn, outputs, targets, terms = weighted_fisher_case(case)
    curvature = loss_curvature(loss_fn)
    # A position: an example's classes for the categorical losses, one output for BCE (whose
    # outputs are drawn independently, all at once here, so only their own squares are exact).
    categorical = case.startswith(("ce", "nll"))
    mask = same_position(outputs, 1) if categorical else torch.eye(outputs.numel(), dtype=torch.bool)
    second_moment = torch.zeros(outputs.numel(), outputs.numel())
    for prob, sampled in _every_draw(loss_fn, outputs, targets):
        logits = outputs.clone().requires_grad_()
        (v,) = torch.autograd.grad(curvature.sampled_loss(logits, targets, sampled), logits)
        # The draw's probability at a position weighs that position's block of v v^T.
        second_moment += (prob.reshape(-1, 1) * v.reshape(-1, 1) * v.reshape(1, -1)) * mask
    weights = term_weights(loss_fn, outputs, targets).reshape(-1, 1)
    torch.testing.assert_close(second_moment, weights.square() * terms * mask, rtol=1e-10, atol=1e-13)


def test_sampled_regression_and_binary_targets_follow_the_model() -> None:
    """MSE: outputs + N(0, 1/2) (the gradient's covariance is then H = 2 I); BCE: Bernoulli(sigmoid)
    draws. Detached from the graph, in the outputs' dtype (float32 under the float64 default),
    repeatable from the generator."""
    outputs = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float32).repeat(20_000, 1).requires_grad_()
    for loss_fn in (nn.MSELoss(), nn.BCEWithLogitsLoss()):
        curvature = loss_curvature(loss_fn)
        sampled = curvature.sample_targets(outputs, outputs, torch.Generator().manual_seed(0))
        again = curvature.sample_targets(outputs, outputs, torch.Generator().manual_seed(0))
        assert torch.equal(sampled, again)
        assert not sampled.requires_grad and sampled.dtype == outputs.dtype and sampled.shape == outputs.shape
        if isinstance(loss_fn, nn.MSELoss):
            noise = sampled - outputs.detach()
            torch.testing.assert_close(noise.mean(0), torch.zeros(3, dtype=torch.float32), rtol=0, atol=0.025)
            torch.testing.assert_close(
                noise.var(0), torch.full((3,), 0.5, dtype=torch.float32), rtol=0, atol=0.025
            )
        else:
            assert set(sampled.unique().tolist()) <= {0.0, 1.0}
            torch.testing.assert_close(sampled.mean(0), outputs[0].detach().sigmoid(), rtol=0, atol=0.015)
