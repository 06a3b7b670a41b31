"""Low-rank preconditioning from a Linear layer's rows (option `low_rank_gradients`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_kfac import KFAC
from torch_kfac.blocks.kronecker import KroneckerFactors
from torch_kfac.blocks.linear import LinearBlock
from torch_kfac.lowrank import GradientRows, RowCapture, _widths, cheaper, verified_rows

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def row_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Whether each call of `precondition_rows` preconditioned from the rows."""
    calls: list[bool] = []
    original = KroneckerFactors.precondition_rows

    def spy(self: KroneckerFactors, g_rows: Tensor, a_rows: Tensor) -> Tensor | None:
        natural = original(self, g_rows, a_rows)
        calls.append(natural is not None)
        return natural

    monkeypatch.setattr(KroneckerFactors, "precondition_rows", spy)
    yield calls


class Wide(nn.Module):
    """Two wide Linear layers (the second called `calls` times) for a handful of rows."""

    def __init__(self, bias: bool = True, calls: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(30, 40, bias=bias)
        self.second = nn.Linear(40, 40)
        self.head = nn.Linear(40, 5)
        self.calls = calls

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        for _ in range(self.calls):
            h = torch.tanh(self.second(h))
        return self.head(h)


def _data(n: int = 4, positions: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (n, positions, 30) if positions else (n, 30)
    return torch.randn(*shape, generator=gen), torch.randint(0, 5, shape[:-1], generator=gen)


def _loss(model: nn.Module, x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1), reduction=reduction)


def _train(
    low_rank: bool, backward: Callable[[nn.Module], None], model: nn.Module, steps: int = 3, **options: object
) -> tuple[list[Tensor], KFAC]:
    model = copy.deepcopy(model)
    opts = {"lr": 0.1, "damping": 1e-2, "factor_update_steps": 1, "inverse_update_steps": 1, **options}
    opt = KFAC(model, low_rank_gradients=low_rank, **opts)
    for _ in range(steps):
        opt.zero_grad()
        backward(model)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def _plain(model: nn.Module) -> None:
    _loss(model, *_data()).backward()


def _positions(model: nn.Module) -> None:
    _loss(model, *_data(n=2, positions=3)).backward()


def _summed(model: nn.Module) -> None:
    _loss(model, *_data(), reduction="sum").backward()


def _micro_batches(model: nn.Module) -> None:
    x, y = _data()
    for part in (slice(0, 1), slice(1, 4)):
        (_loss(model, x[part], y[part]) * (part.stop - part.start) / 4).backward()


def _clipped_by_norm(model: nn.Module) -> None:
    _plain(model)
    nn.utils.clip_grad_norm_(model.parameters(), 0.05)


def _loss_scaled(model: nn.Module) -> None:
    (_loss(model, *_data()) * 1024.0).backward()
    for p in model.parameters():
        p.grad.div_(1024.0)


CASES = {
    "plain": (_plain, {}, {}),
    "no bias": (_plain, {"bias": False}, {}),
    "layer called twice": (_plain, {"calls": 2}, {}),
    "positions": (_positions, {}, {"reduction": "mean"}),
    "reduction sum": (_summed, {}, {"reduction": "sum"}),
    "micro-batches": (_micro_batches, {}, {}),
    "clipped by norm": (_clipped_by_norm, {}, {}),
    "loss scale": (_loss_scaled, {}, {}),
    "adam momentum": (_plain, {}, {"momentum": 0.9, "momentum_type": "adam"}),
    "regular momentum": (_plain, {}, {"momentum": 0.9}),
}


@pytest.mark.parametrize("case", CASES)
def test_rows_precondition_like_the_dense_product(case: str, row_calls: list[bool]) -> None:
    backward, model_kwargs, options = CASES[case]
    model = Wide(**model_kwargs)
    expected, _ = _train(False, backward, model, **options)
    assert not row_calls
    got, _ = _train(True, backward, model, **options)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-13)
    # Every layer is wide for 4 rows (the 5-wide head not for 6): 3 steps of 3 layers (2), except
    # with Adam-style momentum, whose preconditioned velocity is no gradient of the rows.
    layers = 0 if case == "adam momentum" else 2 if case == "positions" else 3
    assert row_calls == [True] * 3 * layers


