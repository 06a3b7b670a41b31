"""Exact reference tests for the curvature block of recurrent layers (nn.RNN, nn.LSTM, nn.GRU).

The reference recurrence below is written independently of the block: one example at a time,
one time step at a time, on vectors, with every gate's pre-activation computed from its own
rows of the weights and kept for autograd (and the GRU update written as (1 - z) n + z h).
"""

from __future__ import annotations

import copy
import pickle
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from tests.reference import (
    DTYPE,
    EXACT,
    SOLVE,
    dense_preconditioned,
    identity_preconditioned_loss,
    unvec,
    vec,
)
from torch_kfac import KFAC
from torch_kfac.blocks import RNNBlock, block_type_for
from torch_kfac.capture import StatisticsCapture

D_IN, HIDDEN, BATCH, STEPS, CLASSES = 3, 4, 3, 4, 5
#: Sequence lengths of the packed batch (unsorted, so the packing permutes the examples).
LENGTHS = [3, 4, 2]
#: The re-implemented recurrence must reproduce the fused kernels to this absolute error.
REPRODUCE = {"rtol": 0.0, "atol": 1e-12}

VARIANTS = {
    "rnn_tanh_2layers_bidir_batchfirst": (
        nn.RNN,
        {"num_layers": 2, "bidirectional": True, "batch_first": True},
    ),
    "rnn_relu_nobias": (nn.RNN, {"nonlinearity": "relu", "bias": False}),
    "lstm_2layers_bidir": (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    "lstm_proj_2layers_bidir_batchfirst": (
        nn.LSTM,
        {"num_layers": 2, "bidirectional": True, "proj_size": 2, "batch_first": True},
    ),
    "lstm_nobias_proj": (nn.LSTM, {"bias": False, "proj_size": 3}),
    "gru_2layers_bidir": (nn.GRU, {"num_layers": 2, "bidirectional": True}),
    "gru_nobias_2layers_batchfirst": (nn.GRU, {"bias": False, "num_layers": 2, "batch_first": True}),
}
#: 'batched' without an initial state; the others with a random one passed by the user.
INPUTS = ["batched", "initial_state", "unbatched", "packed"]


# ---------------------------------------------------------------------------------------
# Modules, inputs and the loss
# ---------------------------------------------------------------------------------------


def make_module(variant: str, seed: int = 0, **extra) -> nn.RNNBase:
    torch.manual_seed(seed)
    cls, options = VARIANTS[variant]
    return cls(D_IN, HIDDEN, **options, **extra).to(DTYPE)


def directions(module: nn.RNNBase) -> int:
    return 2 if module.bidirectional else 1


def out_size(module: nn.RNNBase) -> int:
    return module.proj_size or module.hidden_size


class Batch:
    """Inputs in the module's layout, and the same data as padded (N, T, F) plus lengths."""

    def __init__(self, module: nn.RNNBase, kind: str, gen: torch.Generator) -> None:
        self.kind = kind
        n = 1 if kind == "unbatched" else BATCH
        self.lengths = LENGTHS if kind == "packed" else [STEPS] * n
        padded = torch.randn(n, STEPS, D_IN, dtype=DTYPE, generator=gen)
        for i, length in enumerate(self.lengths):
            padded[i, length:] = 0.0
        self.padded = padded
        layers = module.num_layers * directions(module)
        self.h0 = torch.randn(layers, n, out_size(module), dtype=DTYPE, generator=gen)
        self.c0 = torch.randn(layers, n, module.hidden_size, dtype=DTYPE, generator=gen)
        if kind == "batched":
            self.h0, self.c0 = self.h0 * 0, self.c0 * 0
        lstm = isinstance(module, nn.LSTM)
        if kind == "unbatched":
            self.x: Tensor | PackedSequence = padded[0]
            self.hx = (self.h0[:, 0], self.c0[:, 0]) if lstm else self.h0[:, 0]
            return
        layout = padded if module.batch_first else padded.transpose(0, 1)
        if kind == "packed":
            self.x = pack_padded_sequence(
                layout, torch.tensor(self.lengths), batch_first=module.batch_first, enforce_sorted=False
            )
        else:
            self.x = layout
        self.hx = None if kind == "batched" else ((self.h0, self.c0) if lstm else self.h0)

    def call(self, module: nn.Module):
        return module(self.x) if self.hx is None else module(self.x, self.hx)

    def standard(self, module: nn.RNNBase, result) -> tuple[Tensor, Tensor, Tensor | None]:
        """The module's results as (N, T, D H_out) outputs (zeros past each length), h_n, c_n batched."""
        out, state = result
        h_n, c_n = state if isinstance(module, nn.LSTM) else (state, None)
        if self.kind == "packed":
            out = pad_packed_sequence(out, batch_first=True, total_length=STEPS)[0]
        elif self.kind == "unbatched":
            out, h_n = out.unsqueeze(0), h_n.unsqueeze(1)
            c_n = None if c_n is None else c_n.unsqueeze(1)
        elif not module.batch_first:
            out = out.transpose(0, 1)
        return out, h_n, c_n


class Head:
    """A fixed linear classifier on all outputs and final states, and its cross-entropy."""

    def __init__(self, module: nn.RNNBase, n: int, gen: torch.Generator) -> None:
        d, layers = directions(module), module.num_layers
        features = STEPS * d * out_size(module) + layers * d * out_size(module)
        if isinstance(module, nn.LSTM):
            features += layers * d * module.hidden_size
        self.weight = torch.randn(CLASSES, features, dtype=DTYPE, generator=gen) / features**0.5
        self.target = torch.randint(0, CLASSES, (n,), generator=gen)

    def loss(self, out: Tensor, h_n: Tensor, c_n: Tensor | None, reduction: str) -> Tensor:
        n = out.shape[0]
        feats = [out.reshape(n, -1), h_n.transpose(0, 1).reshape(n, -1)]
        if c_n is not None:
            feats.append(c_n.transpose(0, 1).reshape(n, -1))
        return F.cross_entropy(torch.cat(feats, 1) @ self.weight.T, self.target, reduction=reduction)


def matrix_names(module: nn.RNNBase) -> list[str]:
    names = []
    for layer in range(module.num_layers):
        for d in range(directions(module)):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            names += [f"ih{sfx}", f"hh{sfx}"] + ([f"hr{sfx}"] if module.proj_size else [])
    return names


# ---------------------------------------------------------------------------------------
# The independent reference recurrence
# ---------------------------------------------------------------------------------------


def reference_forward(module: nn.RNNBase, batch: Batch):
    """Per-example, per-step recurrence on vectors; returns (outputs, h_n, c_n, taps).

    taps[matrix] = (example index, input row a~, tensors whose gradients, concatenated, are the
    matrix's output gradient) for every active (example, step).
    """
    mode, hid, bias = module.mode, module.hidden_size, module.bias
    d_count, p = directions(module), out_size(module)
    taps: dict[str, list[tuple[int, Tensor, list[Tensor]]]] = defaultdict(list)
    one = torch.ones(1, dtype=DTYPE)

    def tap(name: str, a: Tensor, grads: list[Tensor], with_bias: bool) -> None:
        taps[name].append((n, torch.cat([a, one]) if with_bias else a, grads))

    outs, h_last, c_last = [], {}, {}
    for n, length in enumerate(batch.lengths):
        layer_in = [batch.padded[n, t] for t in range(length)]
        for layer in range(module.num_layers):
            results = []
            for d in range(d_count):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(module, f"weight_ih{sfx}"), getattr(module, f"weight_hh{sfx}")
                zero_ih, zero_hh = w_ih.new_zeros(w_ih.shape[0]), w_hh.new_zeros(w_hh.shape[0])
                b_ih = getattr(module, f"bias_ih{sfx}") if bias else zero_ih
                b_hh = getattr(module, f"bias_hh{sfx}") if bias else zero_hh
                k = layer * d_count + d
                h, c = batch.h0[k, n], batch.c0[k, n]
                res: list[Tensor] = [h] * length
                for t in reversed(range(length)) if d else range(length):
                    x = layer_in[t]

                    def rows(
                        i: int, x=x, h=h, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh
                    ) -> tuple[Tensor, Tensor]:
                        block = slice(i * hid, (i + 1) * hid)
                        return w_ih[block] @ x + b_ih[block], w_hh[block] @ h + b_hh[block]

                    if mode in ("RNN_TANH", "RNN_RELU"):
                        pre = w_ih @ x + b_ih + w_hh @ h + b_hh
                        tap(f"ih{sfx}", x, [pre], bias)
                        tap(f"hh{sfx}", h, [pre], bias)
                        h = torch.tanh(pre) if mode == "RNN_TANH" else torch.clamp(pre, min=0)
                    elif mode == "LSTM":
                        pres = [sum(rows(i)) for i in range(4)]
                        tap(f"ih{sfx}", x, pres, bias)
                        tap(f"hh{sfx}", h, pres, bias)
                        c = torch.sigmoid(pres[1]) * c + torch.sigmoid(pres[0]) * torch.tanh(pres[2])
                        m = torch.sigmoid(pres[3]) * torch.tanh(c)
                        if module.proj_size:
                            h = getattr(module, f"weight_hr{sfx}") @ m
                            tap(f"hr{sfx}", m, [h], False)
                        else:
                            h = m
                    else:
                        (ir, hr), (iz, hz), (i_n, h_n) = rows(0), rows(1), rows(2)
                        r_pre, z_pre = ir + hr, iz + hz
                        r, z = torch.sigmoid(r_pre), torch.sigmoid(z_pre)
                        n_pre = i_n + r * h_n
                        tap(f"ih{sfx}", x, [r_pre, z_pre, n_pre], bias)
                        tap(f"hh{sfx}", h, [r_pre, z_pre, h_n], bias)
                        h = (1 - z) * torch.tanh(n_pre) + z * h
                    res[t] = h
                results.append(res)
                h_last[k, n], c_last[k, n] = h, c
            layer_in = [torch.cat([r[t] for r in results]) for t in range(length)]
        out = torch.zeros(STEPS, d_count * p, dtype=DTYPE)
        out[:length] = torch.stack(layer_in)
        outs.append(out)
    keys = range(module.num_layers * d_count)
    n_all = range(len(batch.lengths))
    h_n = torch.stack([torch.stack([h_last[k, n] for n in n_all]) for k in keys])
    c_n = torch.stack([torch.stack([c_last[k, n] for n in n_all]) for k in keys])
    return torch.stack(outs), h_n, (c_n if mode == "LSTM" else None), taps


def reference_factors(
    module: nn.RNNBase,
    batch: Batch,
    head: Head,
    reduction: str,
    center: bool = False,
    kfac_approx: str = "expand",
) -> dict[str, tuple]:
    """(A, G) per matrix from per-example quantities.

    'expand': A = mean over active (n, t) of a~ a~^T, G = 1/N sum_{n,t} g g^T. 'reduce':
    A = 1/N sum_n m_n m_n^T with m_n the mean of a~ over example n's steps, G = 1/N sum_n s_n s_n^T
    with s_n the sum of g over them. With `center`, a (not its 1) and g are centered over the rows.
    """
    out, h_n, c_n, taps = reference_forward(module, batch)
    loss = head.loss(out, h_n, c_n, reduction)
    tensors = list({id(g): g for rows in taps.values() for _, _, step in rows for g in step}.values())
    grads = dict(zip(map(id, tensors), torch.autograd.grad(loss, tensors), strict=True))
    n = len(batch.lengths)
    per_example = float(n) if reduction == "mean" else 1.0  # d l_n / dz from dL/dz
    factors = {}
    for name, rows in taps.items():
        a_mat = torch.stack([a for _, a, _ in rows])
        g_mat = torch.stack([torch.cat([grads[id(g)] for g in step]) * per_example for _, _, step in rows])
        if kfac_approx == "reduce":
            owner = torch.tensor([i for i, _, _ in rows])
            a_mat = torch.stack([a_mat[owner == i].mean(0) for i in range(n)])
            g_mat = torch.stack([g_mat[owner == i].sum(0) for i in range(n)])
        if center:
            features = a_mat.shape[1] - int(module.bias and not name.startswith("hr"))
            a_mat[:, :features] -= a_mat[:, :features].mean(0)
            g_mat = g_mat - g_mat.mean(0)
        big_a = sum(torch.outer(a, a) for a in a_mat) / a_mat.shape[0]
        big_g = sum(torch.outer(g, g) for g in g_mat) / n
        factors[name] = (big_a, big_g)
    return factors


def recorded_block(
    module: nn.RNNBase,
    batch: Batch,
    head: Head,
    reduction: str,
    center: bool = False,
    kfac_approx: str = "expand",
) -> RNNBlock:
    """An RNNBlock fed through the library's capture by one forward/backward, factors folded."""
    block = RNNBlock(module)
    block.configure(kfac_approx=kfac_approx)
    capture = StatisticsCapture({"rnn": block}, lambda: True, reduction, center)
    try:
        result = batch.call(module)
        head.loss(*batch.standard(module, result), reduction).backward()
    finally:
        capture.remove()
    assert "forward" not in module.__dict__
    block.fold_pending(0.0)
    return block


# ---------------------------------------------------------------------------------------
# The re-implemented recurrence
# ---------------------------------------------------------------------------------------


def _flat_results(result) -> list[Tensor]:
    out, state = result
    out = out.data if isinstance(out, PackedSequence) else out
    return [out, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_recurrence_reproduces_module(variant, kind):
    """Outputs, final states and all parameter (and initial-state) gradients equal the fused kernel's."""
    gen = torch.Generator().manual_seed(1)
    module = make_module(variant)
    batch = Batch(module, kind, gen)
    if batch.hx is not None:
        for t in batch.hx if isinstance(batch.hx, tuple) else (batch.hx,):
            t.requires_grad_(True)
    block = RNNBlock(module)
    wrt = [
        *block.parameters(),
        *([] if batch.hx is None else ([*batch.hx] if isinstance(batch.hx, tuple) else [batch.hx])),
    ]
    results, gradients = [], []
    for armed in (False, True):
        block.before_forward(armed, None)
        result = _flat_results(batch.call(module))
        weights = [
            torch.randn(r.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(2)) for r in result
        ]
        value = sum((w * r).sum() for w, r in zip(weights, result, strict=True))
        results.append(result)
        gradients.append(torch.autograd.grad(value, wrt))
    for fused, own in zip(results[0], results[1], strict=True):
        assert fused.shape == own.shape
        torch.testing.assert_close(own, fused, **REPRODUCE)
    for fused, own in zip(*gradients, strict=True):
        torch.testing.assert_close(own, fused, **REPRODUCE)
    if kind == "packed":
        out = batch.call(module)[0]
        assert torch.equal(out.batch_sizes, batch.x.batch_sizes)
        assert torch.equal(out.unsorted_indices, batch.x.unsorted_indices)
    block.remove()
    assert "forward" not in module.__dict__


@pytest.mark.parametrize(
    "variant",
    ["rnn_tanh_2layers_bidir_batchfirst", "lstm_proj_2layers_bidir_batchfirst", "gru_2layers_bidir"],
)
def test_recurrence_uses_module_dropout(variant):
    """Between layers in training mode the recurrence drops out exactly as the fused kernel
    (the same masks from the same RNG state); in eval mode there is no dropout."""
    module = make_module(variant, dropout=0.5)
    block = RNNBlock(module)
    x = Batch(module, "batched", torch.Generator().manual_seed(3)).x
    for training in (True, False):
        module.train(training)
        torch.manual_seed(7)
        fused = _flat_results(module(x))
        torch.manual_seed(7)
        block.before_forward(True, None)
        own = _flat_results(module(x))
        for a, b in zip(fused, own, strict=True):
            torch.testing.assert_close(b, a, **REPRODUCE)
    torch.manual_seed(8)
    module.train()
    assert not torch.equal(_flat_results(module(x))[0], _flat_results(module(x))[0])


def test_forward_is_armed_for_one_call_only():
    module = make_module("lstm_2layers_bidir")
    block = RNNBlock(module)
    x = Batch(module, "batched", torch.Generator().manual_seed(4)).x
    block.before_forward(True, keep := [])
    module(x)
    # One input projection per layer and direction (no probes without a projection).
    assert len(keep) == module.num_layers * 2
    assert all(t.shape == (STEPS, BATCH, 4 * HIDDEN) for t in keep)
    assert block.has_pending("A_ih_l0")
    block.clear_pending()
    module(x)
    assert not block.has_pending("A_ih_l0")


# ---------------------------------------------------------------------------------------
# Factors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["initial_state", "unbatched", "packed"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_factors_match_reference(variant, kind, reduction, kfac_approx):
    gen = torch.Generator().manual_seed(5)
    module = make_module(variant)
    batch = Batch(module, kind, gen)
    head = Head(module, len(batch.lengths), gen)

    expected = reference_factors(module, batch, head, reduction, kfac_approx=kfac_approx)
    block = recorded_block(module, batch, head, reduction, kfac_approx=kfac_approx)

    assert set(expected) == set(matrix_names(module)) == {m.name for m in block.matrices}
    assert block.has_factors()
    for name, (big_a, big_g) in expected.items():
        actual_a, actual_g = block.factors(name)
        assert actual_a.dtype == DTYPE
        torch.testing.assert_close(actual_a, big_a, **EXACT, msg=lambda m, n=name: f"A[{n}]: {m}")
        torch.testing.assert_close(actual_g, big_g, **EXACT, msg=lambda m, n=name: f"G[{n}]: {m}")


@pytest.mark.parametrize(
    "variant,expected",
    [
        ("lstm_nobias_proj", ("A_ih_l0", "G_l0", "A_hh_l0", "A_hr_l0", "G_hr_l0")),
        (
            "rnn_tanh_2layers_bidir_batchfirst",
            (
                *("A_ih_l0", "G_l0", "A_hh_l0", "A_ih_l0_reverse", "G_l0_reverse", "A_hh_l0_reverse"),
                *("A_ih_l1", "G_l1", "A_hh_l1", "A_ih_l1_reverse", "G_l1_reverse", "A_hh_l1_reverse"),
            ),
        ),
        (
            "gru_nobias_2layers_batchfirst",
            ("A_ih_l0", "G_ih_l0", "A_hh_l0", "G_hh_l0", "A_ih_l1", "G_ih_l1", "A_hh_l1", "G_hh_l1"),
        ),
    ],
)
def test_factor_names(variant, expected):
    """RNN and LSTM matrices share the gate gradients' G; a GRU's W_hh has its own."""
    block = RNNBlock(make_module(variant))
    assert expected == block.FACTORS
    assert set(block.FORWARD_FACTORS) == {k for k in expected if k.startswith("A_")}


@pytest.mark.parametrize("kind", ["initial_state", "packed"])
@pytest.mark.parametrize("variant", ["lstm_proj_2layers_bidir_batchfirst", "gru_2layers_bidir"])
def test_centered_factors_match_reference(variant, kind):
    gen = torch.Generator().manual_seed(11)
    module = make_module(variant)
    batch = Batch(module, kind, gen)
    head = Head(module, len(batch.lengths), gen)
    expected = reference_factors(module, batch, head, "mean", center=True)
    block = recorded_block(module, batch, head, "mean", center=True)
    for name, (big_a, big_g) in expected.items():
        actual_a, actual_g = block.factors(name)
        torch.testing.assert_close(actual_a, big_a, **EXACT, msg=lambda m, n=name: f"A[{n}]: {m}")
        torch.testing.assert_close(actual_g, big_g, **EXACT, msg=lambda m, n=name: f"G[{n}]: {m}")


def test_factors_same_for_mean_and_sum():
    """The factors describe the per-example-loss Fisher, whatever the reduction."""
    factors = {}
    for reduction in ("mean", "sum"):
        gen = torch.Generator().manual_seed(6)
        module = make_module("gru_2layers_bidir")
        batch = Batch(module, "initial_state", gen)
        block = recorded_block(module, batch, Head(module, BATCH, gen), reduction)
        factors[reduction] = {m.name: block.factors(m.name) for m in block.matrices}
    for name, (big_a, big_g) in factors["mean"].items():
        torch.testing.assert_close(factors["sum"][name][0], big_a, **EXACT)
        torch.testing.assert_close(factors["sum"][name][1], big_g, **EXACT)


# ---------------------------------------------------------------------------------------
# Preconditioning
# ---------------------------------------------------------------------------------------


def _grad_matrix(module: nn.RNNBase, name: str, tensors: dict[str, Tensor]) -> Tensor:
    """[W, b] of one matrix from parameter-shaped tensors keyed by parameter name."""
    weight = tensors[f"weight_{name}"]
    bias = tensors.get(f"bias_{name}")
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(-1)], -1)


