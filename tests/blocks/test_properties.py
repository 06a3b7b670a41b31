"""Property-based tests: random layer configurations against the independent references.

Each test draws a layer configuration (geometry, shapes, flags, call options), a batch and a loss,
and compares the library's curvature with the brute-force references of `tests.reference` and the
family test modules: explicitly extracted convolution patches, recorded output gradients summed as
outer products, per-example gradients by an explicit loop, the attention and recurrences rewritten
by hand, and dense Kronecker solves. All in float64 with the exact-reference tolerances.

The example budget comes from the hypothesis profile (`tests/conftest.py`): 'ci' (the default) runs
a fixed, derandomized set of `weight` examples per test; `--hypothesis-profile=thorough` (or
HYPOTHESIS_PROFILE=thorough) draws ten times as many at random.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.blocks import test_attention as attention
from tests.blocks import test_norm as norms
from tests.blocks import test_rnn as rnn
from tests.reference import (
    DTYPE,
    EXACT,
    SOLVE,
    assert_factors_match,
    conv_factors,
    conv_transpose_equivalent,
    dense_preconditioned,
    layer_gradient_matrix,
    library_blocks,
    library_kfac_factors,
    library_preconditioned,
    make_loss,
    make_target,
    randn,
    record,
    reference_factors,
    with_flatten_head,
)

NUM_OUTPUTS = 3
REDUCTIONS = st.sampled_from(["mean", "sum"])
LOSSES = st.sampled_from(["mse", "ce"])
SEEDS = st.integers(0, 2**16)


def budget(weight: int) -> settings:
    """`weight` examples under the 'ci' profile (100 examples by default), scaled with the profile's."""
    return settings(max_examples=max(1, weight * settings.default.max_examples // 100))


def _data(input_shape: tuple[int, ...], batch_size: int, loss_kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    x = randn(batch_size, *input_shape, generator=gen)
    return x, make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)


# ------------------------------------------------------------------------------ convolution
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
#: Largest spatial size per dimension count (the reference loops over output positions).
MAX_SIZE = {1: 7, 2: 5, 3: 4}


@st.composite
def conv_configs(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...]]:
    """A Conv1d/2d/3d with random geometry, and an input shape it accepts (without the batch)."""
    dim = draw(st.integers(1, 3))
    per_dim = st.lists(st.integers(1, 2), min_size=dim, max_size=dim).map(tuple)
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = draw(st.lists(st.integers(1, 3), min_size=dim, max_size=dim).map(tuple))
    dilation = draw(per_dim)
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * dim if kind == "same" else draw(per_dim)
    padding: int | str | tuple[int, ...]
    if kind == "int":
        padding = draw(st.integers(0, 2))
        pads = [(padding, padding)] * dim
    elif kind == "tuple":
        padding = draw(st.lists(st.integers(0, 2), min_size=dim, max_size=dim).map(tuple))
        pads = [(p, p) for p in padding]
    elif kind == "same":
        padding = "same"
        spans = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        pads = [(span // 2, span - span // 2) for span in spans]  # torch's split: left = total // 2
    else:
        padding = "valid"
        pads = [(0, 0)] * dim
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    sizes = []
    for (left, right), k, d in zip(pads, kernel, dilation, strict=True):
        low = max(1, d * (k - 1) + 1 - left - right)  # at least one output position
        if mode == "reflect":
            low = max(low, max(left, right) + 1)
        elif mode == "circular":
            low = max(low, left, right)
        sizes.append(draw(st.integers(low, max(low, MAX_SIZE[dim]))))
    conv = CONV[dim](
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
    )
    return conv, (c_in, *sizes)


@budget(40)
@given(conv_configs(), st.integers(1, 3), REDUCTIONS, LOSSES, SEEDS, st.booleans())
def test_conv_geometry_matches_patch_reference(config, batch_size, reduction, loss_kind, seed, pi):
    """Factors from explicitly extracted patches (self-checked against the module's output) and the
    preconditioned gradient of a dense Kronecker solve, group by group."""
    conv, input_shape = config
    torch.manual_seed(seed)
    model = with_flatten_head(conv, input_shape, NUM_OUTPUTS)
    x, y = _data(input_shape, batch_size, loss_kind, seed)
    loss_fn = make_loss(loss_kind, reduction)
    rec = record(model, loss_fn, x, y, ["0", "2"])
    damping = 1e-2
    grads, factors = library_preconditioned(model, loss_fn, x, y, reduction, damping, pi)
    assert set(factors) == {"0", "2"}
    for name, groups in (("0", conv.groups), ("2", 1)):
        big_a, big_g = reference_factors(rec.layers[name], reduction)
        torch.testing.assert_close(factors[name][0], big_a, **EXACT)
        torch.testing.assert_close(factors[name][1], big_g, **EXACT)
        scale = 1.0 if reduction == "mean" else 1.0 / batch_size  # the library preconditions mean-loss grads
        matrix = layer_gradient_matrix(rec.param_grads, name, groups) * scale
        expected = dense_preconditioned(big_a, big_g, matrix, damping, pi)
        torch.testing.assert_close(layer_gradient_matrix(grads, name, groups), expected, **SOLVE)


@st.composite
def conv_transpose_configs(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...]]:
    """A ConvTranspose1d/2d/3d with random stride, padding, output padding, dilation and groups."""
    dim = draw(st.integers(1, 3))

    def per_dim(low: int, high: int) -> tuple[int, ...]:
        return tuple(draw(st.lists(st.integers(low, high), min_size=dim, max_size=dim)))

    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel, stride, dilation = per_dim(1, 3), per_dim(1, 3), per_dim(1, 2)
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True))
    padding = per_dim(0, 2)
    sizes = []
    for k, s, d, p, op in zip(kernel, stride, dilation, padding, output_padding, strict=True):
        # output size (n - 1) s - 2 p + d (k - 1) + op + 1 must be positive
        low = max(1, math.ceil((2 * p - d * (k - 1) - op) / s) + 1)
        sizes.append(draw(st.integers(low, max(low, MAX_SIZE[dim] - 2))))
    conv_t = CONV_T[dim](
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
    )
    return conv_t, (c_in, *sizes)


