"""Exact reference tests for the curvature blocks of normalization layers (scale and shift)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from tests.reference import (
    DTYPE,
    EXACT,
    SOLVE,
    library_blocks,
    library_step,
    make_loss,
    make_per_example_loss,
    make_target,
    norm_dense_curvature,
    norm_dense_preconditioned,
    norm_factor,
    norm_gradient_matrix,
    per_example_gradients_loop,
    per_example_gradients_vmap,
    randn,
    record,
    scale_shift_rows,
    vec,
)
from torch_kfac import KFAC, KFACPreconditioner
from torch_kfac.blocks import (
    BatchNormBlock,
    GroupNormBlock,
    InstanceNormBlock,
    LayerNormBlock,
    NormBlock,
    RMSNormBlock,
)

C, D, T, NUM_OUTPUTS = 4, 3, 2, 5

# name -> (module factory, shape of one example, block type). Shared positions: the spatial dims
# (batch/instance/group norm) and the middle dims (layer/RMS norm).
NORMS = {
    "batchnorm1d": (lambda: nn.BatchNorm1d(C), (C,), BatchNormBlock),
    "batchnorm1d_seq": (lambda: nn.BatchNorm1d(C, eps=0.1), (C, 3), BatchNormBlock),
    "batchnorm2d": (lambda: nn.BatchNorm2d(C), (C, 3, 2), BatchNormBlock),
    "batchnorm3d": (lambda: nn.BatchNorm3d(C), (C, 2, 1, 2), BatchNormBlock),
    "batchnorm2d_no_running": (
        lambda: nn.BatchNorm2d(C, track_running_stats=False),
        (C, 2, 2),
        BatchNormBlock,
    ),
    "instancenorm1d_running": (
        lambda: nn.InstanceNorm1d(C, eps=0.1, affine=True, track_running_stats=True),
        (C, 4),
        InstanceNormBlock,
    ),
    "instancenorm2d": (lambda: nn.InstanceNorm2d(C, affine=True), (C, 2, 3), InstanceNormBlock),
    "groupnorm": (lambda: nn.GroupNorm(2, C), (C, 3), GroupNormBlock),
    "groupnorm_2d": (lambda: nn.GroupNorm(1, C, eps=1e-3), (C, 2, 2), GroupNormBlock),
    "layernorm": (lambda: nn.LayerNorm(D), (T, D), LayerNormBlock),
    "layernorm_nobias": (lambda: nn.LayerNorm(D, bias=False), (T, D), LayerNormBlock),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((2, D), eps=0.1), (T, 2, D), LayerNormBlock),
    "rmsnorm": (lambda: nn.RMSNorm(D), (T, D), RMSNormBlock),
    "rmsnorm_eps_2d_shape": (lambda: nn.RMSNorm((2, D), eps=1e-3), (2, D), RMSNormBlock),
}
MODES = ["train", "eval"]


def _seeded(seed: int) -> torch.Generator:
    """Seed the global RNG (parameter initialisation) and return a data generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _norm_model(case: str, mode: str, gen: torch.Generator) -> nn.Module:
    """``Sequential(norm "0", Flatten, Linear "2")`` with random scale, shift and running statistics."""
    factory, example_shape, _ = NORMS[case]
    norm = factory().to(DTYPE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * randn(*norm.weight.shape, generator=gen))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.5 * randn(*norm.bias.shape, generator=gen))
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(randn(C, generator=gen))
            norm.running_var.copy_(0.5 + torch.rand(C, dtype=DTYPE, generator=gen))
    head = nn.Linear(math.prod(example_shape), NUM_OUTPUTS)
    return nn.Sequential(norm, nn.Flatten(1), head).to(DTYPE).train(mode == "train")


def _vmap_applies(norm: nn.Module) -> bool:
    """Whether the examples are independent (no batch statistics, no running-stat updates)."""
    if isinstance(norm, _BatchNorm):
        return not norm.training and norm.track_running_stats
    if isinstance(norm, _InstanceNorm):
        return not (norm.training and norm.track_running_stats)
    return True


