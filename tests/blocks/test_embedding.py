"""Exact reference tests for the curvature block of ``nn.Embedding`` (diagonal input factor)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from tests.reference import (
    DTYPE,
    EXACT,
    SOLVE,
    dense_preconditioned,
    embedding_factors,
    library_blocks,
    library_step,
    make_loss,
    make_per_example_loss,
    make_target,
    per_example_gradients_vmap,
    per_example_scale,
    record,
    vec,
)
from torch_kfac import KFAC, KFACPreconditioner
from torch_kfac.blocks import EmbeddingBlock, block_type_for

VOCAB, DIM, NUM_OUTPUTS, PAD = 7, 3, 4, 2

# Shapes of one example's ids: a single token (ids (N,)), a sequence, a 2-D grid of tokens.
ID_SHAPES = [(), (3,), (2, 2)]
SHAPE_IDS = ["token", "sequence", "grid"]


def _seeded(seed: int) -> torch.Generator:
    """Seed the global RNG (parameter initialisation) and return a data generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _model(id_shape, padding_idx) -> nn.Module:
    """``Sequential(Embedding "0", Flatten, Linear "2")`` in float64."""
    positions = int(torch.tensor(id_shape).prod()) if id_shape else 1
    embedding = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
    return nn.Sequential(embedding, nn.Flatten(1), nn.Linear(positions * DIM, NUM_OUTPUTS)).to(DTYPE)


def _ids(batch_size: int, id_shape, gen: torch.Generator, with_pad: bool) -> torch.Tensor:
    """Random ids over part of the vocabulary (some tokens repeat, some never occur)."""
    ids = torch.randint(0, VOCAB - 2, (batch_size, *id_shape), generator=gen)
    if with_pad:
        ids.view(-1)[0] = PAD
    return ids


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("padding_idx", [None, PAD], ids=["nopad", "pad"])
@pytest.mark.parametrize("id_shape", ID_SHAPES, ids=SHAPE_IDS)
def test_embedding_factors_match_reference(id_shape, padding_idx, reduction, loss_kind):
    gen = _seeded(0)
    batch_size = 3
    model = _model(id_shape, padding_idx)
    ids = _ids(batch_size, id_shape, gen, with_pad=True)
    y = make_target(loss_kind, batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, reduction)

    rec = record(model, loss_fn, ids, y, ["0"])
    big_a, big_g = embedding_factors(rec.layers["0"], reduction)
    # The reference's view of the layer: each example's weight gradient is sum_t onehot_t g_t^T.
    positions = ids.reshape(batch_size, -1)
    onehot = torch.nn.functional.one_hot(positions, VOCAB).to(DTYPE)
    if padding_idx is not None:
        onehot[positions == padding_idx] = 0.0
    g = rec.layers["0"].grad_output.reshape(batch_size, -1, DIM) * per_example_scale(batch_size, reduction)
    per_example = per_example_gradients_vmap(model, loss_fn, ids, y)["0.weight"]
    torch.testing.assert_close(per_example, torch.einsum("ntv,ntd->nvd", onehot, g), **EXACT)

    blocks = library_blocks(model, loss_fn, ids, y, reduction)
    assert set(blocks) == {"0", "2"}
    block = blocks["0"]
    assert isinstance(block, EmbeddingBlock)
    assert block.A.shape == (VOCAB,) and block.G.shape == (DIM, DIM)
    assert block.A.dtype == DTYPE
    torch.testing.assert_close(torch.diag(block.A), big_a, **EXACT)
    torch.testing.assert_close(block.G, big_g, **EXACT)
    if padding_idx is not None:
        assert block.A[padding_idx] == 0.0
    assert block.A[VOCAB - 1] == 0.0  # a token that never occurs


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("id_shape", ID_SHAPES, ids=SHAPE_IDS)
def test_embedding_factors_same_for_mean_and_sum(id_shape, loss_kind):
    gen = _seeded(1)
    model = _model(id_shape, None)
    ids = _ids(4, id_shape, gen, with_pad=False)
    y = make_target(loss_kind, 4, NUM_OUTPUTS, gen)
    blocks = {
        r: library_blocks(copy.deepcopy(model), make_per_example_loss(loss_kind, r), ids, y, r)["0"]
        for r in ("mean", "sum")
    }
    torch.testing.assert_close(blocks["sum"].A, blocks["mean"].A, **EXACT)
    torch.testing.assert_close(blocks["sum"].G, blocks["mean"].G, **EXACT)


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("token", [0, PAD], ids=["token", "padding_token"])
@pytest.mark.parametrize("id_shape", [(), (1,)], ids=["ids_n", "ids_n1"])
def test_batch_one_block_equals_exact_empirical_fisher(id_shape, token, loss_kind):
    """N = 1, T = 1: kron(diag(A), G) = vec(M) vec(M)^T exactly, M = W.grad^T (zero for padding)."""
    gen = _seeded(2)
    model = nn.Sequential(
        nn.Embedding(VOCAB, DIM, padding_idx=PAD), nn.Flatten(1), nn.Linear(DIM, NUM_OUTPUTS)
    )
    model = model.to(DTYPE)
    ids = torch.full((1, *id_shape), token)
    y = make_target(loss_kind, 1, NUM_OUTPUTS, gen)
    loss_fn = make_loss(loss_kind, "mean")

    rec = record(model, loss_fn, ids, y, ["0"])
    grad = vec(rec.param_grads["0.weight"].T)
    fisher = torch.outer(grad, grad)
    assert (fisher != 0).any() == (token != PAD)
    block = library_blocks(model, loss_fn, ids, y, "mean")["0"]
    torch.testing.assert_close(block.dense_curvature(), fisher, **EXACT)
    torch.testing.assert_close(torch.kron(torch.diag(block.A), block.G), fisher, **EXACT)