@budget(30)
@given(conv_transpose_configs(), st.integers(1, 3), REDUCTIONS, LOSSES, SEEDS)
def test_conv_transpose_geometry_matches_equivalent_convolution(
    config, batch_size, reduction, loss_kind, seed
):
    """Factors of the stride-1 convolution the transposed one equals (itself checked to reproduce
    the module's output), from explicitly extracted patches."""
    conv_t, input_shape = config
    torch.manual_seed(seed)
    model = with_flatten_head(conv_t, input_shape, NUM_OUTPUTS)
    x, y = _data(input_shape, batch_size, loss_kind, seed)
    loss_fn = make_loss(loss_kind, reduction)
    rec = record(model, loss_fn, x, y, ["0", "2"])
    equivalent = conv_transpose_equivalent(rec.layers["0"])
    torch.testing.assert_close(equivalent.module(equivalent.input), rec.layers["0"].output, **EXACT)
    actual = library_kfac_factors(model, loss_fn, x, y, reduction)
    big_a, big_g = conv_factors(equivalent, reduction)
    torch.testing.assert_close(actual["0"][0], big_a, **EXACT)
    torch.testing.assert_close(actual["0"][1], big_g, **EXACT)
    assert_factors_match(actual, rec, reduction, names=["2"])


# ------------------------------------------------------------------------------------ linear
@budget(30)
@given(
    st.lists(st.integers(1, 3), max_size=3),
    st.integers(1, 4),
    st.integers(1, 4),
    st.booleans(),
    st.integers(1, 3),
    REDUCTIONS,
    LOSSES,
    SEEDS,
    st.booleans(),
)
def test_linear_leading_dimensions(leading, d_in, d_out, bias, batch_size, reduction, loss_kind, seed, pi):
    """Any number of weight-sharing dimensions: factors from recorded inputs and output gradients,
    and the preconditioned gradient of a dense Kronecker solve."""
    torch.manual_seed(seed)
    input_shape = (*leading, d_in)
    model = with_flatten_head(nn.Linear(d_in, d_out, bias=bias), input_shape, NUM_OUTPUTS)
    x, y = _data(input_shape, batch_size, loss_kind, seed)
    loss_fn = make_loss(loss_kind, reduction)
    rec = record(model, loss_fn, x, y, ["0", "2"])
    damping = 1e-2
    grads, factors = library_preconditioned(model, loss_fn, x, y, reduction, damping, pi)
    assert factors["0"][0].shape == (d_in + bias, d_in + bias)
    assert_factors_match(factors, rec, reduction)
    scale = 1.0 if reduction == "mean" else 1.0 / batch_size
    for name in ("0", "2"):
        matrix = layer_gradient_matrix(rec.param_grads, name) * scale
        expected = dense_preconditioned(*factors[name], matrix, damping, pi)
        torch.testing.assert_close(layer_gradient_matrix(grads, name), expected, **SOLVE)


