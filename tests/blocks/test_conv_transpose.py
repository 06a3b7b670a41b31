"""Exact reference tests for the K-FAC block of ``nn.ConvTranspose1d/2d/3d`` layers.

The reference turns the recorded transposed convolution into the stride-1 convolution it equals
(stride-dilated, padded input; flipped, in/out-swapped kernel), checks that this convolution
reproduces the module's output, and takes the convolution's factors from explicitly extracted
patches.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.reference import (
    DTYPE,
    EXACT,
    SOLVE,
    conv_factors,
    conv_patches,
    conv_transpose_equivalent,
    conv_transpose_equivalent_weight,
    dense_preconditioned,
    gradient_matrix,
    identity_preconditioned_loss,
    library_kfac_factors,
    library_preconditioned,
    library_step,
    make_loss,
    make_per_example_loss,
    make_target,
    per_example_gradients_vmap,
    per_example_scale,
    randn,
    record,
    with_flatten_head,
)
from torch_kfac import KFAC
from torch_kfac.blocks import ConvTransposeBlock, block_type_for

C_IN, C_OUT, NUM_OUTPUTS = 4, 6, 3
SPATIAL = {1: (4,), 2: (3, 2), 3: (2, 2, 2)}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
DIMS = [1, 2, 3]
DIM_IDS = ["1d", "2d", "3d"]


def _seeded(seed: int) -> torch.Generator:
    """Seed the global RNG (parameter initialisation) and return a data generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _per_dim(value, dim: int):
    """Keep ints; cut 3-tuples down to ``dim`` entries."""
    return value[:dim] if isinstance(value, tuple) else value


def _conv_t(dim: int, out_channels: int = C_OUT, **kwargs) -> nn.Module:
    kwargs = {key: _per_dim(value, dim) for key, value in kwargs.items()}
    return CONV_T[dim](C_IN, out_channels, **kwargs).to(DTYPE)


def _model(conv_t: nn.Module, dim: int) -> nn.Module:
    """``Sequential(conv_t ("0"), Flatten, Linear ("2"))``."""
    return with_flatten_head(conv_t, (C_IN, *SPATIAL[dim]), NUM_OUTPUTS)