def test_rows_that_do_not_reproduce_the_gradient_send_the_layer_to_the_dense_product(
    row_calls: list[bool],
) -> None:
    def clipped_by_value(model: nn.Module) -> None:
        _plain(model)
        nn.utils.clip_grad_value_(model.parameters(), 1e-3)

    expected, _ = _train(False, clipped_by_value, Wide())
    got, opt = _train(True, clipped_by_value, Wide())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-13)
    assert row_calls == []
    rows = opt.preconditioner._capture.gradient_rows
    assert rows is not None and rows.blocks == set()  # dropped for good after the first step
    clipped_by_value(opt.model)
    assert rows.rows == {}  # a dropped layer keeps no rows


def test_a_non_finite_gradient_keeps_the_layer_on_the_rows(row_calls: list[bool]) -> None:
    model = Wide()
    opt = KFAC(model, lr=0.1, damping=1e-2, factor_update_steps=1, inverse_update_steps=1)
    for step in range(3):
        opt.zero_grad()
        loss = _loss(model, *_data())
        (loss * float("nan") if step == 1 else loss).backward()
        opt.step()
    assert row_calls == [True] * 6  # steps 0 and 2; step 1 skipped
    rows = opt.preconditioner._capture.gradient_rows
    assert rows is not None and len(rows.blocks) == 3


def test_more_rows_than_the_widths_take_the_dense_product(row_calls: list[bool]) -> None:
    def many_rows(model: nn.Module) -> None:
        _loss(model, *_data(n=64)).backward()

    def many_micro_batches(model: nn.Module) -> None:  # 20 rows each, 60 in all
        x, y = _data(n=60)
        for part in range(3):
            _loss(model, x[20 * part : 20 * (part + 1)], y[20 * part : 20 * (part + 1)]).backward()

    _train(True, many_rows, Wide())
    _train(True, many_micro_batches, Wide())
    assert row_calls == []
    assert cheaper(20, 40, 31) and not cheaper(60, 40, 31)
    # The exact break-even: rows (d_out^2 + d_in^2 + d_out d_in) against d_out d_in (d_out + d_in).
    assert cheaper(26, 40, 41) and not cheaper(27, 40, 41)
    assert not cheaper(2, 3, 3)  # 2 * 27 = 3 * 3 * 6: equal work is not cheaper
    # d_in counts the bias column.
    assert _widths(LinearBlock(nn.Linear(30, 40))) == (40, 31)
    assert _widths(LinearBlock(nn.Linear(30, 40, bias=False))) == (40, 30)
    # A call with too many rows keeps none of them.
    model = Wide()
    opt = KFAC(model, lr=0.1)
    many_rows(model)
    assert opt.preconditioner._capture.gradient_rows.rows == {}


def test_rows_are_not_kept_when_the_option_is_off_or_the_step_is_compiled() -> None:
    assert KFAC(Wide(), lr=0.1, low_rank_gradients=False).preconditioner._capture.gradient_rows is None
    assert KFAC(Wide(), lr=0.1, compile_step="eager").preconditioner._capture.gradient_rows is None
    # Eigendecompositions cannot precondition from the rows: no rows kept, no probe read.
    assert KFAC(Wide(), lr=0.1, inverse_method="eigh").preconditioner._capture.gradient_rows is None


def test_the_probe_leaves_the_global_random_stream_alone(row_calls: list[bool]) -> None:
    model = Wide()
    opt = KFAC(model, lr=0.1, damping=1e-2)
    _plain(model)
    state = torch.get_rng_state()
    opt.step()
    assert row_calls == [True] * 3
    assert torch.equal(torch.get_rng_state(), state)