# -------------------------------------------------------------------------------- norm layers
@st.composite
def norm_configs(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...], str, int]:
    """A normalization layer with random shape and affine flags, an example shape and a mode
    ('train'/'eval'), and a batch size for which the layer's statistics are defined."""
    family = draw(st.sampled_from(["batch", "instance", "group", "layer", "rms"]))
    mode = draw(st.sampled_from(["train", "eval"]))
    batch_size = draw(st.integers(1, 3))
    if family in ("batch", "instance"):
        dim = draw(st.integers(1, 3))
        channels = draw(st.integers(1, 3))
        if family == "batch":
            cls = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1]
            length = draw(st.integers(0, 1)) if dim == 1 else dim  # BatchNorm1d: (N, C) or (N, C, L)
            spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=length, max_size=length)))
        else:
            cls = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dim - 1]
            spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=dim, max_size=dim)))
            if math.prod(spatial) == 1:
                spatial = (2, *spatial[1:])  # instance statistics need two positions
        layer = cls(channels, affine=draw(st.booleans()), track_running_stats=draw(st.booleans()))
        if family == "batch" and mode == "train" and batch_size * math.prod(spatial) == 1:
            batch_size = 2  # batch statistics of one value per channel are undefined
        return layer, (channels, *spatial), mode, batch_size
    if family == "group":
        groups = draw(st.integers(1, 3))
        channels = groups * draw(st.integers(1, 2))
        spatial = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        if channels // groups * math.prod(spatial) == 1:
            spatial = (2, *spatial[1:])  # a group of one value is constant
        layer = nn.GroupNorm(groups, channels, affine=draw(st.booleans()))
        return layer, (channels, *spatial), mode, batch_size
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    if shape == (1,):
        shape = (2,)  # one normalized value is constant
    leading = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    affine = draw(st.booleans())
    if family == "layer":
        layer = nn.LayerNorm(shape, elementwise_affine=affine, bias=draw(st.booleans()))
    else:
        layer = nn.RMSNorm(shape, elementwise_affine=affine)
    return layer, (*leading, *shape), mode, batch_size


@budget(30)
@given(norm_configs(), REDUCTIONS, LOSSES, SEEDS)
def test_norm_shapes_and_affine_flags(config, reduction, loss_kind, seed):
    """Per-channel (scale, shift) factors equal the per-example-gradient reference (an explicit loop
    over examples); a layer without affine parameters gets no block."""
    layer, example_shape, mode, batch_size = config
    gen = torch.Generator().manual_seed(seed)
    layer = layer.to(DTYPE)
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.copy_(1.0 + 0.5 * randn(*layer.weight.shape, generator=gen))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(0.5 * randn(*layer.bias.shape, generator=gen))
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(randn(*layer.running_mean.shape, generator=gen))
            layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, dtype=DTYPE, generator=gen))
    torch.manual_seed(seed)
    head = nn.Linear(math.prod(example_shape), NUM_OUTPUTS)
    model = nn.Sequential(layer, nn.Flatten(1), head).to(DTYPE).train(mode == "train")
    x, y = _data(example_shape, batch_size, loss_kind, seed)
    loss_fn = make_loss(loss_kind, reduction)
    if not any(True for _ in layer.parameters()):
        assert set(library_blocks(model, loss_fn, x, y, reduction)) == {"2"}
        return
    expected = norms._reference_factor(model, loss_fn, x, y, reduction)
    block = library_blocks(model, loss_fn, x, y, reduction)["0"]
    k = 1 + (getattr(layer, "bias", None) is not None)
    assert block.F.shape == (layer.weight.numel(), k, k)
    torch.testing.assert_close(block.F, expected, **EXACT)