PRECONDITION_VARIANTS = ["lstm_proj_2layers_bidir_batchfirst", "gru_2layers_bidir", "rnn_relu_nobias"]


@pytest.mark.parametrize("pi", [True, False], ids=["pi", "nopi"])
@pytest.mark.parametrize(
    "method,damping_type", [("cholesky", "factored"), ("eigh", "factored"), ("eigh", "exact")]
)
@pytest.mark.parametrize("variant", PRECONDITION_VARIANTS)
def test_preconditioned_gradient_is_dense_solve(variant, method, damping_type, pi):
    gen = torch.Generator().manual_seed(7)
    module = make_module(variant)
    batch = Batch(module, "initial_state", gen)
    block = recorded_block(module, batch, Head(module, BATCH, gen), "mean")
    damping = 1e-2
    block.update_inverses(torch.tensor(damping, dtype=DTYPE), pi, method)
    assert block.has_inverses()

    grads = block.grad_matrix()
    assert grads is not None and grads.shape == (sum(p.numel() for p in block.parameters()),)
    result = block.precondition(grads, torch.tensor(damping, dtype=DTYPE), pi, damping_type)
    actual = dict(zip(block.param_names, block.unpack(result), strict=True))
    raw = {n: p.grad for n, p in module.named_parameters()}
    for name in matrix_names(module):
        big_a, big_g = block.factors(name)
        expected = dense_preconditioned(
            big_a, big_g, _grad_matrix(module, name, raw), damping, pi, damping_type
        )
        torch.testing.assert_close(_grad_matrix(module, name, actual), expected, **SOLVE)