SOLVERS = {
    "default": ({}, "factored"),
    "eigh": ({"inverse_method": "eigh"}, "factored"),
    "eigh_exact": ({"inverse_method": "eigh", "damping_type": "exact"}, "exact"),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("damping", [1e-3, 1e-1])
@pytest.mark.parametrize("enable_pi_correction", [True, False], ids=["pi", "nopi"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("padding_idx", [None, PAD], ids=["nopad", "pad"])
def test_preconditioner_matches_dense_solve(padding_idx, batch_size, enable_pi_correction, damping, solver):
    options, damping_type = SOLVERS[solver]
    gen = _seeded(3)
    model = _model((3,), padding_idx)
    ids = _ids(batch_size, (3,), gen, with_pad=True)
    y = make_target("ce", batch_size, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")

    rec = record(model, loss_fn, ids, y, ["0"])
    big_a, big_g = embedding_factors(rec.layers["0"], "mean")
    grads, pre = library_step(model, loss_fn, ids, y, "mean", damping, enable_pi_correction, **options)
    matrix = rec.param_grads["0.weight"].T
    expected = dense_preconditioned(big_a, big_g, matrix, damping, enable_pi_correction, damping_type)
    torch.testing.assert_close(grads["0.weight"], expected.T, **SOLVE)
    if padding_idx is not None:
        assert (grads["0.weight"][padding_idx] == 0).all()
    # No V x V matrix is ever stored.
    for value in pre.blocks["0"].state.values():
        assert value.dim() < 2 or value.shape[-1] != VOCAB or value.shape[-2] != VOCAB


@pytest.mark.parametrize("loss_kind", ["mse", "ce"])
@pytest.mark.parametrize("enable_pi_correction", [True, False], ids=["pi", "nopi"])
def test_preconditioner_mean_equals_sum(enable_pi_correction, loss_kind):
    gen = _seeded(4)
    model = _model((2,), PAD)
    ids = _ids(4, (2,), gen, with_pad=True)
    y = make_target(loss_kind, 4, NUM_OUTPUTS, gen)
    results = {
        r: library_step(
            copy.deepcopy(model), make_per_example_loss(loss_kind, r), ids, y, r, 1e-2, enable_pi_correction
        )[0]
        for r in ("mean", "sum")
    }
    for name, grad in results["mean"].items():
        torch.testing.assert_close(results["sum"][name], grad, **SOLVE)


def test_curvature_product_and_layout():
    gen = _seeded(5)
    model = _model((3,), None)
    ids = _ids(3, (3,), gen, with_pad=False)
    y = make_target("ce", 3, NUM_OUTPUTS, gen)
    block = library_blocks(model, make_loss("ce", "mean"), ids, y, "mean")["0"]
    weight = torch.randn(VOCAB, DIM, dtype=DTYPE, generator=gen)
    mat = block.to_matrix(weight, None)
    assert mat.shape == (DIM, VOCAB)
    assert torch.equal(block.from_matrix(mat)[0], weight) and block.from_matrix(mat)[1] is None
    torch.testing.assert_close(vec(block.curvature_product(mat)), block.dense_curvature() @ vec(mat), **EXACT)


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [
        ("sparse", {"sparse": True}),
        ("max_norm", {"max_norm": 1.0}),
        ("scale_grad_by_freq", {"scale_grad_by_freq": True}),
    ],
)
def test_unsupported_options_are_refused(option, kwargs):
    """The embedding falls back to the plain update, and the report names the option and why."""
    why = {
        "sparse": "sparse=True gives sparse gradients; K-FAC preconditions dense ones",
        "max_norm": "max_norm renormalises looked-up rows in place during the forward pass, which the "
        "linear model of the lookup that K-FAC's curvature describes does not include",
        "scale_grad_by_freq": "scale_grad_by_freq=True rescales the gradient by in-batch token counts, so "
        "it is no longer the loss gradient that the curvature describes",
    }[option]
    model = nn.Sequential(nn.Embedding(VOCAB, DIM, **kwargs), nn.Linear(DIM, 2))
    with pytest.raises(ValueError) as err:
        EmbeddingBlock(model[0], "0")
    assert str(err.value) == (
        f"nn.Embedding '0': K-FAC does not support {option}: {why}; "
        "build the embedding without it or pass skip_modules=['0']"
    )
    opt = KFAC(model, lr=0.1)
    assert set(opt.blocks) == {"1"}
    report = opt.preconditioner.describe()
    assert "0.weight: fallback (" in report and f"does not support {option}" in report


def test_registry_and_subclass():
    class TaggedEmbedding(nn.Embedding):
        pass

    assert block_type_for(nn.Embedding(3, 2)) is EmbeddingBlock
    assert block_type_for(TaggedEmbedding(3, 2)) is EmbeddingBlock


def _text_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(VOCAB, 6, padding_idx=0),
        nn.LayerNorm(6),
        nn.Flatten(1),
        nn.Linear(3 * 6, NUM_OUTPUTS),
    ).to(DTYPE)


def _train(opt: KFAC, model: nn.Module, ids, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_embedding_layernorm_linear_model_with_kfac():
    """Every parameter is in a block, K-FAC reduces the loss, and the state dict round-trips."""
    gen = _seeded(6)
    ids = torch.randint(0, VOCAB, (16, 3), generator=gen)
    y = torch.randint(0, NUM_OUTPUTS, (16,), generator=gen)
    model = _text_model(0)
    kwargs = {"damping": 1e-2, "momentum": 0.9, "inverse_update_steps": 2}
    opt = KFAC(model, 0.1, **kwargs)
    report = opt.preconditioner.describe()
    assert "fallback" not in report
    assert "EmbeddingBlock" in report and "LayerNormBlock" in report and "LinearBlock" in report
    owned = {id(p) for b in opt.blocks.values() for p in b.parameters()}
    assert owned == {id(p) for p in model.parameters()}

    losses = _train(opt, model, ids, y, 8)
    assert losses[-1] < 0.5 * losses[0]

    fresh = _text_model(1)
    fresh.load_state_dict(model.state_dict())
    fresh_opt = KFAC(fresh, 0.5, **kwargs)
    fresh_opt.load_state_dict(opt.state_dict())
    _train(opt, model, ids, y, 3)
    _train(fresh_opt, fresh, ids, y, 3)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, block in opt.blocks.items():
        other = fresh_opt.blocks[name].state
        assert set(block.state) == set(other)
        for key, value in block.state.items():
            assert torch.equal(value, other[key]), (name, key)


@pytest.mark.parametrize("damping_type", ["factored", "exact"])
@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_inverse_square_root(method, damping_type):
    """With power -1/2 the damped curvature's inverse square root, from G's eigendecomposition."""
    if damping_type == "exact" and method == "cholesky":
        method = "eigh"  # exact damping is applied through eigendecompositions only
    gen = _seeded(7)
    model = _model((3,), PAD)
    ids = _ids(3, (3,), gen, with_pad=True)
    y = make_target("ce", 3, NUM_OUTPUTS, gen)
    block = library_blocks(model, make_loss("ce", "mean"), ids, y, "mean")["0"]
    block.configure(power=-0.5)
    damping = torch.tensor(0.05, dtype=DTYPE)
    block.update_inverses(damping, True, method)
    a, g = block.A, block.G
    if damping_type == "exact":
        dense = block.dense_curvature(0.05)
    else:
        pi = (a.mean() / g.diagonal().mean()).sqrt()
        eye_a, eye_g = torch.eye(VOCAB, dtype=DTYPE), torch.eye(DIM, dtype=DTYPE)
        dense = torch.kron(torch.diag(a) + pi * 0.05**0.5 * eye_a, g + 0.05**0.5 / pi * eye_g)
    eigvals, eigvecs = torch.linalg.eigh(dense)
    root = eigvecs @ torch.diag(eigvals.rsqrt()) @ eigvecs.T
    mat = torch.randn(DIM, VOCAB, dtype=DTYPE, generator=gen)
    actual = block.precondition(mat, damping, True, damping_type)
    torch.testing.assert_close(vec(actual), root @ vec(mat), **SOLVE)


def test_embedding_called_twice_follows_the_expand_rule():
    """A table looked up twice in one forward pass: A averages the calls' token frequencies and G
    sums their output-gradient moments (like Linear layers applied twice)."""
    gen = _seeded(8)

    class TwoLookups(nn.Module):
        def __init__(self, first: nn.Embedding, second: nn.Embedding) -> None:
            super().__init__()
            self.first, self.second = first, second
            self.head = nn.Linear(2 * 3 * DIM, NUM_OUTPUTS)

        def forward(self, ids):
            left, right = ids[:, :3], ids[:, 3:]
            return self.head(torch.cat([self.first(left), self.second(right)], 1).flatten(1))

    table = nn.Embedding(VOCAB, DIM, padding_idx=PAD)
    shared = TwoLookups(table, table).to(DTYPE)
    copies = TwoLookups(table, copy.deepcopy(table)).to(DTYPE)
    copies.load_state_dict(shared.state_dict())
    ids = _ids(4, (6,), gen, with_pad=True)
    y = make_target("ce", 4, NUM_OUTPUTS, gen)
    loss_fn = make_loss("ce", "mean")
    rec = record(copies, loss_fn, ids, y, ["first", "second"])
    (a1, g1), (a2, g2) = (embedding_factors(rec.layers[n], "mean") for n in ("first", "second"))
    block = library_blocks(shared, loss_fn, ids, y, "mean")["first"]
    torch.testing.assert_close(torch.diag(block.A), (a1 + a2) / 2, **EXACT)
    torch.testing.assert_close(block.G, g1 + g2, **EXACT)


class _Tokens(nn.Module):
    """A lookup, then a per-position head: logits (N, classes, T) for token targets (N, T). A Linear
    lookup (bias-free, VOCAB inputs) gets the ids' one-hot vectors: the lookup as a matmul."""

    def __init__(self, lookup: nn.Module) -> None:
        super().__init__()
        self.lookup = lookup
        self.head = nn.Linear(DIM, NUM_OUTPUTS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lookup, nn.Linear):
            ids = nn.functional.one_hot(ids, VOCAB).to(self.lookup.weight.dtype)
        return self.head(self.lookup(ids)).transpose(1, 2)


@pytest.mark.parametrize("center", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_positions"])
def test_embedding_block_is_the_linear_block_of_one_hot_inputs(reduction, center):
    """An embedding is a bias-free Linear layer on one-hot inputs: its block's A (a vector) is the
    diagonal of that Linear block's A and its G is the Linear block's G, for every reduction
    (mean over the N T positions included) and with centered statistics (A's diagonal is then
    freq - freq^2)."""
    gen = _seeded(20)
    lookup = nn.Embedding(VOCAB, DIM).to(DTYPE)
    linear = nn.Linear(VOCAB, DIM, bias=False).to(DTYPE)
    with torch.no_grad():
        linear.weight.copy_(lookup.weight.T)
    ids = torch.randint(0, VOCAB - 2, (3, 4), generator=gen)
    targets = torch.randint(0, NUM_OUTPUTS, (3, 4), generator=gen)
    blocks = []
    for layer in (lookup, linear):
        torch.manual_seed(0)
        model = _Tokens(layer).to(DTYPE)
        loss_fn = nn.CrossEntropyLoss(reduction="sum" if reduction == "sum" else "mean")
        pre = KFACPreconditioner(model, loss_fn=loss_fn, reduction=reduction, center=center)
        loss_fn(model(ids), targets).backward()
        pre.step()
        blocks.append(pre.blocks["lookup"])
    embedding, as_linear = blocks
    assert isinstance(embedding, EmbeddingBlock) and not isinstance(as_linear, EmbeddingBlock)
    torch.testing.assert_close(embedding.A, as_linear.A.diagonal(), **EXACT)
    torch.testing.assert_close(embedding.G, as_linear.G, **EXACT)
    if not center:
        torch.testing.assert_close(as_linear.A, torch.diag(as_linear.A.diagonal()), **EXACT)


def _one_token_blocks(model_ids: torch.Tensor, targets: torch.Tensor) -> EmbeddingBlock:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, NUM_OUTPUTS)).to(DTYPE)
    return library_blocks(model, make_loss("mse", "mean"), model_ids, targets, "mean")["0"]


def test_a_single_unbatched_id_is_one_example():
    """A 0-d id (one token, no batch dimension) is a batch of one: the factors of ids of shape (1,)."""
    gen = _seeded(21)
    targets = torch.randn(NUM_OUTPUTS, generator=gen, dtype=DTYPE)
    single = _one_token_blocks(torch.tensor(3), targets)
    batched = _one_token_blocks(torch.tensor([3]), targets[None])
    assert single.batch_size == 1
    torch.testing.assert_close(single.A, batched.A, **EXACT)
    torch.testing.assert_close(single.G, batched.G, **EXACT)


def test_a_change_of_inverse_method_leaves_no_stale_inverse():
    """A refresh drops what the other method cached: after a Cholesky refresh at one damping, an
    eigh refresh at another preconditions with the new one (and back)."""
    gen = _seeded(22)
    model = _model((3,), None)
    ids = _ids(4, (3,), gen, False)
    block = library_blocks(
        model, make_loss("ce", "mean"), ids, make_target("ce", 4, NUM_OUTPUTS, gen), "mean"
    )["0"]
    mat = torch.randn(DIM, VOCAB, generator=gen, dtype=DTYPE)
    damping = torch.tensor(0.01, dtype=DTYPE)
    expected = dense_preconditioned(torch.diag(block.A), block.G, mat, 0.01, False)
    for first, then in (("cholesky", "eigh"), ("eigh", "cholesky")):
        block.update_inverses(torch.tensor(1.0, dtype=DTYPE), False, first)
        block.update_inverses(damping, False, then)
        assert ("A_inv" in block.state) == (then == "cholesky") and ("G_eigvecs" in block.state) == (
            then == "eigh"
        )
        torch.testing.assert_close(block.precondition(mat, damping, False), expected, **SOLVE)


def test_a_batch_of_padding_tokens_steps_the_other_layers():
    """Only padding tokens: the table's A is zero, its gradient zero. The pi correction falls back
    to 1 (tr A / dim A = 0 is no usable ratio), the table's change is zero, and the step is taken for
    the other layers (the head's bias: the padding rows are zero, so its weight has no gradient)."""
    gen = _seeded(23)
    model = _model((3,), PAD)
    opt = KFAC(model, lr=0.1, damping=0.01, enable_pi_correction=True)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.full((4, 3), PAD)
    make_loss("ce", "mean")(model(ids), make_target("ce", 4, NUM_OUTPUTS, gen)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failed inverse refresh
        opt.step()
    assert not opt.last_stats["skipped"]
    # pi = 1: A's shift is sqrt(damping) (pi = 0 would give 1 / 0).
    torch.testing.assert_close(
        opt.blocks["0"].state["A_inv"], torch.full((VOCAB,), 10.0, dtype=DTYPE), **EXACT
    )
    assert torch.equal(model[0].weight, before[0])
    assert torch.isfinite(model[2].bias).all() and not torch.equal(model[2].bias, before[2])


def test_registration_report_line():
    """The report gives the table's factor layout and memory (float32: 4 bytes an entry)."""
    report = repr(KFAC(nn.Sequential(nn.Embedding(258048, 512)), lr=0.1))
    assert "0.weight: EmbeddingBlock (A diagonal 258048, G 512x512, 1.98 MiB per factor set)" in report