# --------------------------------------------------------------------------------- attention
@st.composite
def attention_cases(draw: st.DrawFn):
    """An attention module (kind of call, layout, bias flags) and a call of it with a random mask."""
    kind = draw(st.sampled_from(attention.KINDS))
    batched = draw(st.booleans())
    options = {
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()),
    }
    seed = draw(SEEDS)
    gen = attention._seeded(seed)
    net, case, targets = attention.build_case(kind, options.pop("batch_first"), batched, gen, **options)
    variants = attention.masks(kind, 3 if batched else None, gen)
    mask = draw(st.sampled_from(sorted(variants)))
    if not batched and mask == "mask3d":
        mask = "mask2d"  # an unbatched call takes (L, S) or (heads, L, S) masks; mask3d is (heads N, ...)
    case.kwargs.update(variants[mask])
    return kind, net, case, targets


@budget(30)
@given(attention_cases(), REDUCTIONS)
def test_attention_variants_match_rewritten_attention(drawn, reduction):
    """Every projection's factors equal those of the attention rewritten per head with explicit
    masks and softmax (which must reproduce the module's output)."""
    kind, net, case, targets = drawn
    expected = attention.reference_factors(net, case, kind, targets, make_loss("ce", reduction))
    _, block = attention.library_block(net, case, targets, reduction)
    actual = block.factors()
    assert set(actual) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(actual[name], want, **EXACT, msg=lambda m, k=name: f"{k}: {m}")


# -------------------------------------------------------------------------------- recurrences
@st.composite
def rnn_modules(draw: st.DrawFn) -> nn.RNNBase:
    """An RNN/LSTM/GRU with random layers, direction, projection, layout, bias and nonlinearity."""
    cls = draw(st.sampled_from([nn.RNN, nn.LSTM, nn.GRU]))
    options = {
        "num_layers": draw(st.integers(1, 2)),
        "bidirectional": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
    }
    if cls is nn.LSTM:
        options["proj_size"] = draw(st.integers(0, rnn.HIDDEN - 1))
    if cls is nn.RNN:
        options["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    torch.manual_seed(draw(SEEDS))
    return cls(rnn.D_IN, rnn.HIDDEN, **options).to(DTYPE)


@budget(20)
@given(rnn_modules(), st.sampled_from(rnn.INPUTS), REDUCTIONS, st.sampled_from(["expand", "reduce"]), SEEDS)
def test_rnn_options_match_reference_recurrence(module, kind, reduction, kfac_approx, seed):
    """Per-matrix factors equal those of the recurrence rewritten example by example, step by step."""
    gen = torch.Generator().manual_seed(seed)
    batch = rnn.Batch(module, kind, gen)
    head = rnn.Head(module, len(batch.lengths), gen)
    expected = rnn.reference_factors(module, batch, head, reduction, kfac_approx=kfac_approx)
    block = rnn.recorded_block(module, batch, head, reduction, kfac_approx=kfac_approx)
    assert set(expected) == set(rnn.matrix_names(module)) == {m.name for m in block.matrices}
    for name, (big_a, big_g) in expected.items():
        actual_a, actual_g = block.factors(name)
        torch.testing.assert_close(actual_a, big_a, **EXACT, msg=lambda m, n=name: f"A[{n}]: {m}")
        torch.testing.assert_close(actual_g, big_g, **EXACT, msg=lambda m, n=name: f"G[{n}]: {m}")
