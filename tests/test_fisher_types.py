"""Fisher types (empirical, MC, type-2) and loss reductions (mean, sum, mean over positions)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import hessian

from tests.conftest import make_data, make_mlp
from tests.reference import curvlinops_factors
from torch_kfac import KFAC, KFACPreconditioner

pytestmark = pytest.mark.usefixtures("float64")


def factors(pre: KFACPreconditioner, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict:
    """Run one preconditioner step on (x, y) and return {name: (A, G)}."""
    model.zero_grad()
    loss_fn(model(x), y).backward()
    pre.step(batch=(x, y))
    return {n: (b.A, b.G) for n, b in pre.blocks.items()}


class PerPosition(nn.Module):
    """A Linear layer on (N, T, d) sequences whose logits are moved to (N, C, T) for cross-entropy."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).transpose(1, 2)


LOSSES = {
    "ce": (nn.CrossEntropyLoss, lambda n, g: torch.randint(0, 3, (n,), generator=g)),
    "mse": (nn.MSELoss, lambda n, g: torch.randn(n, 3, generator=g)),
    "bce": (nn.BCEWithLogitsLoss, lambda n, g: torch.randint(0, 2, (n, 3), generator=g).double()),
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_type2_matches_curvlinops(loss: str, reduction: str) -> None:
    make, target = LOSSES[loss]
    loss_fn = make(reduction=reduction)
    model = make_mlp()
    x = make_data(n=7)[0]
    y = target(7, torch.Generator().manual_seed(2))
    pre = KFACPreconditioner(model, fisher_type="type-2", loss_fn=loss_fn, reduction=reduction)
    ours = factors(pre, model, loss_fn, x, y)
    ref_a, ref_g = curvlinops_factors(model, loss_fn, x, y, fisher_type="type-2")
    # curvlinops: the summed loss's Fisher for 'sum' (N x ours); per-example MSE/BCE losses that
    # sum over the C outputs (C x ours) for 'mean'.
    ratio = 7.0 if reduction == "sum" else (3.0 if loss in ("mse", "bce") else 1.0)
    for name, (a, g) in ours.items():
        torch.testing.assert_close(a, ref_a[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g * ratio, ref_g[name], rtol=1e-10, atol=1e-12)


def test_type2_of_the_output_layer_is_the_mean_output_hessian() -> None:
    model = make_mlp()
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_data(n=5)
    pre = KFACPreconditioner(model, fisher_type="type-2", loss_fn=loss_fn)
    _, g = factors(pre, model, loss_fn, x, y)["2"]
    with torch.no_grad():
        logits = model(x)
    per_example = [
        hessian(lambda o, t=t: nn.functional.cross_entropy(o, t))(o) for o, t in zip(logits, y, strict=True)
    ]
    torch.testing.assert_close(g, torch.stack(per_example).mean(0), rtol=1e-10, atol=1e-12)


#: Losses whose sampled labels weigh each position as the loss does (`LossCurvature.sampled_loss`).
WEIGHTED_LOSSES = {
    "ce-weight-smooth": (
        lambda: nn.CrossEntropyLoss(
            weight=torch.tensor([0.5, 2.0, 1.0]), label_smoothing=0.2, ignore_index=1
        ),
        LOSSES["ce"][1],
    ),
    "bce-weight": (lambda: nn.BCEWithLogitsLoss(weight=torch.tensor([0.5, 2.0, 1.0])), LOSSES["bce"][1]),
}


@pytest.mark.parametrize("loss", list(LOSSES) + list(WEIGHTED_LOSSES))
def test_mc_fisher_converges_to_type2(loss: str) -> None:
    make, target = {**LOSSES, **WEIGHTED_LOSSES}[loss]
    loss_fn = make()
    x = make_data(n=6)[0]
    y = target(6, torch.Generator().manual_seed(2))
    exact = factors(
        KFACPreconditioner(make_mlp(), fisher_type="type-2", loss_fn=loss_fn), make_mlp(), loss_fn, x, y
    )
    model = make_mlp()
    pre = KFACPreconditioner(model, fisher_type="mc", mc_samples=4000, loss_fn=loss_fn)
    torch.manual_seed(5)
    sampled = factors(pre, model, loss_fn, x, y)
    for name in exact:
        torch.testing.assert_close(sampled[name][0], exact[name][0], rtol=1e-12, atol=1e-12)
        err = (sampled[name][1] - exact[name][1]).norm() / exact[name][1].norm()
        assert err < 0.06, (name, err.item())


def test_nll_on_log_probabilities_equals_cross_entropy_on_logits() -> None:
    logits_model = make_mlp()
    logp_model = nn.Sequential(make_mlp(), nn.LogSoftmax(dim=1))
    x, y = make_data(n=6)
    ce = factors(
        KFACPreconditioner(logits_model, fisher_type="type-2", loss_fn=nn.CrossEntropyLoss()),
        logits_model,
        nn.CrossEntropyLoss(),
        x,
        y,
    )
    nll = factors(
        KFACPreconditioner(logp_model, fisher_type="type-2", loss_fn=nn.NLLLoss()),
        logp_model,
        nn.NLLLoss(),
        x,
        y,
    )
    for name, (a, g) in ce.items():
        torch.testing.assert_close(nll[f"0.{name}"][0], a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(nll[f"0.{name}"][1], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fisher_type", ["empirical", "type-2"])
def test_mean_over_positions_matches_curvlinops(fisher_type: str) -> None:
    model = PerPosition()
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 5, 4, generator=gen), torch.randint(0, 3, (4, 5), generator=gen)
    pre = KFACPreconditioner(model, fisher_type=fisher_type, loss_fn=loss_fn, reduction="mean_positions")
    ours = factors(pre, model, loss_fn, x, y)
    ref_a, ref_g = curvlinops_factors(model, loss_fn, x, y, fisher_type=fisher_type)
    for name, (a, g) in ours.items():
        torch.testing.assert_close(a, ref_a[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, ref_g[name], rtol=1e-10, atol=1e-12)
    assert pre.blocks["body.0"].loss_terms == 5


def test_mean_over_positions_is_the_token_level_fisher() -> None:
    """With T positions, 'mean_positions' G is T times the batch-mean G (per-token vs per-sequence)."""
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 5, 4, generator=gen), torch.randint(0, 3, (4, 5), generator=gen)
    per_seq = factors(KFACPreconditioner(m := PerPosition(), loss_fn=loss_fn), m, loss_fn, x, y)
    per_tok = factors(
        KFACPreconditioner(m := PerPosition(), loss_fn=loss_fn, reduction="mean_positions"), m, loss_fn, x, y
    )
    for name, (a, g) in per_seq.items():
        torch.testing.assert_close(per_tok[name][0], a)
        torch.testing.assert_close(per_tok[name][1], 5 * g, rtol=1e-10, atol=1e-12)


def test_fisher_pass_leaves_gradients_buffers_and_schedule_alone() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(
        model,
        0.1,
        1e-2,
        fisher_type="mc",
        loss_fn=loss_fn,
        factor_update_steps=2,
        warmup_steps=0,
        cov_ema_decay=0.5,
    )
    x, y = make_data(n=8)
    previous = None
    for step in range(4):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        assert not opt.blocks["0"].has_pending("A")  # the user's own pass is never recorded
        grads = [p.grad.clone() for p in model.parameters()]
        running = model[1].running_mean.clone()
        opt.step(batch=(x, y))
        assert torch.equal(running, model[1].running_mean)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
        weight = opt.blocks["0"].state["G_weight"].item()
        assert (weight != previous) == (step % 2 == 0)
        previous = weight


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fisher_type": "mc"}, "loss_fn"),
        ({"fisher_type": "type-3", "loss_fn": nn.MSELoss()}, "fisher_type"),
        ({"reduction": "mean_positions"}, "loss_fn"),
        ({"loss_fn": nn.MSELoss(reduction="sum")}, "reduction"),
        ({"fisher_type": "mc", "mc_samples": 0, "loss_fn": nn.MSELoss()}, "mc_samples"),
        ({"loss_fn": nn.L1Loss()}, "not supported"),
    ],
)
def test_invalid_fisher_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KFACPreconditioner(make_mlp(), **kwargs)


def test_mc_needs_the_batch_and_refuses_explicit_tracking() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, fisher_type="mc", loss_fn=nn.CrossEntropyLoss())
    x, y = make_data()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"needs step\(batch=\(inputs, targets\)\) on factor-update steps"):
        pre.step()
    with pytest.raises(ValueError, match="tracking"):
        pre.track_forward()