def _check(model, dim, seed, reduction="mean", loss_kind="mse", batch_size=3):
    """Library factors of "0" and "2" equal the reference's; the equivalent conv reproduces the
    output, the block's layout maps the weight to it, and per-example gradients are the
    equivalent conv's sum over positions of g a^T."""
    gen = torch.Generator().manual_seed(seed + 1000)
    x = randn(batch_size, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, reduction)
    rec = record(model, loss_fn, x, y, ["0", "2"])
    layer = rec.layers["0"]
    module = layer.module
    equivalent = conv_transpose_equivalent(layer)
    conv = equivalent.module
    torch.testing.assert_close(conv(equivalent.input), layer.output, **EXACT)
    groups = module.groups

    block = ConvTransposeBlock(module, "0")
    expected_layout = gradient_matrix(
        conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), groups
    )
    layout = block.to_matrix(module.weight.detach(), None if module.bias is None else module.bias.detach())
    assert torch.equal(layout.reshape(expected_layout.shape), expected_layout)
    # The layout also runs the equivalent convolution with torch's own conv.
    weight = layout[..., : layout.shape[-1] - (module.bias is not None)].reshape(conv.weight.shape)
    torch.testing.assert_close(
        CONV[dim](equivalent.input, weight, module.bias, dilation=module.dilation, groups=groups),
        layer.output,
        **EXACT,
    )

    patches, _ = conv_patches(conv, equivalent.input)  # (N, T, groups, d_in)
    g = layer.grad_output.movedim(1, -1).reshape(batch_size, -1, groups, module.out_channels // groups)
    g = g * per_example_scale(batch_size, reduction)
    per_example = per_example_gradients_vmap(model, loss_fn, x, y)["0.weight"]
    mapped = torch.stack([conv_transpose_equivalent_weight(w, groups) for w in per_example])
    expected = torch.einsum("ntgo,ntgi->ngoi", g, patches)
    torch.testing.assert_close(mapped.reshape(expected.shape), expected, **EXACT)

    actual = library_kfac_factors(model, loss_fn, x, y, reduction)
    assert set(actual) == {"0", "2"}
    big_a, big_g = conv_factors(equivalent, reduction)
    torch.testing.assert_close(actual["0"][0], big_a, **EXACT)
    torch.testing.assert_close(actual["0"][1], big_g, **EXACT)
    return actual


# kernel, stride, padding, output padding, dilation per case (3-tuples cut to the dimension).
GEOMETRY_CASES = {
    "plain": {"kernel_size": 3},
    "stride2": {"kernel_size": 3, "stride": 2},
    "stride2_padding1_output_padding1": {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},
    "dilation2": {"kernel_size": 2, "dilation": 2, "padding": 1},
    "stride3_dilation2_output_padding2": {"kernel_size": 2, "stride": 3, "dilation": 2, "output_padding": 2},
    "padding_beyond_kernel": {"kernel_size": 2, "stride": 3, "padding": 2},
    "kernel1_stride2": {"kernel_size": 1, "stride": 2},
    "mixed": {
        "kernel_size": (3, 2, 2),
        "stride": (2, 1, 3),
        "padding": (1, 0, 1),
        "output_padding": (1, 0, 2),
        "dilation": (1, 2, 1),
    },
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(GEOMETRY_CASES))
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_transpose_geometry(dim, case, bias):
    _seeded(0)
    conv_t = _conv_t(dim, bias=bias, **GEOMETRY_CASES[case])
    actual = _check(_model(conv_t, dim), dim, seed=0)
    dim_a = C_IN * conv_t.weight[0, 0].numel() + int(bias)  # C_in * prod(kernel) [+ 1]
    assert actual["0"][0].shape == (dim_a, dim_a)
    assert actual["0"][1].shape == (C_OUT, C_OUT)


GROUP_CASES = {"groups2": (2, C_OUT), "depthwise": (C_IN, C_IN), "depthwise_x2": (C_IN, 2 * C_IN)}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_transpose_groups(dim, case, bias):
    _seeded(1)
    groups, out_channels = GROUP_CASES[case]
    conv_t = _conv_t(
        dim, out_channels, kernel_size=(3, 2, 2), stride=(2, 1, 2), padding=1, groups=groups, bias=bias
    )
    actual = _check(_model(conv_t, dim), dim, seed=1)
    big_a, big_g = actual["0"]
    dim_a = C_IN // groups * conv_t.weight[0, 0].numel() + int(bias)
    assert big_a.shape == (groups, dim_a, dim_a)
    assert big_g.shape == (groups, out_channels // groups, out_channels // groups)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_transpose_reductions_and_losses(dim, reduction, loss_kind, batch_size):
    _seeded(2)
    conv_t = _conv_t(dim, kernel_size=2, stride=2, padding=1, output_padding=1)
    _check(_model(conv_t, dim), dim, seed=2, reduction=reduction, loss_kind=loss_kind, batch_size=batch_size)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_transpose_factors_same_for_mean_and_sum(dim):
    gen = _seeded(3)
    model = _model(_conv_t(dim, kernel_size=3, stride=2), dim)
    x = randn(4, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target("mse", 4, NUM_OUTPUTS, gen)
    factors = {
        r: library_kfac_factors(copy.deepcopy(model), make_per_example_loss("mse", r), x, y, r)
        for r in ("mean", "sum")
    }
    for name, (big_a, big_g) in factors["mean"].items():
        torch.testing.assert_close(factors["sum"][name][0], big_a, **EXACT)
        torch.testing.assert_close(factors["sum"][name][1], big_g, **EXACT)


class OutputSized(nn.Module):
    """A transposed conv asked for a given output size (positionally or by keyword)."""

    def __init__(self, conv_t: nn.Module, size: list[int], keyword: bool) -> None:
        super().__init__()
        self.conv_t, self.size, self.keyword = conv_t, size, keyword

    def forward(self, x):
        return self.conv_t(x, output_size=self.size) if self.keyword else self.conv_t(x, self.size)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_output_size_argument(dim):
    """A positional output_size sets the output padding of that call; a keyword one (invisible
    to forward hooks) is reported instead of giving wrong statistics."""
    gen = _seeded(4)
    conv_t = _conv_t(dim, kernel_size=3, stride=3, padding=1)
    size = [(s - 1) * 3 - 2 + 3 + 2 for s in SPATIAL[dim]]  # the largest valid size: output padding 2
    body = OutputSized(conv_t, size, keyword=False)
    model = with_flatten_head(body, (C_IN, *SPATIAL[dim]), NUM_OUTPUTS)
    x = randn(3, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target("mse", 3, NUM_OUTPUTS, gen)
    loss_fn = make_loss("mse", "mean")
    rec = record(model, loss_fn, x, y, ["0.conv_t"])
    assert list(rec.layers["0.conv_t"].output.shape[2:]) == size
    equivalent = conv_transpose_equivalent(rec.layers["0.conv_t"])
    torch.testing.assert_close(equivalent.module(equivalent.input), rec.layers["0.conv_t"].output, **EXACT)
    actual = library_kfac_factors(model, loss_fn, x, y, "mean")
    big_a, big_g = conv_factors(equivalent, "mean")
    torch.testing.assert_close(actual["0.conv_t"][0], big_a, **EXACT)
    torch.testing.assert_close(actual["0.conv_t"][1], big_g, **EXACT)

    body.keyword = True
    opt = KFAC(model, lr=0.1)
    with pytest.raises(ValueError, match="pass output_size positionally"):
        loss_fn(model(x), y).backward()
    opt.close()


SOLVERS = {
    "default": ({}, "factored"),
    "eigh": ({"inverse_method": "eigh"}, "factored"),
    "eigh_exact": ({"inverse_method": "eigh", "damping_type": "exact"}, "exact"),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("groups", [1, 2], ids=["groups1", "groups2"])
@pytest.mark.parametrize("enable_pi_correction", [True, False], ids=["pi", "nopi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_transpose_preconditioner_matches_dense_solve(dim, bias, enable_pi_correction, groups, solver):
    """Grouped blocks are preconditioned group by group (each group with its own pi)."""
    options, damping_type = SOLVERS[solver]
    gen = _seeded(5)
    damping = 1e-2
    conv_t = _conv_t(dim, kernel_size=2, stride=2, padding=1, groups=groups, bias=bias)
    model = _model(conv_t, dim)
    x = randn(2, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target("ce", 2, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")

    rec = record(model, loss_fn, x, y, ["0", "2"])
    equivalent = conv_transpose_equivalent(rec.layers["0"])
    big_a, big_g = conv_factors(equivalent, "mean")
    grads, factors = library_preconditioned(
        model, loss_fn, x, y, "mean", damping, enable_pi_correction, **options
    )
    torch.testing.assert_close(factors["0"][0], big_a, **EXACT)
    torch.testing.assert_close(factors["0"][1], big_g, **EXACT)

    def equivalent_matrix(param_grads):
        weight = conv_transpose_equivalent_weight(param_grads["0.weight"], groups)
        return gradient_matrix(weight, param_grads.get("0.bias"), groups)

    matrix = equivalent_matrix(rec.param_grads)
    expected = dense_preconditioned(big_a, big_g, matrix, damping, enable_pi_correction, damping_type)
    actual = equivalent_matrix(grads)
    assert grads["0.weight"].shape == conv_t.weight.shape
    torch.testing.assert_close(actual, expected, **SOLVE)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_transpose_preconditioner_mean_equals_sum(dim):
    gen = _seeded(6)
    model = _model(_conv_t(dim, kernel_size=3, stride=2, padding=1, output_padding=1), dim)
    x = randn(3, C_IN, *SPATIAL[dim], generator=gen)
    y = make_target("ce", 3, NUM_OUTPUTS, gen)
    results = {
        r: library_step(copy.deepcopy(model), make_per_example_loss("ce", r), x, y, r, 1e-2, True)[0]
        for r in ("mean", "sum")
    }
    for name, grad in results["mean"].items():
        torch.testing.assert_close(results["sum"][name], grad, **SOLVE)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_layout_round_trip_and_curvature_product(dim, groups):
    gen = _seeded(7)
    conv_t = _conv_t(dim, kernel_size=(3, 2, 2), stride=2, groups=groups)
    block = ConvTransposeBlock(conv_t, "t")
    weight = randn(*conv_t.weight.shape, generator=gen)
    bias = randn(C_OUT, generator=gen)
    mat = block.to_matrix(weight, bias)
    assert mat.shape == (groups, C_OUT // groups, C_IN // groups * conv_t.weight[0, 0].numel() + 1)
    back_weight, back_bias = block.from_matrix(mat)
    assert torch.equal(back_weight, weight) and torch.equal(back_bias, bias)
    expected = gradient_matrix(conv_transpose_equivalent_weight(weight, groups), bias, groups)
    assert torch.equal(mat.reshape(expected.shape), expected)


def test_unbatched_input_equals_batch_of_one():
    gen = _seeded(8)
    conv_t = _conv_t(2, kernel_size=2, stride=2)
    x = randn(C_IN, *SPATIAL[2], generator=gen)
    blocks = []
    for inp in (x, x[None]):
        module = copy.deepcopy(conv_t)
        opt = KFAC(module, lr=0.1)
        module(inp).square().sum().backward()
        opt.update_cov()
        blocks.append(opt.blocks[""])
    assert blocks[0].batch_size == 1
    torch.testing.assert_close(blocks[0].A, blocks[1].A, **EXACT)
    torch.testing.assert_close(blocks[0].G, blocks[1].G, **EXACT)


def test_registry_and_subclass():
    class TaggedConvTranspose(nn.ConvTranspose2d):
        pass

    for dim in DIMS:
        assert block_type_for(CONV_T[dim](2, 2, 1)) is ConvTransposeBlock
    assert block_type_for(TaggedConvTranspose(2, 2, 1)) is ConvTransposeBlock


def _autoencoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),
    ).to(DTYPE)


def _train(opt: KFAC, model: nn.Module, x, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_conv_batchnorm_conv_transpose_model_with_kfac():
    """Every parameter is in a block, K-FAC reduces the loss, and the state dict round-trips."""
    gen = _seeded(9)
    x = randn(8, 2, 6, 6, generator=gen)
    model = _autoencoder(0)
    kwargs = {"damping": 1e-1, "momentum": 0.5, "inverse_update_steps": 2, "norm_constraint": None}
    opt = KFAC(model, 0.2, **kwargs)
    report = opt.preconditioner.describe()
    assert "fallback" not in report
    assert "ConvBlock" in report and "BatchNormBlock" in report and "ConvTransposeBlock" in report
    owned = {id(p) for b in opt.blocks.values() for p in b.parameters()}
    assert owned == {id(p) for p in model.parameters()}

    losses = _train(opt, model, x, 10)
    assert losses[-1] < 0.6 * losses[0]
    # The identity-preconditioned run ends higher (measured: K-FAC at 0.59 of it).
    plain = identity_preconditioned_loss(_autoencoder(0), lambda m: F.mse_loss(m(x), x), 10, 0.2, 0.5)
    assert losses[-1] < 0.75 * plain, (losses[-1], plain)

    fresh = _autoencoder(1)
    fresh.load_state_dict(model.state_dict())
    fresh_opt = KFAC(fresh, 0.5, **kwargs)
    fresh_opt.load_state_dict(opt.state_dict())
    _train(opt, model, x, 3)
    _train(fresh_opt, fresh, x, 3)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, block in opt.blocks.items():
        other = fresh_opt.blocks[name].state
        assert set(block.state) == set(other)
        for key, value in block.state.items():
            assert torch.equal(value, other[key]), (name, key)


@pytest.mark.parametrize("groups", [1, 2])
def test_diagonal_approximation_is_the_exact_fisher_diagonal(groups):
    """The Linear/Conv approximations apply through the equivalent convolution: 'diagonal' is
    E[(per-example gradient)^2] in the equivalent layout."""
    gen = _seeded(10)
    conv_t = _conv_t(2, kernel_size=3, stride=2, padding=1, output_padding=1, groups=groups)
    model = _model(conv_t, 2)
    x = randn(4, C_IN, *SPATIAL[2], generator=gen)
    y = make_target("ce", 4, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")
    per_example = per_example_gradients_vmap(model, loss_fn, x, y)
    matrices = torch.stack(
        [
            gradient_matrix(conv_transpose_equivalent_weight(w, groups), b, groups)
            for w, b in zip(per_example["0.weight"], per_example["0.bias"], strict=True)
        ]
    )
    expected = matrices.square().mean(0).reshape(groups, C_OUT // groups, -1)
    _, pre = library_step(model, loss_fn, x, y, "mean", 1e-2, True, approximation="diagonal")
    state = pre.blocks["0"].state
    torch.testing.assert_close(state["D_ema"] / state["D_weight"], expected, **EXACT)
