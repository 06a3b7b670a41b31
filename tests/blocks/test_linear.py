"""Exact reference tests for the K-FAC block of ``nn.Linear`` layers."""

import copy

import pytest
import torch
from torch import nn

from tests.reference import (
    DTYPE,
    EXACT,
    SOLVE,
    Transpose,
    assert_factor_dicts_equal,
    assert_factors_match,
    centered_factors,
    curvlinops_factors,
    curvlinops_gradient_scale,
    dense_preconditioned,
    layer_gradient_matrix,
    library_blocks,
    library_kfac_factors,
    library_preconditioned,
    linear_factors,
    make_loss,
    make_per_example_loss,
    make_target,
    per_example_scale,
    randn,
    record,
    vec,
    with_flatten_head,
)
from torch_kfac import KFAC

D_IN, D_HIDDEN, NUM_OUTPUTS = 4, 3, 5

# Shapes of one example (without the batch dimension): 2-D input, then one and two
# weight-sharing dimensions.
EXAMPLE_SHAPES = [(D_IN,), (3, D_IN), (2, 3, D_IN)]
SHAPE_IDS = ["2d", "3d", "4d"]


class TaggedLinear(nn.Linear):
    """A subclass of ``nn.Linear`` (the library must treat it as a Linear layer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "custom"


def _seeded(seed: int) -> torch.Generator:
    """Seed the global RNG (parameter initialisation) and return a data generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _sharing_model(example_shape, bias: bool) -> nn.Module:
    """``Linear(D_IN, D_HIDDEN)`` ("0") on inputs with weight-sharing dims + flatten head ("2")."""
    return with_flatten_head(nn.Linear(D_IN, D_HIDDEN, bias=bias), example_shape, NUM_OUTPUTS)


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("example_shape", EXAMPLE_SHAPES, ids=SHAPE_IDS)
def test_linear_factors_match_reference(example_shape, bias, batch_size, reduction, loss_kind):
    gen = _seeded(0)
    model = _sharing_model(example_shape, bias)
    x = randn(batch_size, *example_shape, generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, reduction)

    rec = record(model, loss_fn, x, y, ["0", "2"])
    actual = library_kfac_factors(model, loss_fn, x, y, reduction)

    assert set(actual) == {"0", "2"}
    dim_a = D_IN + int(bias)
    assert actual["0"][0].shape == (dim_a, dim_a)
    assert actual["0"][1].shape == (D_HIDDEN, D_HIDDEN)
    assert_factors_match(actual, rec, reduction)


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("example_shape", EXAMPLE_SHAPES, ids=SHAPE_IDS)
def test_linear_factors_same_for_mean_and_sum(example_shape, bias, batch_size, loss_kind):
    """Factors describe the per-example-loss Fisher, whatever the reduction."""
    gen = _seeded(1)
    model = _sharing_model(example_shape, bias)
    x = randn(batch_size, *example_shape, generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)

    factors = {}
    for reduction in ("mean", "sum"):
        loss_fn = make_per_example_loss(loss_kind, reduction)
        factors[reduction] = library_kfac_factors(copy.deepcopy(model), loss_fn, x, y, reduction)
    assert_factor_dicts_equal(factors["mean"], factors["sum"])


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("example_shape", EXAMPLE_SHAPES[:2], ids=SHAPE_IDS[:2])
def test_linear_factors_match_curvlinops(example_shape, bias, reduction, loss_kind):
    gen = _seeded(2)
    batch_size = 4
    model = _sharing_model(example_shape, bias)
    x = randn(batch_size, *example_shape, generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, reduction)

    input_covs, grad_covs = curvlinops_factors(model, loss_fn, x, y)
    rec = record(model, loss_fn, x, y, ["0", "2"])
    actual = library_kfac_factors(model, loss_fn, x, y, reduction)

    scale = curvlinops_gradient_scale(loss_fn, (batch_size, NUM_OUTPUTS))
    for name in ("0", "2"):
        ref_a, ref_g = linear_factors(rec.layers[name], reduction)
        # The independent reference and the library both agree with curvlinops.
        torch.testing.assert_close(ref_a, input_covs[name], **EXACT)
        torch.testing.assert_close(ref_g * scale, grad_covs[name], **EXACT)
        torch.testing.assert_close(actual[name][0], input_covs[name], **EXACT)
        torch.testing.assert_close(actual[name][1] * scale, grad_covs[name], **EXACT)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layout", ["transposed_2d_input", "transposed_3d_input"])
