"""Exact reference tests for the K-FAC block of ``nn.Conv1d/2d/3d`` layers."""

import copy
import math

import pytest
import torch
from torch import nn

from tests.reference import (
    DTYPE,
    EXACT,
    SOLVE,
    assert_factor_dicts_equal,
    assert_factors_match,
    centered_factors,
    conv_paddings,
    conv_patches,
    curvlinops_factors,
    curvlinops_gradient_scale,
    dense_preconditioned,
    layer_gradient_matrix,
    library_blocks,
    library_kfac_factors,
    library_preconditioned,
    make_loss,
    make_per_example_loss,
    make_target,
    per_example_scale,
    randn,
    record,
    reference_factors,
    with_flatten_head,
)
from torch_kfac import KFAC
from torch_kfac.blocks.base import centered, input_second_moment
from torch_kfac.blocks.conv import ConvBlock, patch_view, sample_patches

C_IN, NUM_OUTPUTS = 4, 3
SPATIAL = {1: (7,), 2: (6, 5), 3: (4, 5, 4)}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
DIMS = [1, 2, 3]
DIM_IDS = ["1d", "2d", "3d"]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def _seeded(seed: int) -> torch.Generator:
    """Seed the global RNG (parameter initialisation) and return a data generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _per_dim(value, dim: int):
    """Keep ints and strings; cut 3-tuples down to ``dim`` entries."""
    return value[:dim] if isinstance(value, tuple) else value


def _conv(dim: int, out_channels: int = 5, **kwargs) -> nn.Module:
    kwargs = {key: _per_dim(value, dim) for key, value in kwargs.items()}
    return CONV[dim](C_IN, out_channels, **kwargs).to(DTYPE)


def _conv_model(conv: nn.Module, dim: int) -> nn.Module:
    """``Sequential(conv ("0"), Flatten, Linear ("2"))``."""
    return with_flatten_head(conv, (C_IN, *SPATIAL[dim]), NUM_OUTPUTS)


def _check_conv_model(model, dim, seed, reduction="mean", loss_kind="mse", batch_size=3, names=("0", "2")):
    """Compare the library's factors with the reference for the named layers."""
    gen = torch.Generator().manual_seed(seed + 1000)
    x = randn(batch_size, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, reduction)
    rec = record(model, loss_fn, x, y, list(names))
    actual = library_kfac_factors(model, loss_fn, x, y, reduction)
    assert set(actual) == set(names)
    assert_factors_match(actual, rec, reduction)
    return rec, actual


# kernel_size, padding and dilation per case (3-tuples are cut to the conv's dimension).
PADDING_CASES = {
    "int": {"kernel_size": 3, "padding": 1},
    "tuple": {"kernel_size": 3, "padding": (2, 1, 0)},
    "valid": {"kernel_size": 3, "padding": "valid"},
    "same_odd": {"kernel_size": (3, 1, 3), "padding": "same"},
    # even kernels: torch pads total = dilation * (k - 1) with left = total // 2
    "same_even": {"kernel_size": (4, 2, 4), "padding": "same"},
    "same_even_dilated": {"kernel_size": 2, "padding": "same", "dilation": (3, 2, 1)},
}


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("case", list(PADDING_CASES))
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_padding(dim, case, padding_mode):
    _seeded(0)
    conv = _conv(dim, padding_mode=padding_mode, **PADDING_CASES[case])
    if case.startswith("same_even"):
        # make sure the asymmetric branch is really exercised
        assert any(left != right for left, right in conv_paddings(conv))
    _check_conv_model(_conv_model(conv, dim), dim, seed=0)


# stride, padding, dilation, kernel per case.
GEOMETRY_CASES = {
    "stride2": {"kernel_size": 3, "stride": 2, "padding": 1},
    "stride_tuple": {"kernel_size": (3, 2, 2), "stride": (2, 1, 3)},
    "dilation2": {"kernel_size": 2, "dilation": 2, "padding": 1},
    "mixed": {"kernel_size": (3, 2, 3), "stride": (2, 1, 2), "padding": (1, 0, 1), "dilation": (1, 2, 1)},
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(GEOMETRY_CASES))
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_geometry(dim, case, bias):
    _seeded(1)
    conv = _conv(dim, bias=bias, **GEOMETRY_CASES[case])
    _, actual = _check_conv_model(_conv_model(conv, dim), dim, seed=1)
    dim_a = conv.weight[0].numel() + int(bias)  # C_in * prod(kernel) [+ 1]
    assert actual["0"][0].shape == (dim_a, dim_a)
    assert actual["0"][1].shape == (5, 5)