def _reference_factor(model, loss_fn, x, y, reduction) -> torch.Tensor:
    """F of norm "0" from per-example gradients (loop; cross-checked by vmap where it applies)."""
    per_example = per_example_gradients_loop(model, loss_fn, x, y, reduction, ["0"])
    rows = scale_shift_rows(per_example, "0")
    if _vmap_applies(model[0]):
        by_vmap = scale_shift_rows(per_example_gradients_vmap(model, loss_fn, x, y), "0")
        torch.testing.assert_close(rows, by_vmap, **EXACT)
    return norm_factor(rows)


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(NORMS))
def test_norm_factor_matches_per_example_reference(case, mode, reduction, loss_kind):
    gen = _seeded(0)
    model = _norm_model(case, mode, gen)
    batch_size = 3
    x = randn(batch_size, *NORMS[case][1], generator=gen)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, reduction)

    expected = _reference_factor(model, loss_fn, x, y, reduction)
    blocks = library_blocks(model, loss_fn, x, y, reduction)
    assert set(blocks) == {"0", "2"}
    block = blocks["0"]
    assert type(block) is NORMS[case][2]
    k = 1 + (getattr(model[0], "bias", None) is not None)
    assert block.F.shape == (model[0].weight.numel(), k, k)
    assert block.F.dtype == DTYPE
    torch.testing.assert_close(block.F, expected, **EXACT)


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["batchnorm2d", "layernorm", "groupnorm", "rmsnorm"])
def test_norm_factor_same_for_mean_and_sum(case, mode, loss_kind):
    """The factor is the per-example-loss Fisher, whatever the reduction."""
    gen = _seeded(1)
    model = _norm_model(case, mode, gen)
    x = randn(4, *NORMS[case][1], generator=gen)
    y = make_target(loss_kind, 4, NUM_OUTPUTS, gen)
    factors = {
        r: library_blocks(copy.deepcopy(model), make_per_example_loss(loss_kind, r), x, y, r)["0"].F
        for r in ("mean", "sum")
    }
    torch.testing.assert_close(factors["sum"], factors["mean"], **EXACT)


# Norms on one example without shared positions (batch norm in eval mode: a batch of one has no
# batch statistics).
SINGLE = {
    "layernorm": lambda: nn.LayerNorm(D),
    "layernorm_nobias": lambda: nn.LayerNorm(D, bias=False),
    "rmsnorm": lambda: nn.RMSNorm(D),
    "batchnorm1d_eval": lambda: nn.BatchNorm1d(D).eval(),
    "groupnorm": lambda: nn.GroupNorm(1, D),
}


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("case", list(SINGLE))
def test_batch_one_block_equals_exact_empirical_fisher(case, loss_kind):
    """N = 1, no shared positions: every channel's F_c is that channel's block of g g^T exactly.

    The block drops the couplings between channels, so the dense block equals the exact Fisher
    vec(grad) vec(grad)^T with everything outside the per-channel (scale, shift) pairs zeroed.
    """
    gen = _seeded(2)
    norm = SINGLE[case]().to(DTYPE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * randn(D, generator=gen))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(randn(D, generator=gen))
    model = nn.Sequential(norm, nn.Tanh(), nn.Linear(D, NUM_OUTPUTS)).to(DTYPE).train(norm.training)
    x = randn(1, D, generator=gen)
    y = make_target(loss_kind, 1, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, "mean")

    rec = record(model, loss_fn, x, y, ["0"])
    grad = vec(norm_gradient_matrix(rec.param_grads, "0"))
    fisher = torch.outer(grad, grad)
    k = 1 + (getattr(norm, "bias", None) is not None)
    same_channel = torch.arange(k * D).remainder(D)
    mask = same_channel[:, None] == same_channel[None, :]
    block = library_blocks(model, loss_fn, x, y, "mean")["0"]
    torch.testing.assert_close(block.dense_curvature(), fisher * mask, **EXACT)
    torch.testing.assert_close(norm_dense_curvature(block.F), fisher * mask, **EXACT)
    for c in range(D):
        pair = grad[c::D]
        torch.testing.assert_close(block.F[c], torch.outer(pair, pair), **EXACT)