@pytest.mark.parametrize("damping_type", ["factored", "exact"])
def test_inverse_square_root(damping_type):
    """configure(power=-0.5) with 'eigh': the damped Kronecker matrix to the power -1/2."""
    gen = torch.Generator().manual_seed(8)
    module = make_module("lstm_proj_2layers_bidir_batchfirst")
    batch = Batch(module, "initial_state", gen)
    block = recorded_block(module, batch, Head(module, BATCH, gen), "mean")
    block.configure(power=-0.5)
    damping = torch.tensor(1e-2, dtype=DTYPE)
    block.update_inverses(damping, True, "eigh")
    grads = block.grad_matrix()
    actual = dict(
        zip(
            block.param_names,
            block.unpack(block.precondition(grads, damping, True, damping_type)),
            strict=True,
        )
    )
    raw = {n: p.grad for n, p in module.named_parameters()}
    for name in matrix_names(module):
        big_a, big_g = block.factors(name)
        eye_a, eye_g = torch.eye(big_a.shape[0], dtype=DTYPE), torch.eye(big_g.shape[0], dtype=DTYPE)
        if damping_type == "exact":
            dense = torch.kron(big_a, big_g) + 1e-2 * torch.kron(eye_a, eye_g)
        else:
            pi = ((big_a.trace() / big_a.shape[0]) / (big_g.trace() / big_g.shape[0])).sqrt()
            dense = torch.kron(big_a + pi * 0.1 * eye_a, big_g + 0.1 / pi * eye_g)
        vals, vecs = torch.linalg.eigh(dense)
        matrix = _grad_matrix(module, name, raw)
        expected = unvec(vecs @ ((vecs.T @ vec(matrix)) / vals.sqrt()), *matrix.shape)
        torch.testing.assert_close(_grad_matrix(module, name, actual), expected, **SOLVE)