def test_zero_grad_forgets_the_rows_of_the_gradients_it_clears(row_calls: list[bool]) -> None:
    model = Wide()
    opt = KFAC(model, lr=0.1, damping=1e-2)
    _loss(model, *_data(n=2)).backward()
    opt.zero_grad()
    _plain(model)
    opt.step()
    assert row_calls == [True] * 3  # the cleared pass's rows would have failed the probe


def test_float64_factors_of_a_float32_model_take_the_rows(row_calls: list[bool]) -> None:
    """The probe's threshold is the float32 gradient's precision, not the float64 factors'; the probe
    is drawn in the factors' dtype whatever the default dtype (float32 here; the float64 fixture
    restores the default afterwards)."""
    model = Wide().float()
    torch.set_default_dtype(torch.float32)

    def float32_pass(model: nn.Module) -> None:
        x, y = _data()
        _loss(model, x.float(), y).backward()

    expected, _ = _train(False, float32_pass, model, factor_dtype=torch.float64)
    got, _ = _train(True, float32_pass, model, factor_dtype=torch.float64)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert row_calls == [True] * 9


def test_only_linear_layers_with_kronecker_factors_keep_rows() -> None:
    """Convolutions (rows outnumber widths) and EKFAC's Linear layers (no Cholesky inverses) keep none."""
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 5))
    blocks = KFAC(model, lr=0.1).blocks
    assert RowCapture(blocks.values()).blocks == {blocks["2"], blocks["4"]}
    ekfac = KFAC(model, lr=0.1, approximation="ekfac").blocks
    assert RowCapture(ekfac.values()).blocks == set()


def _probe(
    scale: float, poison: bool = False, zero_rows: bool = False
) -> tuple[dict[LinearBlock, GradientRows], RowCapture, LinearBlock]:
    """verified_rows on one Linear layer whose gradient is `scale` times that of its kept rows (a NaN
    in the gradient, not in the rows, with `poison`; output-gradient rows of zeros with `zero_rows`)."""
    block = LinearBlock(nn.Linear(6, 8))
    capture = RowCapture([block])
    gen = torch.Generator().manual_seed(3)
    a_rows, g_rows = torch.randn(3, 6, generator=gen), torch.randn(3, 8, generator=gen)
    if zero_rows:
        g_rows.zero_()
    capture.rows[block] = [(a_rows, g_rows)]
    mat = scale * g_rows.mT @ torch.cat([a_rows, torch.ones(3, 1)], dim=1)
    if poison:
        mat[0, 0] = math.nan
    verified = verified_rows(capture, {"l": mat.unsqueeze(0)}, {"l": block}, torch.float64, gen)
    return verified, capture, block


@pytest.mark.parametrize(
    ("scale", "zero_rows"),
    [(1.0, True), (0.0, False), (1.0, False), (1e8, False)],
    ids=["zero-rows", "zero-scale", "unit", "large"],
)
def test_rows_reproducing_the_gradient_up_to_any_scale_are_used(scale: float, zero_rows: bool) -> None:
    """The probe's threshold is relative to the gradient: a zero gradient of zero rows (a zero probe,
    c = 1), one of nonzero rows (c = 0) and a gradient 1e8 times its rows' (a loss scale) all take
    the rows, with the fitted factor."""
    verified, capture, block = _probe(scale, zero_rows=zero_rows)
    assert block in verified and block in capture.blocks
    rows = verified[block]
    torch.testing.assert_close(rows.g_rows[0].mT @ rows.a_rows[0], rows.mat[0], rtol=1e-12, atol=0)


def test_a_non_finite_gradient_with_finite_rows_takes_the_dense_product_this_step_only() -> None:
    verified, capture, block = _probe(1.0, poison=True)
    assert verified == {} and block in capture.blocks  # not dropped