def test_linear_non_contiguous_input(layout, reduction):
    gen = _seeded(3)
    batch_size = 3
    if layout == "transposed_2d_input":
        model = with_flatten_head(nn.Linear(D_IN, D_HIDDEN), (D_IN,), NUM_OUTPUTS)
        x = randn(D_IN, batch_size, generator=gen).T
        name = "0"
    else:
        body = nn.Sequential(Transpose(1, 2), nn.Linear(D_IN, D_HIDDEN))
        model = with_flatten_head(body, (D_IN, 3), NUM_OUTPUTS)
        x = randn(batch_size, D_IN, 3, generator=gen)
        name = "0.1"
    y = make_target("mse", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("mse", reduction)

    rec = record(model, loss_fn, x, y, [name, "2"])
    assert not rec.layers[name].input.is_contiguous()
    actual = library_kfac_factors(model, loss_fn, x, y, reduction)
    assert set(actual) == {name, "2"}
    assert_factors_match(actual, rec, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_subclass(bias, reduction):
    gen = _seeded(4)
    batch_size = 3
    model = with_flatten_head(TaggedLinear(D_IN, D_HIDDEN, bias=bias), (2, D_IN), NUM_OUTPUTS)
    x = randn(batch_size, 2, D_IN, generator=gen)
    y = make_target("ce", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", reduction)

    rec = record(model, loss_fn, x, y, ["0", "2"])
    actual = library_kfac_factors(model, loss_fn, x, y, reduction)
    assert set(actual) == {"0", "2"}
    assert_factors_match(actual, rec, reduction)


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_with_inplace_relu(bias, reduction, loss_kind):
    gen = _seeded(5)
    batch_size = 4
    model = nn.Sequential(
        nn.Linear(D_IN, 6, bias=bias),
        nn.ReLU(inplace=True),
        nn.Linear(6, NUM_OUTPUTS, bias=bias),
    ).to(DTYPE)
    x = randn(batch_size, D_IN, generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, reduction)

    rec = record(model, loss_fn, x, y, ["0", "2"])
    # The ReLU must actually clip something, otherwise the in-place case is vacuous.
    assert (rec.layers["0"].output < 0).any()
    actual = library_kfac_factors(model, loss_fn, x, y, reduction)
    assert set(actual) == {"0", "2"}
    assert_factors_match(actual, rec, reduction)


def test_nested_module_names():
    gen = _seeded(6)
    batch_size = 3
    model = nn.Sequential(
        nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh()),
        nn.Linear(6, NUM_OUTPUTS, bias=False),
    ).to(DTYPE)
    x = randn(batch_size, D_IN, generator=gen)
    y = make_target("ce", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")

    rec = record(model, loss_fn, x, y, ["0.0", "1"])
    actual = library_kfac_factors(model, loss_fn, x, y, "mean")
    assert set(actual) == {"0.0", "1"}
    assert_factors_match(actual, rec, "mean")


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_batch_one_block_equals_exact_empirical_fisher(bias, loss_kind):
    """N = 1, no weight sharing: kron(A, G) = vec(grad l_1) vec(grad l_1)^T exactly."""
    gen = _seeded(7)
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN, bias=bias)).to(DTYPE)
    x = randn(1, D_IN, generator=gen)
    y = make_target(loss_kind, 1, D_HIDDEN, gen)
    loss_fn = make_loss(loss_kind, "mean")

    rec = record(model, loss_fn, x, y, ["0"])
    grad = vec(layer_gradient_matrix(rec.param_grads, "0"))
    fisher = torch.outer(grad, grad)
    big_a, big_g = library_kfac_factors(model, loss_fn, x, y, "mean")["0"]
    torch.testing.assert_close(torch.kron(big_a, big_g), fisher, **EXACT)
    ref_a, ref_g = linear_factors(rec.layers["0"], "mean")
    torch.testing.assert_close(torch.kron(ref_a, ref_g), fisher, **EXACT)


def test_second_fold_is_zero_debiased_ema():
    """After two folds: (decay * F_1 + F_2) / (1 + decay)."""
    gen = _seeded(8)
    decay, batch_size = 0.95, 3
    model = _sharing_model((2, D_IN), True)
    loss_fn = make_loss("mse", "mean")
    batches = [
        (randn(batch_size, 2, D_IN, generator=gen), make_target("mse", batch_size, NUM_OUTPUTS, gen))
        for _ in range(2)
    ]
    recs = [record(model, loss_fn, x, y, ["0", "2"]) for x, y in batches]

    opt = KFAC(model, lr=0.1, damping=1e-3, momentum=0.0, cov_ema_decay=decay, reduction="mean")
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.update_cov()
    for name in ("0", "2"):
        first = linear_factors(recs[0].layers[name], "mean")
        second = linear_factors(recs[1].layers[name], "mean")
        blk = opt.blocks[name]
        for actual, f1, f2 in zip((blk.A, blk.G), first, second, strict=True):
            torch.testing.assert_close(actual, (decay * f1 + f2) / (1 + decay), **EXACT)


# KFACPreconditioner options -> damping type of the dense reference. The default is
# Cholesky inverses of the factors with pi-adjusted factored damping.
SOLVERS = {
    "default": ({}, "factored"),
    "eigh": ({"inverse_method": "eigh"}, "factored"),
    "eigh_exact": ({"inverse_method": "eigh", "damping_type": "exact"}, "exact"),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("damping", [1e-3, 1e-1])
@pytest.mark.parametrize("enable_pi_correction", [True, False], ids=["pi", "nopi"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("example_shape", EXAMPLE_SHAPES[:2], ids=SHAPE_IDS[:2])
def test_preconditioner_matches_dense_solve(
    example_shape, bias, batch_size, enable_pi_correction, damping, solver
):
    options, damping_type = SOLVERS[solver]
    gen = _seeded(9)
    model = _sharing_model(example_shape, bias)
    x = randn(batch_size, *example_shape, generator=gen)
    y = make_target("ce", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")

    rec = record(model, loss_fn, x, y, ["0", "2"])
    grads, factors = library_preconditioned(
        model, loss_fn, x, y, "mean", damping, enable_pi_correction, **options
    )
    assert set(factors) == {"0", "2"}
    for name in ("0", "2"):
        big_a, big_g = linear_factors(rec.layers[name], "mean")
        torch.testing.assert_close(factors[name][0], big_a, **EXACT)
        torch.testing.assert_close(factors[name][1], big_g, **EXACT)
        matrix = layer_gradient_matrix(rec.param_grads, name)
        expected = dense_preconditioned(big_a, big_g, matrix, damping, enable_pi_correction, damping_type)
        actual = layer_gradient_matrix(grads, name)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, **SOLVE)


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("enable_pi_correction", [True, False], ids=["pi", "nopi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("example_shape", EXAMPLE_SHAPES[:2], ids=SHAPE_IDS[:2])
def test_preconditioner_mean_equals_sum(example_shape, bias, enable_pi_correction, loss_kind):
    gen = _seeded(10)
    batch_size = 4
    model = _sharing_model(example_shape, bias)
    x = randn(batch_size, *example_shape, generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)

    results = {}
    for reduction in ("mean", "sum"):
        loss_fn = make_per_example_loss(loss_kind, reduction)
        results[reduction] = library_preconditioned(
            copy.deepcopy(model), loss_fn, x, y, reduction, 1e-2, enable_pi_correction
        )
    mean_grads, sum_grads = results["mean"][0], results["sum"][0]
    assert set(mean_grads) == set(sum_grads)
    for name, mean_grad in mean_grads.items():
        torch.testing.assert_close(sum_grads[name], mean_grad, **SOLVE)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("example_shape", EXAMPLE_SHAPES[:2], ids=SHAPE_IDS[:2])
def test_centered_factors(example_shape, bias, reduction):
    """center=True: inputs and per-example output gradients minus their mean over all rows."""
    gen = _seeded(11)
    batch_size = 4
    model = _sharing_model(example_shape, bias)
    x = randn(batch_size, *example_shape, generator=gen)
    y = make_target("ce", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", reduction)
    rec = record(model, loss_fn, x, y, ["0"]).layers["0"]
    a = rec.input.reshape(-1, D_IN)
    g = rec.grad_output.reshape(-1, D_HIDDEN) * per_example_scale(batch_size, reduction)
    big_a, big_g = centered_factors(a, g, bias, batch_size)
    block = library_blocks(model, loss_fn, x, y, reduction, center=True)["0"]
    torch.testing.assert_close(block.A, big_a, **EXACT)
    torch.testing.assert_close(block.G, big_g, **EXACT)
    uncentered = linear_factors(rec, reduction)
    assert not torch.allclose(uncentered[0], big_a) and not torch.allclose(uncentered[1], big_g)