def test_curvature_product_is_kronecker_product():
    gen = torch.Generator().manual_seed(9)
    module = make_module("gru_2layers_bidir")
    batch = Batch(module, "initial_state", gen)
    block = recorded_block(module, batch, Head(module, BATCH, gen), "mean")
    direction = torch.randn(sum(p.numel() for p in block.parameters()), dtype=DTYPE, generator=gen)
    actual = dict(zip(block.param_names, block.unpack(block.curvature_product(direction)), strict=True))
    given = dict(zip(block.param_names, block.unpack(direction), strict=True))
    for name in matrix_names(module):
        big_a, big_g = block.factors(name)
        matrix = _grad_matrix(module, name, given)
        expected = unvec(torch.kron(big_a, big_g) @ vec(matrix), *matrix.shape)
        torch.testing.assert_close(_grad_matrix(module, name, actual), expected, **EXACT)


def test_pack_unpack_round_trip():
    block = RNNBlock(make_module("lstm_proj_2layers_bidir_batchfirst"))
    module = block.module
    assert [n for n, _ in module.named_parameters()] == block.param_names == module._flat_weights_names
    tensors = [torch.randn(p.shape, dtype=DTYPE) for p in block.parameters()]
    packed = block.pack(tensors)
    assert packed.dim() == 1
    for a, b in zip(block.unpack(packed), tensors, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


class ReversedLSTM(nn.LSTM):
    """An LSTM subclass whose forward differs from nn.LSTM's."""

    def forward(self, input, hx=None):
        return super().forward(input.flip(0), hx)


class TaggedGRU(nn.GRU):
    """A GRU subclass that keeps nn.GRU's forward (handled like nn.GRU)."""


class _Doubled(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 2 * w


def test_refusals():
    with pytest.raises(ValueError, match="overrides forward"):
        RNNBlock(ReversedLSTM(D_IN, HIDDEN), "rev")
    with pytest.raises(TypeError, match=r"nn\.RNN, nn\.LSTM and nn\.GRU"):
        RNNBlock(nn.RNNBase("LSTM", D_IN, HIDDEN), "base")
    patched = nn.GRU(D_IN, HIDDEN)
    patched.forward = lambda *args: None
    with pytest.raises(ValueError, match=r"^GRU 'patched' has a forward attribute of its own"):
        RNNBlock(patched, "patched")
    param = nn.LSTM(D_IN, HIDDEN)
    parametrize.register_parametrization(param, "weight_hh_l0", _Doubled())
    with pytest.raises(ValueError, match="not a plain parameter"):
        RNNBlock(param, "param")
    tagged = TaggedGRU(D_IN, HIDDEN)
    assert block_type_for(tagged) is RNNBlock
    RNNBlock(tagged).remove()
    assert "forward" not in tagged.__dict__


# ---------------------------------------------------------------------------------------
# With the optimizer
# ---------------------------------------------------------------------------------------


class SequenceClassifier(nn.Module):
    """LSTM over the sequence, linear classifier on the last step's output."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lstm = nn.LSTM(D_IN, 6, batch_first=True)
        self.head = nn.Linear(6, 2)
        self.to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def sequence_data(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Label: whether the first feature's sum over the sequence is positive."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, D_IN, dtype=DTYPE, generator=gen)
    return x, (x[:, :, 0].sum(1) > 0).long()


def _train(opt: KFAC, model: nn.Module, x: Tensor, y: Tensor, steps: int, **step_kwargs) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(**step_kwargs)
        losses.append(loss.item())
    return losses


def test_lstm_classifier_trains():
    """K-FAC ends below a tenth of the identity-preconditioned run's loss (measured: 2%)."""
    model = SequenceClassifier()
    x, y = sequence_data()
    opt = KFAC(model, lr=0.1, damping=1e-2, momentum=0.5, inverse_update_steps=1)
    losses = _train(opt, model, x, y, 20)
    plain = identity_preconditioned_loss(
        SequenceClassifier(), lambda m: F.cross_entropy(m(x), y), 20, 0.1, 0.5
    )
    assert losses[-1] < 0.1 * plain, (losses[-1], plain)
    assert isinstance(opt.blocks["lstm"], RNNBlock) and opt.blocks["lstm"].has_factors()
    opt.close()


def test_every_lstm_parameter_is_in_the_block():
    model = SequenceClassifier()
    opt = KFAC(model, lr=0.1)
    lines = [line for line in opt.preconditioner.describe().splitlines() if "lstm." in line]
    assert len(lines) == len(list(model.lstm.parameters())) == 4
    assert all("RNNBlock" in line and "fallback" not in line for line in lines), lines
    assert opt.preconditioner.fallback_reasons == {}
    opt.close()


def test_state_dict_round_trip():
    x, y = sequence_data()
    model = SequenceClassifier()
    opt = KFAC(model, lr=0.1, damping=1e-2, inverse_update_steps=2)
    _train(opt, model, x, y, 3)
    twin = SequenceClassifier()
    twin.load_state_dict(model.state_dict())
    twin_opt = KFAC(twin, lr=0.1, damping=1e-2, inverse_update_steps=2)
    twin_opt.load_state_dict(opt.state_dict())
    assert set(twin_opt.blocks["lstm"].state) == set(opt.blocks["lstm"].state)
    for key, value in opt.blocks["lstm"].state.items():
        assert torch.equal(twin_opt.blocks["lstm"].state[key], value), key
    _train(opt, model, x, y, 2)
    _train(twin_opt, twin, x, y, 2)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, **EXACT, msg=name)
    opt.close()
    twin_opt.close()


def test_optimizer_options_reach_the_block():
    """kfac_approx and inverse_power configure the block; other approximations are refused clearly."""
    model = SequenceClassifier()
    opt = KFAC(model, lr=0.1, kfac_approx="reduce", inverse_power=-0.5, inverse_method="eigh")
    block = opt.blocks["lstm"]
    assert (block.kfac_approx, block.power) == ("reduce", -0.5)
    x, y = sequence_data()
    _train(opt, model, x, y, 2)
    assert "A_ih_l0_eigvecs" in block.state and "ih_l0_A_inv" not in block.state
    opt.close()
    refused = SequenceClassifier()
    with pytest.raises(ValueError, match=r"approximation='ekfac'.*skip_modules=\['lstm'\]"):
        KFAC(refused, lr=0.1, approximation="ekfac")
    assert "forward" not in refused.lstm.__dict__
    skipped = SequenceClassifier()
    opt = KFAC(skipped, lr=0.1, approximation="ekfac", skip_modules=["lstm"])
    assert "lstm" not in opt.blocks and "forward" not in skipped.lstm.__dict__
    opt.close()


def test_explicit_tracking():
    """The original API: statistics only from passes inside track_forward/track_backward."""
    model = SequenceClassifier()
    x, y = sequence_data()
    opt = KFAC(model, lr=0.1, damping=1e-2)
    block = opt.blocks["lstm"]
    with opt.track_forward():
        loss = F.cross_entropy(model(x), y)
    with opt.track_backward():
        loss.backward()
    assert block.has_pending("A_ih_l0") and block.has_pending("G_l0")
    opt.step()
    assert block.has_factors()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # outside the contexts: nothing recorded
    assert not any(block.has_pending(k) for k in block.FACTORS)
    opt.close()


def test_frozen_module_falls_back_untouched():
    model = SequenceClassifier()
    model.lstm.requires_grad_(False)
    opt = KFAC(model, lr=0.1)
    assert "lstm" not in opt.blocks
    assert opt.preconditioner.fallback_reasons["lstm"] == "parameters frozen (requires_grad=False)"
    assert "forward" not in model.lstm.__dict__
    opt.close()


def test_close_restores_forward():
    model = SequenceClassifier()
    x, y = sequence_data()
    before = model(x).detach()
    opt = KFAC(model, lr=0.0, momentum=0.0)
    assert "forward" in model.lstm.__dict__
    _train(opt, model, x, y, 1)
    opt.close()
    assert "forward" not in model.lstm.__dict__
    assert type(model.lstm).forward is nn.LSTM.forward
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_unrecorded_steps_use_the_fused_kernel(monkeypatch):
    fused_calls = []
    original = torch._VF.lstm

    def counting(*args, **kwargs):
        fused_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch._VF, "lstm", counting)
    model = SequenceClassifier()
    x, y = sequence_data()
    opt = KFAC(model, lr=0.1, damping=1e-2, factor_update_steps=2, warmup_steps=0)
    block = opt.blocks["lstm"]
    calls = []
    for step in range(4):
        before = len(fused_calls)
        _train(opt, model, x, y, 1)
        calls.append(len(fused_calls) - before)
        assert block.has_factors()
        if step == 0:
            recorded = block.state["G_l0_weight"].clone()
    # Steps 0 and 2 record statistics with the re-implemented recurrence; 1 and 3 run the kernel.
    assert calls == [0, 1, 0, 1]
    assert not torch.equal(block.state["G_l0_weight"], recorded)
    opt.close()