SOLVERS = {
    "default": {},
    "eigh": {"inverse_method": "eigh"},
    "eigh_exact": {"inverse_method": "eigh", "damping_type": "exact"},
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("damping", [1e-3, 1e-1])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize(
    ("case", "mode"),
    [
        ("batchnorm2d", "train"),
        ("batchnorm1d", "eval"),
        ("layernorm", "train"),
        ("layernorm_nobias", "train"),
        ("groupnorm", "train"),
        ("rmsnorm", "train"),
    ],
)
def test_preconditioner_matches_dense_solve(case, mode, batch_size, damping, solver):
    if mode == "train" and case == "batchnorm1d" and batch_size == 1:
        batch_size = 2  # batch statistics of one value per channel are undefined
    gen = _seeded(3)
    model = _norm_model(case, mode, gen)
    x = randn(batch_size, *NORMS[case][1], generator=gen)
    y = make_target("ce", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")

    expected_factor = _reference_factor(model, loss_fn, x, y, "mean")
    rec = record(model, loss_fn, x, y, ["0"])
    grads, pre = library_step(model, loss_fn, x, y, "mean", damping, True, **SOLVERS[solver])
    torch.testing.assert_close(pre.blocks["0"].F, expected_factor, **EXACT)
    expected = norm_dense_preconditioned(expected_factor, norm_gradient_matrix(rec.param_grads, "0"), damping)
    torch.testing.assert_close(grads["0.weight"], expected[:, 0].reshape(model[0].weight.shape), **SOLVE)
    if getattr(model[0], "bias", None) is not None:
        torch.testing.assert_close(grads["0.bias"], expected[:, 1].reshape(model[0].bias.shape), **SOLVE)


@pytest.mark.parametrize("case", ["batchnorm2d", "layernorm", "rmsnorm"])
def test_preconditioner_mean_equals_sum(case):
    gen = _seeded(4)
    model = _norm_model(case, "train", gen)
    x = randn(4, *NORMS[case][1], generator=gen)
    y = make_target("mse", 4, NUM_OUTPUTS, gen)
    results = {
        r: library_step(copy.deepcopy(model), make_per_example_loss("mse", r), x, y, r, 1e-2, True)[0]
        for r in ("mean", "sum")
    }
    for name, grad in results["mean"].items():
        torch.testing.assert_close(results["sum"][name], grad, **SOLVE)


def test_curvature_product_and_layout_round_trip():
    gen = _seeded(5)
    model = _norm_model("layernorm", "train", gen)
    x = randn(3, T, D, generator=gen)
    y = make_target("ce", 3, NUM_OUTPUTS, gen)
    block = library_blocks(model, make_loss("ce", "mean"), x, y, "mean")["0"]
    weight, bias = randn(D, generator=gen), randn(D, generator=gen)
    mat = block.to_matrix(weight, bias)
    assert mat.shape == (D, 2)
    back_weight, back_bias = block.from_matrix(mat)
    assert torch.equal(back_weight, weight) and torch.equal(back_bias, bias)
    dense = norm_dense_curvature(block.F)
    torch.testing.assert_close(vec(block.curvature_product(mat)), dense @ vec(mat), **EXACT)
    # With an eigendecomposition and a damping, precondition inverts (F + d I).
    block.update_inverses(torch.tensor(0.1, dtype=DTYPE), True, "eigh")
    solved = block.precondition(
        block.curvature_product(mat) + 0.1 * mat, torch.tensor(0.1, dtype=DTYPE), True
    )
    torch.testing.assert_close(solved, mat, **SOLVE)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nn.LayerNorm(D, elementwise_affine=False),
        lambda: nn.BatchNorm1d(D, affine=False),
        lambda: nn.GroupNorm(1, D, affine=False),
        lambda: nn.RMSNorm(D, elementwise_affine=False),
        lambda: nn.InstanceNorm1d(D),
    ],
    ids=["layernorm", "batchnorm", "groupnorm", "rmsnorm", "instancenorm"],
)
def test_norm_without_parameters_gets_no_block(factory):
    model = nn.Sequential(nn.Linear(D, D), factory(), nn.Linear(D, 2)).to(DTYPE)
    opt = KFAC(model, lr=0.1)
    assert set(opt.blocks) == {"0", "2"}
    assert "fallback" not in opt.preconditioner.describe()