GROUP_CASES = {
    "groups1": {"groups": 1, "out_channels": 6},
    "groups2": {"groups": 2, "out_channels": 6},
    "depthwise": {"groups": C_IN, "out_channels": C_IN},
    "depthwise_x2": {"groups": C_IN, "out_channels": 2 * C_IN},
}


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_groups(dim, case, bias, padding_mode):
    _seeded(2)
    groups, out_channels = GROUP_CASES[case]["groups"], GROUP_CASES[case]["out_channels"]
    conv = _conv(
        dim,
        out_channels=out_channels,
        kernel_size=(3, 2, 3),
        stride=(1, 2, 1),
        padding=1,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
    )
    _, actual = _check_conv_model(_conv_model(conv, dim), dim, seed=2)
    big_a, big_g = actual["0"]
    dim_a = conv.weight[0].numel() + int(bias)
    dim_g = out_channels // groups
    if groups == 1:
        assert big_a.shape == (dim_a, dim_a)
        assert big_g.shape == (dim_g, dim_g)
    else:
        assert big_a.shape == (groups, dim_a, dim_a)
        assert big_g.shape == (groups, dim_g, dim_g)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_reductions_and_losses(dim, reduction, loss_kind, batch_size):
    _seeded(3)
    conv = _conv(dim, kernel_size=3, stride=(1, 2, 1), padding=1, groups=2, out_channels=6)
    _check_conv_model(
        _conv_model(conv, dim),
        dim,
        seed=3,
        reduction=reduction,
        loss_kind=loss_kind,
        batch_size=batch_size,
    )


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_factors_same_for_mean_and_sum(dim, loss_kind):
    gen = _seeded(4)
    model = _conv_model(_conv(dim, kernel_size=2, padding="same", padding_mode="reflect"), dim)
    x = randn(3, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target(loss_kind, 3, NUM_OUTPUTS, gen)
    factors = {
        reduction: library_kfac_factors(
            copy.deepcopy(model), make_per_example_loss(loss_kind, reduction), x, y, reduction
        )
        for reduction in ("mean", "sum")
    }
    assert_factor_dicts_equal(factors["mean"], factors["sum"])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_followed_by_inplace_relu(dim, reduction, groups):
    _seeded(5)
    conv = _conv(dim, out_channels=6, kernel_size=3, padding=1, groups=groups)
    model = _conv_model(nn.Sequential(conv, nn.ReLU(inplace=True)), dim)
    rec, _ = _check_conv_model(model, dim, seed=5, reduction=reduction, names=("0.0", "2"))
    # The ReLU must actually clip something, otherwise the in-place case is vacuous.
    assert (rec.layers["0.0"].output < 0).any()


CURVLINOPS_CASES = {
    "basic": {"kernel_size": 3, "padding": 1},
    "stride_padding": {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 2)},
    "dilation": {"kernel_size": 2, "dilation": 2, "padding": 1},
    "same_odd": {"kernel_size": 3, "padding": "same"},
}


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CURVLINOPS_CASES))
def test_conv2d_matches_curvlinops(case, bias, reduction, loss_kind):
    gen = _seeded(6)
    batch_size = 3
    model = _conv_model(_conv(2, bias=bias, **CURVLINOPS_CASES[case]), 2)
    x = randn(batch_size, C_IN, *SPATIAL[2], generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, reduction)

    input_covs, grad_covs = curvlinops_factors(model, loss_fn, x, y)
    rec = record(model, loss_fn, x, y, ["0", "2"])
    actual = library_kfac_factors(model, loss_fn, x, y, reduction)

    scale = curvlinops_gradient_scale(loss_fn, (batch_size, NUM_OUTPUTS))
    for name in ("0", "2"):
        ref_a, ref_g = reference_factors(rec.layers[name], reduction)
        # The independent reference agrees with curvlinops ...
        torch.testing.assert_close(ref_a, input_covs[name], **EXACT)
        torch.testing.assert_close(ref_g * scale, grad_covs[name], **EXACT)
        # ... and so does the library.
        torch.testing.assert_close(actual[name][0], input_covs[name], **EXACT)
        torch.testing.assert_close(actual[name][1] * scale, grad_covs[name], **EXACT)