def test_mc_fisher_records_lstm_factors():
    model = SequenceClassifier()
    x, y = sequence_data()
    opt = KFAC(model, lr=0.1, damping=1e-2, fisher_type="mc", mc_samples=2, loss_fn=nn.CrossEntropyLoss())
    block = opt.blocks["lstm"]
    losses = _train(opt, model, x, y, 1, batch=(x, y))
    assert block.has_factors()
    big_a, big_g = block.factors("ih_l0")
    assert big_a.shape == (D_IN + 1, D_IN + 1) and big_g.shape == (24, 24)
    assert torch.linalg.matrix_norm(big_g) > 0
    assert torch.equal(block.factors("hh_l0")[1], big_g)  # the gate gradients' G, shared
    assert not any(block.has_pending(k) for k in block.FACTORS)
    losses += _train(opt, model, x, y, 10, batch=(x, y))
    assert losses[-1] < losses[0]
    opt.close()
    assert "forward" not in model.lstm.__dict__


def test_model_with_attached_block_can_be_copied():
    """A deep copy of a model carries inert copies of the switch; a second optimizer on the copy
    attaches on top of it and trains."""
    model = SequenceClassifier()
    x, y = sequence_data()
    opt = KFAC(model, lr=0.1, damping=1e-2)
    expected = model(x).detach()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), expected, **REPRODUCE)
    twin_opt = KFAC(twin, lr=0.1, damping=1e-2)
    _train(twin_opt, twin, x, y, 2)
    assert twin_opt.blocks["lstm"].has_factors()
    twin_opt.close()
    # Two optimizers on one model: the second chains on the first; closing both restores it.
    second = KFAC(model, lr=0.1, damping=1e-2)
    opt.close()
    _train(second, model, x, y, 1)
    assert second.blocks["lstm"].has_factors() and not opt.blocks["lstm"].has_factors()
    second.close()
    assert "forward" not in model.lstm.__dict__