def _recording_labels(pre: KFACPreconditioner) -> list[Tensor]:
    """Record the labels the preconditioner's MC pass draws."""
    assert pre.loss_curvature is not None
    draw, drawn = pre.loss_curvature.sample_targets, []

    def recorded(outputs: Tensor, targets: Tensor, generator: torch.Generator | None) -> Tensor:
        drawn.append(draw(outputs, targets, generator))
        return drawn[-1]

    pre.loss_curvature.sample_targets = recorded  # type: ignore[method-assign]
    return drawn


def test_mc_fisher_is_the_mean_of_the_empirical_fishers_of_the_sampled_labels() -> None:
    """mc_samples=3: G is the average of the empirical G of each label set drawn, A the usual."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_data(n=6)
    model = make_mlp()
    pre = KFACPreconditioner(model, fisher_type="mc", mc_samples=3, loss_fn=loss_fn, mc_seed=1)
    drawn = _recording_labels(pre)
    sampled = factors(pre, model, loss_fn, x, y)
    assert len(drawn) == 3 and not all(torch.equal(drawn[0], d) for d in drawn[1:])
    empirical = []
    for labels in drawn:
        reference = make_mlp()
        empirical.append(factors(KFACPreconditioner(reference), reference, loss_fn, x, labels))
    for name, (a, g) in sampled.items():
        torch.testing.assert_close(a, empirical[0][name][0], rtol=1e-12, atol=1e-14)
        mean_g = torch.stack([e[name][1] for e in empirical]).mean(0)
        torch.testing.assert_close(g, mean_g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_fisher_batch_size_runs_the_own_pass_on_the_first_examples(fisher_type: str, reduction: str) -> None:
    """fisher_batch_size=4 of 12: the factors are those of the own pass on the first 4 examples,
    while the preconditioned gradient is still the whole batch's (and its 'sum' scale 1/12)."""
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    x, y = make_data(n=12)
    options = {"fisher_type": fisher_type, "loss_fn": loss_fn, "reduction": reduction, "mc_seed": 5}
    runs = {}
    for label, size, batch in (("sub", 4, (x, y)), ("first", None, (x[:4], y[:4])), ("whole", None, (x, y))):
        model = make_mlp()
        pre = KFACPreconditioner(model, fisher_batch_size=size, **options)
        loss_fn(model(x), y).backward()
        pre.step(batch=batch)
        runs[label] = (pre, [p.grad.clone() for p in model.parameters()])
    (sub, sub_grads), (first, first_grads), (whole, _) = runs["sub"], runs["first"], runs["whole"]
    for name, block in sub.blocks.items():
        for key in ("A", "G"):
            torch.testing.assert_close(
                getattr(block, key), getattr(first.blocks[name], key), rtol=1e-13, atol=0
            )
        assert not torch.allclose(block.A, whole.blocks[name].A)
    for got, expected in zip(sub_grads, first_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    assert all(b.batch_size == 12 for b in sub._capture.hooked)


def test_fisher_batch_size_needs_an_own_pass() -> None:
    with pytest.raises(ValueError, match="fisher_batch_size"):
        KFACPreconditioner(make_mlp(), fisher_batch_size=8)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="fisher_batch_size"):
            KFACPreconditioner(
                make_mlp(), fisher_type="mc", loss_fn=nn.CrossEntropyLoss(), fisher_batch_size=bad
            )


def test_mc_seed_draws_reproducible_labels_and_new_ones_every_step() -> None:
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_data(n=12)
    runs = []
    for global_seed in (0, 1):  # the global generator does not matter with mc_seed
        model = make_mlp()
        pre = KFACPreconditioner(model, fisher_type="mc", loss_fn=loss_fn, mc_seed=7)
        drawn = _recording_labels(pre)
        torch.manual_seed(global_seed)
        for _ in range(3):
            factors(pre, model, loss_fn, x, y)
        runs.append(drawn)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    first = runs[0]
    assert not any(torch.equal(first[i], first[j]) for i in range(3) for j in range(i + 1, 3))