# KFACPreconditioner options -> damping type of the dense reference.
SOLVERS = {
    "default": ({}, "factored"),
    "eigh_exact": ({"inverse_method": "eigh", "damping_type": "exact"}, "exact"),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("groups", [1, 2, C_IN], ids=["groups1", "groups2", "depthwise"])
@pytest.mark.parametrize("enable_pi_correction", [True, False], ids=["pi", "nopi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_preconditioner_matches_dense_solve(dim, bias, enable_pi_correction, groups, solver):
    """Grouped blocks are preconditioned group by group (each group with its own pi)."""
    options, damping_type = SOLVERS[solver]
    gen = _seeded(7)
    batch_size, damping = 2, 1e-2
    conv = _conv(
        dim,
        out_channels=C_IN,
        kernel_size=2,
        stride=2,
        groups=groups,
        bias=bias,
        padding_mode="replicate",
    )
    model = _conv_model(conv, dim)
    x = randn(batch_size, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target("ce", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")

    rec = record(model, loss_fn, x, y, ["0", "2"])
    grads, factors = library_preconditioned(
        model, loss_fn, x, y, "mean", damping, enable_pi_correction, **options
    )
    assert set(factors) == {"0", "2"}
    for name, name_groups in (("0", groups), ("2", 1)):
        big_a, big_g = reference_factors(rec.layers[name], "mean")
        torch.testing.assert_close(factors[name][0], big_a, **EXACT)
        torch.testing.assert_close(factors[name][1], big_g, **EXACT)
        matrix = layer_gradient_matrix(rec.param_grads, name, name_groups)
        expected = dense_preconditioned(big_a, big_g, matrix, damping, enable_pi_correction, damping_type)
        actual = layer_gradient_matrix(grads, name, name_groups)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, **SOLVE)
    assert grads["0.weight"].shape == conv.weight.shape


@pytest.mark.parametrize("enable_pi_correction", [True, False], ids=["pi", "nopi"])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_preconditioner_mean_equals_sum(dim, enable_pi_correction):
    gen = _seeded(8)
    model = _conv_model(_conv(dim, kernel_size=3, padding=1, padding_mode="reflect"), dim)
    x = randn(3, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target("ce", 3, NUM_OUTPUTS, gen)
    results = {
        reduction: library_preconditioned(
            copy.deepcopy(model),
            make_per_example_loss("ce", reduction),
            x,
            y,
            reduction,
            1e-2,
            enable_pi_correction,
        )[0]
        for reduction in ("mean", "sum")
    }
    assert set(results["mean"]) == set(results["sum"])
    for name, mean_grad in results["mean"].items():
        torch.testing.assert_close(results["sum"][name], mean_grad, **SOLVE)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_centered_factors(dim, bias, reduction):
    """center=True: patches and per-example output gradients minus their mean over all locations."""
    _seeded(12)
    conv = _conv(dim, kernel_size=2, stride=1, padding=1, bias=bias)
    model = _conv_model(conv, dim)
    gen = torch.Generator().manual_seed(13)
    batch_size = 3
    x = randn(batch_size, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target("ce", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", reduction)
    rec = record(model, loss_fn, x, y, ["0"]).layers["0"]
    patches, _ = conv_patches(conv, rec.input)
    g = rec.grad_output.movedim(1, -1).reshape(-1, conv.out_channels)
    g = g * per_example_scale(batch_size, reduction)
    big_a, big_g = centered_factors(patches.reshape(-1, patches.shape[-1]), g, bias, batch_size)
    block = library_blocks(model, loss_fn, x, y, reduction, center=True)["0"]
    torch.testing.assert_close(block.A, big_a, **EXACT)
    torch.testing.assert_close(block.G, big_g, **EXACT)


# ---------------------------------------------------------------- patch sampling (patches_per_dim)
SAMPLING_CASES = {
    "padded": {"kernel_size": 3, "padding": 1},
    "strided_dilated": {"kernel_size": 2, "stride": 2, "dilation": (2, 1, 1)},
    "same_even": {"kernel_size": (4, 2, 4), "padding": "same"},
}


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("case", list(SAMPLING_CASES))
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_sampled_patches_are_the_drawn_patches(dim, case, groups, padding_mode):
    """Each drawn row is the input patch of the drawn (example, output position), in every geometry."""
    conv = _conv(dim, out_channels=4, groups=groups, padding_mode=padding_mode, **SAMPLING_CASES[case])
    x = randn(3, C_IN, *SPATIAL[dim], generator=torch.Generator().manual_seed(dim))
    reference, _ = conv_patches(conv, x)  # (N, T, groups, d)
    n, t = reference.shape[:2]
    view = patch_view(x, conv)
    drawn = sample_patches(view, groups, 11, torch.Generator().manual_seed(5))
    flat = torch.randint(n * t, (11,), generator=torch.Generator().manual_seed(5))
    expected = reference.reshape(n * t, groups, -1)[flat].transpose(0, 1)
    assert drawn.shape == expected.shape
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)


def _sampling_block(
    dim: int, per_dim: float | None, approximation: str = "kfac", kfac_approx: str = "expand"
):
    conv = _conv(dim, out_channels=3, kernel_size=2, padding=1)
    block = ConvBlock(conv)
    block.configure(approximation, kfac_approx=kfac_approx)
    block.patches_per_dim = per_dim
    return block


def _a_statistic(block: ConvBlock, x: torch.Tensor) -> torch.Tensor:
    block.clear_pending()
    block.record_inputs((x,))
    return block.pending("A").clone()


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_sampled_input_factor_is_unbiased(dim):
    """A from drawn patches averages to the exact A; one draw differs from it (it is sampled)."""
    x = randn(4, C_IN, *SPATIAL[dim], generator=torch.Generator().manual_seed(7))
    exact = _a_statistic(_sampling_block(dim, None), x)
    block = _sampling_block(dim, 0.5)  # d = 4 * 2^dim + 1 rows: 0.5 d of the N x T patches
    draws = torch.stack([_a_statistic(block, x) for _ in range(3000)])
    assert not torch.allclose(draws[0], exact, atol=1e-3)
    # The mean of 3000 draws is within 5 standard errors of the exact average, entry by entry.
    stderr = draws.std(0) / 3000**0.5
    assert ((draws.mean(0) - exact).abs() <= 5 * stderr + 1e-12).all()


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_sampled_input_factor_is_the_moment_of_the_drawn_patches(dim, center):
    """ceil(patches_per_dim * d) patches from the block's generator (seeded 0); centered on request."""
    x = randn(4, C_IN, *SPATIAL[dim], generator=torch.Generator().manual_seed(2))
    block = _sampling_block(dim, 0.7)
    block.record_inputs((x,), center=center)
    dim_a = C_IN * 2**dim + 1  # kernel 2 in every dimension, and the bias
    rows = sample_patches(
        patch_view(x, block.module), 1, math.ceil(0.7 * dim_a), torch.Generator().manual_seed(0)
    )
    expected = input_second_moment(centered(rows) if center else rows, bias=True)
    torch.testing.assert_close(block.pending("A"), expected, rtol=1e-14, atol=1e-14)
    assert block.batch_size == 4


@pytest.mark.parametrize(
    ("per_dim", "approximation", "kfac_approx"),
    [
        (1e6, "kfac", "expand"),
        (0.5, "ekfac", "expand"),
        (0.5, "kfac", "reduce"),
        (None, "kfac", "expand"),
    ],
    ids=["more-than-all", "ekfac", "reduce", "off"],
)
def test_input_factor_is_exact_where_sampling_does_not_apply(per_dim, approximation, kfac_approx):
    """No fewer draws than patches, EKFAC (patches paired with gradients), 'reduce' and None: exact."""
    x = randn(4, C_IN, *SPATIAL[2], generator=torch.Generator().manual_seed(3))
    exact = _a_statistic(_sampling_block(2, None, approximation, kfac_approx), x)
    sampled = _a_statistic(_sampling_block(2, per_dim, approximation, kfac_approx), x)
    torch.testing.assert_close(sampled, exact, rtol=0, atol=0)


def test_patch_sampling_leaves_the_global_random_stream_alone():
    """The block's own generator draws the patches; the option reaches every conv block of KFAC."""
    torch.manual_seed(0)
    model = _conv_model(_conv(2, kernel_size=3, padding=1), 2)
    opt = KFAC(model, lr=0.1, damping=1e-2, patches_per_dim=0.5)
    (conv_block,) = [b for b in opt.preconditioner.blocks.values() if isinstance(b, ConvBlock)]
    assert conv_block.patches_per_dim == 0.5
    x = randn(4, C_IN, *SPATIAL[2], generator=torch.Generator().manual_seed(1))
    state = torch.random.get_rng_state()
    model(x).sum().backward()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert conv_block.has_pending("A")


def test_patch_draws_of_a_restored_run_are_those_of_an_uninterrupted_run():
    """The draws of each step are seeded from (step, block): a run saved after 3 steps and loaded
    into a new optimizer ends, 3 steps later, bit for bit where the uninterrupted run ends (with
    one generator stream per block, the new optimizer would draw the first steps' patches again)."""
    gen = torch.Generator().manual_seed(4)
    batches = [
        (randn(4, C_IN, *SPATIAL[2], generator=gen), randn(4, NUM_OUTPUTS, generator=gen)) for _ in range(6)
    ]

    def build() -> tuple[nn.Module, KFAC]:
        torch.manual_seed(0)
        model = _conv_model(_conv(2, kernel_size=3, padding=1), 2)
        return model, KFAC(model, lr=0.1, damping=1e-2, patches_per_dim=0.5, inverse_update_steps=1)

    def train(model: nn.Module, opt: KFAC, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in steps:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model, opt = build()
    (conv_block,) = [b for b in opt.preconditioner.blocks.values() if isinstance(b, ConvBlock)]
    train(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, batches[3:])

    restored, restored_opt = build()
    restored.load_state_dict(saved_model)
    restored_opt.load_state_dict(saved_opt)
    train(restored, restored_opt, batches[3:])
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(conv_block.A, restored_opt.preconditioner.blocks["0"].A)
    # The steps drew different patches: the factor is not that of one repeated draw.
    steps_a = []
    for k in range(2):
        conv_block.seed_patches(k)
        steps_a.append(_a_statistic(conv_block, batches[0][0]))
    assert not torch.equal(steps_a[0], steps_a[1])