def test_closing_the_top_optimizer_gives_the_module_back_to_those_below():
    """Three optimizers on one LSTM chain their switches. Closing the middle one detaches it in
    place (the top one's calls pass through it unrecorded); closing the top one then restores the
    bottom one's switch (skipping the detached middle), which goes on recording; closing it gives
    the module its class's forward back."""
    model = SequenceClassifier()
    x, y = sequence_data()
    bottom, middle, top = (KFAC(model, lr=0.1, damping=1e-2) for _ in range(3))
    middle.close()
    assert model.lstm.__dict__["forward"] is top.blocks["lstm"]._switch
    with torch.no_grad():
        model(x)  # unarmed top: through the detached middle switch, which records nothing
    _train(top, model, x, y, 1)
    assert top.blocks["lstm"].has_factors()
    assert not any(middle.blocks["lstm"].has_pending(k) for k in middle.blocks["lstm"].FACTORS)
    top.close()
    assert model.lstm.__dict__["forward"] is bottom.blocks["lstm"]._switch
    _train(bottom, model, x, y, 1)
    assert bottom.blocks["lstm"].has_factors()
    assert not middle.blocks["lstm"].has_factors()
    bottom.close()
    assert "forward" not in model.lstm.__dict__


def test_module_with_block_can_be_pickled():
    """The switch is a plain object (no closure): the module pickles, and the copy runs the fused forward."""
    module = make_module("gru_2layers_bidir")
    block = RNNBlock(module)
    x = Batch(module, "batched", torch.Generator().manual_seed(10)).x
    twin = pickle.loads(pickle.dumps(module))
    for a, b in zip(_flat_results(twin(x)), _flat_results(module(x)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    block.remove()
    assert "forward" not in module.__dict__


def test_explicit_tracking_records_no_gate_gradients_outside_track_backward():
    """The original API's explicit mode through KFAC: the LSTM's own gate-gradient hooks ask the
    capture (its backward gate) and record nothing for a backward pass outside `track_backward()`."""
    model = SequenceClassifier()
    x, y = sequence_data()
    opt = KFAC(model, lr=0.1, damping=1e-2)
    block = opt.blocks["lstm"]
    with opt.track_forward():
        out = model(x)
    F.cross_entropy(out, y).backward()
    backward = [k for k in block.FACTORS if k not in block.FORWARD_FACTORS]
    assert backward and all(block.has_pending(k) for k in block.FORWARD_FACTORS)
    assert not any(block.has_pending(k) for k in backward)
    opt.zero_grad()
    with opt.track_forward():
        out = model(x)
    with opt.track_backward():
        F.cross_entropy(out, y).backward()
    assert all(block.has_pending(k) for k in block.FACTORS)