@pytest.mark.parametrize("case", ["layernorm", "batchnorm1d_seq"])
def test_module_called_twice_and_repeated_backward(case):
    """Each call pairs with its own output gradient: a module used twice in one forward pass gets
    the per-example gradients of its shared parameters (the sum over both calls, checked against
    two separate copies of the module), and repeated backward passes through one forward pass
    (several sampled labels) reuse the cached calls."""
    gen = _seeded(6)
    shape = NORMS[case][1]
    norm = NORMS[case][0]().to(DTYPE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * randn(C if "batch" in case else D, generator=gen))
        norm.bias.copy_(randn(*norm.bias.shape, generator=gen))
    features = math.prod(shape)

    class Twice(nn.Module):
        def __init__(self, first: nn.Module, second: nn.Module) -> None:
            super().__init__()
            self.first, self.second = first, second
            self.mix = nn.Linear(shape[-1], shape[-1], bias=False)
            self.head = nn.Linear(features, NUM_OUTPUTS)

        def forward(self, x):
            return self.head(self.second(torch.tanh(self.mix(self.first(x)))).flatten(1))

    shared = Twice(norm, norm).to(DTYPE)
    copies = Twice(norm, copy.deepcopy(norm)).to(DTYPE)
    copies.load_state_dict(shared.state_dict())
    x = randn(3, *shape, generator=gen)
    y = make_target("ce", 3, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")

    rows = scale_shift_rows(per_example_gradients_loop(shared, loss_fn, x, y, "mean", ["first"]), "first")
    by_copy = per_example_gradients_loop(copies, loss_fn, x, y, "mean", ["first", "second"])
    first, second = scale_shift_rows(by_copy, "first"), scale_shift_rows(by_copy, "second")
    torch.testing.assert_close(rows, first + second, **EXACT)
    assert not torch.allclose(first, second)
    expected = norm_factor(rows)
    blocks = library_blocks(shared, loss_fn, x, y, "mean")
    torch.testing.assert_close(blocks["first"].F, expected, **EXACT)

    # Two backward passes through one forward pass: each pairs with the same cached calls.
    pre = KFACPreconditioner(shared, damping=1e-3)
    loss = loss_fn(shared(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    pre.update_factors()
    torch.testing.assert_close(pre.blocks["first"].F, expected, **EXACT)

    # Two micro-batches, each loss carrying its share 1/2 of the accumulated batch: the second
    # forward pass's first call replaces the finished pass's cache, its second call joins it.
    pre = KFACPreconditioner(shared, damping=1e-3)
    for _ in range(2):
        (loss_fn(shared(x), y) / 2).backward()
    pre.update_factors()
    torch.testing.assert_close(pre.blocks["first"].F, expected, **EXACT)


def test_explicit_tracking_and_type2_fisher_passes():
    """The original API's track_forward/track_backward, and the type-2 Fisher's K backward passes
    through one forward pass, both feed the norm block."""
    gen = _seeded(7)
    model = _norm_model("layernorm", "train", gen)
    x = randn(3, T, D, generator=gen)
    y = make_target("ce", 3, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")
    expected = _reference_factor(model, loss_fn, x, y, "mean")

    opt = KFAC(model, lr=0.1, momentum=0.0, update_cov_manually=True)
    with opt.track_forward():
        loss = loss_fn(model(x), y)
    with opt.track_backward():
        loss.backward()
    opt.update_cov()
    torch.testing.assert_close(opt.blocks["0"].F, expected, **EXACT)

    # Type-2 Fisher: the K classes' backward passes give the exact per-example Fisher of the
    # parameters' gradients with the softmax's output Hessian; reference: sum over sampled-free
    # columns, i.e. E_n[J^T H J] restricted to each channel.
    pre = KFACPreconditioner(model, fisher_type="type-2", loss_fn=nn.CrossEntropyLoss())
    model.zero_grad()
    loss_fn(model(x), y).backward()
    pre.step(batch=(x, y))
    probs = torch.softmax(model(x), dim=-1).detach()
    factor = torch.zeros_like(expected)
    for label in range(NUM_OUTPUTS):
        labels = torch.full((3,), label)
        rows = scale_shift_rows(per_example_gradients_vmap(model, loss_fn, x, labels), "0")
        weights = probs[:, label].reshape(3, 1, 1, 1)
        factor += (weights * rows[:, :, :, None] * rows[:, :, None, :]).sum(0) / 3
    torch.testing.assert_close(pre.blocks["0"].F, factor, **SOLVE)


def test_unbatched_layernorm_input():
    gen = _seeded(8)
    norm = nn.LayerNorm(D).to(DTYPE)
    model = nn.Sequential(norm, nn.Linear(D, NUM_OUTPUTS)).to(DTYPE)
    x = randn(D, generator=gen)
    y = randn(NUM_OUTPUTS, generator=gen)
    loss_fn = make_loss("mse", "mean")
    block = library_blocks(model, loss_fn, x, y, "mean")["0"]
    batched = library_blocks(copy.deepcopy(model), loss_fn, x[None], y[None], "mean")["0"]
    assert block.batch_size == 1
    torch.testing.assert_close(block.F, batched.F, **EXACT)


def test_registry_covers_every_norm():
    from torch_kfac.blocks import block_type_for

    for factory, _, block_type in NORMS.values():
        assert block_type_for(factory()) is block_type
        assert issubclass(block_type, NormBlock)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_inverse_square_root(method):
    """With power -1/2 every channel is multiplied by (F_c + d I)^(-1/2) (eigendecompositions)."""
    gen = _seeded(9)
    model = _norm_model("batchnorm2d", "train", gen)
    x = randn(3, *NORMS["batchnorm2d"][1], generator=gen)
    y = make_target("ce", 3, NUM_OUTPUTS, gen)
    block = library_blocks(model, make_loss("ce", "mean"), x, y, "mean")["0"]
    block.configure(power=-0.5)
    damping = torch.tensor(0.05, dtype=DTYPE)
    block.update_inverses(damping, True, method)
    mat = randn(C, 2, generator=gen)
    eigvals, eigvecs = torch.linalg.eigh(norm_dense_curvature(block.F, 0.05))
    root = eigvecs @ torch.diag(eigvals.rsqrt()) @ eigvecs.T
    torch.testing.assert_close(vec(block.precondition(mat, damping, True)), root @ vec(mat), **SOLVE)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ["batchnorm2d", "layernorm", "groupnorm", "rmsnorm"])
def test_centered_norm_factor(case, reduction):
    """center=True: F_c is the covariance of the per-example (scale, shift) gradients, their mean
    over the batch subtracted."""
    gen = _seeded(10)
    model = _norm_model(case, "train", gen)
    x = randn(4, *NORMS[case][1], generator=gen)
    y = make_target("ce", 4, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", reduction)
    rows = scale_shift_rows(per_example_gradients_loop(model, loss_fn, x, y, reduction, ["0"]), "0")
    block = library_blocks(model, loss_fn, x, y, reduction, center=True)["0"]
    torch.testing.assert_close(block.F, norm_factor(rows - rows.mean(0)), **EXACT)
    assert not torch.allclose(block.F, norm_factor(rows))


class _NormPerPosition(nn.Module):
    """LayerNorm over the features of (N, T, D), a per-position head, logits (N, classes, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, NUM_OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)).transpose(1, 2)


def test_norm_factor_with_mean_over_positions():
    """reduction='mean_positions' (a loss averaged over N T positions): F is the second moment of
    the per-example gradients of the examples' summed losses over the N T loss terms,
    1/(N T) sum_n r_n r_n^T."""
    gen = _seeded(11)
    model = _NormPerPosition().to(DTYPE)
    x = randn(3, T, D, generator=gen)
    y = torch.randint(0, NUM_OUTPUTS, (3, T), generator=gen)
    summed = per_example_gradients_loop(model, nn.CrossEntropyLoss(reduction="sum"), x, y, "sum", ["norm"])
    expected = norm_factor(scale_shift_rows(summed, "norm")) / T
    pre = KFACPreconditioner(model, loss_fn=nn.CrossEntropyLoss(), reduction="mean_positions")
    nn.CrossEntropyLoss()(model(x), y).backward()
    pre.step()
    torch.testing.assert_close(pre.blocks["norm"].F, expected, **EXACT)


def test_unbatched_instancenorm_input():
    """An unbatched (C, L) input to InstanceNorm1d is one example: the factor of the batch of one."""
    gen = _seeded(12)
    model = nn.Sequential(nn.InstanceNorm1d(C, affine=True), nn.Flatten(0), nn.Linear(C * 4, NUM_OUTPUTS))
    model = model.to(DTYPE)
    x = randn(C, 4, generator=gen)
    y = randn(NUM_OUTPUTS, generator=gen)
    loss_fn = make_loss("mse", "mean")
    block = library_blocks(model, loss_fn, x, y, "mean")["0"]
    batched_model = copy.deepcopy(model)
    batched_model[1] = nn.Flatten(1)
    batched = library_blocks(batched_model, loss_fn, x[None], y[None], "mean")["0"]
    assert block.batch_size == 1
    torch.testing.assert_close(block.F, batched.F, **EXACT)


def test_dense_curvature_adds_the_damping():
    gen = _seeded(13)
    model = _norm_model("layernorm", "train", gen)
    x = randn(3, T, D, generator=gen)
    block = library_blocks(model, make_loss("ce", "mean"), x, make_target("ce", 3, NUM_OUTPUTS, gen), "mean")[
        "0"
    ]
    torch.testing.assert_close(block.dense_curvature(0.3), norm_dense_curvature(block.F, 0.3), **EXACT)


def test_a_change_of_inverse_method_leaves_no_stale_inverse():
    """A refresh drops what the other method cached (Cholesky's inverse, eigh's decomposition): after
    a Cholesky refresh at one damping, an eigh refresh at another preconditions with the new one."""
    gen = _seeded(14)
    model = _norm_model("groupnorm", "train", gen)
    x = randn(3, *NORMS["groupnorm"][1], generator=gen)
    block = library_blocks(model, make_loss("ce", "mean"), x, make_target("ce", 3, NUM_OUTPUTS, gen), "mean")[
        "0"
    ]
    mat = randn(C, 2, generator=gen)
    block.update_inverses(torch.tensor(1.0, dtype=DTYPE), False, "cholesky")
    assert "F_inv" in block.state and "F_eigvecs" not in block.state
    block.update_inverses(torch.tensor(0.01, dtype=DTYPE), False, "eigh")
    assert "F_inv" not in block.state and "F_eigvecs" in block.state
    expected = torch.linalg.solve(norm_dense_curvature(block.F, 0.01), vec(mat))
    torch.testing.assert_close(
        vec(block.precondition(mat, torch.tensor(0.01, dtype=DTYPE), False)), expected, **SOLVE
    )
    block.update_inverses(torch.tensor(0.01, dtype=DTYPE), False, "cholesky")
    assert "F_inv" in block.state and "F_eigvecs" not in block.state


def test_accumulated_micro_batches_keep_one_cached_call():
    """Each forward pass after a finished backward pass replaces the cached normalized inputs: with
    gradient accumulation the block holds one call's xhat, not one per micro-batch."""
    gen = _seeded(15)
    model = _norm_model("layernorm", "train", gen)
    block = KFAC(model, lr=0.1, damping=0.1, factor_update_steps=1).blocks["0"]
    for _ in range(3):
        out = model(randn(2, T, D, generator=gen))
        assert len(block._normalized) == 1
        make_loss("ce", "mean")(out, make_target("ce", 2, NUM_OUTPUTS, gen)).backward()


def test_registration_report_lines():
    """The report gives each norm block's factor layout and memory (float32: 4 bytes an entry)."""
    model = nn.Sequential(nn.LayerNorm(65536), nn.RMSNorm(65536))
    report = repr(KFAC(model, lr=0.1))
    assert "0.weight: LayerNormBlock (F 65536 x 2x2 (scale, shift), 1.00 MiB)" in report
    assert "1.weight: RMSNormBlock (F 65536 x 1x1 (scale), 0.25 MiB)" in report
