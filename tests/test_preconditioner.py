"""KFACPreconditioner in front of stock torch optimizers; its own state and report."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_data, make_mlp
from torch_kfac import KFACPreconditioner
from torch_kfac.distributed import LAYOUT_KEY
from torch_kfac.options import PreconditionerOptions
from torch_kfac.preconditioner import all_finite, finite_flag

pytestmark = pytest.mark.usefixtures("float64")


def test_step_replaces_grads_with_the_damped_kronecker_solve() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, enable_pi_correction=False, inverse_method="eigh")
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], 1)
    assert pre.step()
    block = pre.blocks["2"]
    dense = torch.kron(block.A + 0.1 * torch.eye(9), block.G + 0.1 * torch.eye(3))
    expected = torch.linalg.solve(dense, grad.T.reshape(-1)).reshape(9, 3).T
    torch.testing.assert_close(model[2].weight.grad, expected[:, :8], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[2].bias.grad, expected[:, 8], rtol=1e-10, atol=1e-12)


def test_exact_damping_solves_kron_plus_damping() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, inverse_method="eigh", damping_type="exact")
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    pre.step()
    dense = pre.blocks["0"].dense_curvature(damping=1e-2)
    expected = torch.linalg.solve(dense, grad.T.reshape(-1)).reshape(6, 8).T
    torch.testing.assert_close(model[0].weight.grad, expected[:, :5], rtol=1e-9, atol=1e-12)


def test_cholesky_and_eigh_agree() -> None:
    grads = []
    for method in ("cholesky", "eigh"):
        model = make_mlp()
        pre = KFACPreconditioner(model, damping=1e-3, inverse_method=method)
        x, y = make_data()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def _scheduled_run(opt_name: str, preconditioned: bool) -> list[float]:
    """40 steps of SGD or AdamW with a cosine schedule, with or without the preconditioner in front."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2) if preconditioned else None
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    x, y = make_data()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if pre is not None:
            pre.step()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_in_front_of_sgd_beats_sgd_alone() -> None:
    """The same SGD run without the preconditioner (the identity) ends 40x higher (measured)."""
    kfac, plain = _scheduled_run("sgd", True), _scheduled_run("sgd", False)
    assert kfac[-1] < 0.6 * kfac[0]
    assert kfac[-1] < 0.1 * plain[-1], (kfac[-1], plain[-1])


def test_in_front_of_adamw_learns_and_changes_its_steps() -> None:
    """AdamW normalises each coordinate's step, which hides most of the preconditioning (final loss
    0.97x AdamW's alone here): the preconditioned run learns and takes other steps than AdamW alone."""
    kfac, plain = _scheduled_run("adamw", True), _scheduled_run("adamw", False)
    assert kfac[-1] < 0.6 * kfac[0]
    assert kfac[0] == plain[0] and abs(kfac[-1] - plain[-1]) > 1e-3 * plain[-1], (kfac[-1], plain[-1])


def test_state_dict_round_trip() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, inverse_update_steps=2)
    x, y = make_data()
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    other = KFACPreconditioner(make_mlp(), damping=1.0, inverse_update_steps=2)
    other.load_state_dict(pre.state_dict())
    assert other.steps == pre.steps and other.damping.item() == pytest.approx(1e-2)
    for name, block in pre.blocks.items():
        assert torch.equal(block.A, other.blocks[name].A)
        assert torch.equal(block.state["A_inv"], other.blocks[name].state["A_inv"])
    with pytest.raises(ValueError, match="blocks"):
        KFACPreconditioner(torch.nn.Linear(2, 2)).load_state_dict(pre.state_dict())


def test_report_lists_blocks_and_fallbacks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.PReLU(), torch.nn.Linear(4, 2))
    model[2].requires_grad_(False)
    text = repr(KFACPreconditioner(model))
    assert "0.weight: LinearBlock (A 5x5, G 4x4" in text
    assert "1.weight: fallback (no curvature block for this module type)" in text
    assert "2.weight: fallback (parameters frozen" in text


def test_unsupported_sharing_falls_back_instead_of_wrong_curvature() -> None:
    enc, dec = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    dec.bias = enc.bias  # a shared bias has no two-term Kronecker form
    pre = KFACPreconditioner(torch.nn.Sequential(enc, dec))
    assert pre.blocks == {}
    assert "cannot handle" in pre.describe()


def test_a_model_that_is_not_a_module_or_options_given_twice_are_refused_with_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"^model must be an nn.Module, got list$"):
        KFACPreconditioner([nn.Linear(2, 2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^pass either options=\.\.\. or the options as keywords, not both$"):
        KFACPreconditioner(make_mlp(), options=PreconditionerOptions(), damping=1e-2)


def test_a_model_without_parameters_gets_no_blocks_and_its_steps_change_nothing() -> None:
    pre = KFACPreconditioner(nn.ReLU())
    assert pre.blocks == {}
    assert pre.damping.dtype == torch.get_default_dtype()
    assert bool(pre.step())


def test_damping_takes_the_parameters_dtype_and_device_from_construction() -> None:
    model = make_mlp().float()  # the default dtype is float64 here
    assert KFACPreconditioner(model, damping=1e-2).damping.dtype == torch.float32
    assert KFACPreconditioner(make_mlp().to("meta")).damping.device == torch.device("meta")


def test_factor_dtype_applies_from_the_first_statistics() -> None:
    model = make_mlp().float()
    pre = KFACPreconditioner(model, damping=1e-2, factor_dtype=torch.float64)
    x, y = make_data()
    F.cross_entropy(model(x.float()), y).backward()
    pre.step()
    a = torch.cat([x.float().double(), torch.ones(len(x), 1)], 1)  # float32 inputs, float64 products
    assert pre.blocks["0"].A.dtype == torch.float64
    torch.testing.assert_close(pre.blocks["0"].A, a.T @ a / len(x), rtol=1e-13, atol=1e-15)


def test_an_empty_batch_evaluated_without_gradients_passes_through() -> None:
    model = make_mlp()
    KFACPreconditioner(model, loss_fn=nn.CrossEntropyLoss())  # reduction 'mean': no hook on the output
    with torch.no_grad():
        assert model(torch.zeros(0, 5)).shape == (0, 3)


def test_a_16_bit_model_computes_its_first_statistics_in_float32() -> None:
    model = make_mlp().to(torch.bfloat16)
    pre = KFACPreconditioner(model, damping=1e-2)
    x, y = make_data()
    x16 = x.to(torch.bfloat16)
    F.cross_entropy(model(x16).float(), y).backward()
    pre.step()
    a = torch.cat([x16.float(), torch.ones(len(x), 1, dtype=torch.float32)], 1)
    torch.testing.assert_close(pre.blocks["0"].A, a.T @ a / len(x), rtol=1e-5, atol=1e-6)


def test_a_fresh_preconditioner_reports_its_latest_step_as_taken() -> None:
    pre = KFACPreconditioner(make_mlp())
    assert pre.latest_taken is True
    assert pre.check() == (True, False)


def test_calibrated_damping_is_none_until_auto_damping_calibrates() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, damping="auto")
    assert pre.calibrated_damping is None
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert isinstance(pre.calibrated_damping, float)


def test_warmup_refreshes_factors_and_inverses_every_step_then_at_the_intervals() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(
        model, damping=1e-2, factor_update_steps=4, inverse_update_steps=4, warmup_steps=3, cov_ema_decay=0.5
    )
    block = pre.blocks["0"]
    factors, inverses, previous = [], [], (None, None)
    for step in range(9):
        x, y = make_data(seed=step)  # a new batch each step, so every fold changes the factors
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        current = (block.A.clone(), block.state["A_inv"].clone())
        factors.append(previous[0] is None or not torch.equal(previous[0], current[0]))
        inverses.append(previous[1] is None or not torch.equal(previous[1], current[1]))
        previous = current
    due = [step < 3 or step % 4 == 0 for step in range(9)]
    assert factors == due and inverses == due


def test_inverses_are_refreshed_only_at_their_scheduled_steps() -> None:
    """Factors folded every step, inverses refreshed in the warm-up and then every
    inverse_update_steps(step) steps (a schedule: 3 before step 6, then 2), not in between."""
    model = make_mlp()
    pre = KFACPreconditioner(
        model,
        damping=1e-2,
        factor_update_steps=1,
        inverse_update_steps=lambda step: 3 if step < 6 else 2,
        warmup_steps=2,
    )
    refreshed, previous = [], None
    for step in range(9):
        x, y = make_data(seed=step)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        current = pre.blocks["0"].state["A_inv"].clone()
        refreshed.append(previous is None or not torch.equal(previous, current))
        previous = current
    assert refreshed == [step in (0, 1, 3, 6, 8) for step in range(9)]


def test_a_block_whose_first_statistics_come_after_the_warmup_gets_inverses_at_once() -> None:
    """A layer first used at step 1 (inverses due only every 5 steps): its block is refreshed as soon
    as it has factors, so its gradient is preconditioned from that step on, not left raw until step 5."""

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.late = make_mlp(), nn.Linear(3, 3)
            self.use_late = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.body(x)
            return self.late(out) if self.use_late else out

    model = Late()
    pre = KFACPreconditioner(
        model, damping=1e-2, factor_update_steps=1, inverse_update_steps=5, warmup_steps=0
    )
    raw = torch.zeros(())
    for step in range(2):
        model.use_late = step == 1
        x, y = make_data(seed=step)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 1:
            raw = model.late.weight.grad.clone()
        pre.step()
    block = pre.blocks["late"]
    assert block.has_factors() and block.has_inverses()
    assert not torch.allclose(model.late.weight.grad, raw)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_warmup_steps_must_be_a_non_negative_integer(value: object) -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        KFACPreconditioner(make_mlp(), warmup_steps=value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finiteness_check_finds_nan_and_inf_and_passes_large_finite_values(dtype: torch.dtype) -> None:
    large = torch.full(
        (64, 64), 0.5 * float(torch.finfo(dtype).max) if dtype.itemsize == 2 else 1e4, dtype=dtype
    )
    assert all_finite([large, torch.ones(3, dtype=dtype)])  # a half-precision sum would overflow
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = torch.ones(5, 5, dtype=dtype)
        poisoned[2, 3] = bad
        assert not all_finite([torch.ones(2, dtype=dtype), poisoned])
    both = torch.zeros(4, dtype=dtype)
    both[0], both[1] = float("inf"), -float("inf")
    assert not all_finite([both])
    assert all_finite([])


def test_finiteness_flag_of_no_tensors_is_true_on_the_device_asked_for() -> None:
    flag = finite_flag([], device=torch.device("meta"))  # the step's flags live on the damping's device
    assert flag.device == torch.device("meta") and flag.dtype == torch.bool and flag.dim() == 0
    assert bool(finite_flag([]))


def test_float32_tensors_are_summed_in_float32_so_an_overflowing_sum_counts_as_non_finite() -> None:
    # Documented trade-off of `finite_flag`: one float32 sum per tensor (no float64 copy); entries
    # near float32's limit make the sum overflow and the tensor is reported non-finite (a safe skip).
    huge = torch.full((4,), 0.5 * float(torch.finfo(torch.float32).max), dtype=torch.float32)
    assert not all_finite([huge])
    assert all_finite([huge.double()])


def test_an_indefinite_damped_factor_is_decomposed_with_eigh() -> None:
    """Cholesky fails where rounding made A + damping indefinite: the block gets eigendecompositions
    with the eigenvalues clamped at zero, (A+ + a I)^-1 (x) (G + g I)^-1, instead."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, enable_pi_correction=False, update_factors_manually=True)
    x, y = make_data()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.update_factors()
    block = pre.blocks["2"]
    a, g = block.A.clone(), block.G.clone()
    vals, vecs = torch.linalg.eigh(a)
    vals[0] = -1.0  # far below -sqrt(damping): no Cholesky
    block.A = (vecs * vals) @ vecs.T
    mat = block.grad_matrix()
    pre.update_inverses(force=True)
    assert "A_eigvecs" in block.state and "A_inv" not in block.state
    assert "A_inv" in pre.blocks["0"].state  # the other blocks as usual
    shift = 1e-2**0.5
    a_inv = (vecs / (vals.clamp(min=0) + shift)) @ vecs.T
    g_inv = torch.linalg.inv(g + shift * torch.eye(3))
    torch.testing.assert_close(
        pre.precondition(block, mat)[0], g_inv @ mat[0] @ a_inv, rtol=1e-10, atol=1e-12
    )


_FAILURES = {
    "no convergence": "linalg.eigh: The algorithm failed to converge",
    "not finite": "the result is not finite",
    "not finite, then no convergence": "linalg.eigh: no convergence",
}


@pytest.mark.parametrize(
    ("failure", "check"),
    [(failure, 1) for failure in _FAILURES] + [("no convergence", None), ("not finite", None)],
)
def test_failed_inverse_update_keeps_the_previous_inverses(failure: str, check: int | None) -> None:
    """A failure that raises is known at once; non-finite inverses are decided on the device and
    warned of (with the reason) at the host check: in the step (check=1, then retried with eigh in
    the step, which may fail too) or at the next read (the previous values kept by the device, the
    block refreshed at the next step)."""
    why = _FAILURES[failure]
    model = make_mlp()
    pre = KFACPreconditioner(
        model, damping=1e-2, inverse_update_steps=1, warmup_steps=0, host_check_interval=check
    )
    x, y = make_data()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    block = pre.blocks["0"]
    kept, other = dict(block.state), pre.blocks["2"].state["A_inv"]
    original = block.update_inverses

    def broken(*args: object) -> None:
        if failure == "no convergence":
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        if failure.endswith("then no convergence") and args[-1] == "eigh":  # the retry with eigh
            raise torch.linalg.LinAlgError("linalg.eigh: no convergence\n(details on a second line)")
        original(*args)
        for key in [k for k in block.state if k.endswith(("_inv", "_eigvecs"))]:  # Cholesky, then eigh
            block.state[key] = torch.full_like(block.state[key], float("nan"))

    block.update_inverses = broken  # type: ignore[method-assign]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=rf"inverse update of block '0' failed \({why}"):
        pre.step()
        pre.check()
    assert block.state.keys() == kept.keys()
    if check == 1 or failure == "no convergence":
        assert all(block.state[k] is v for k, v in kept.items())
    else:
        assert all(torch.equal(block.state[k], v) for k, v in kept.items())
        assert pre._inverses_due("0") and "0" in pre._refresh_next
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert pre.blocks["2"].state["A_inv"] is not other  # the other block was refreshed as usual


def test_frozen_weight_gets_no_grad_and_its_bias_the_raw_gradient() -> None:
    """A weight frozen after construction: the layer's block is left out, no .grad is written into the
    weight, and the trainable bias keeps its own gradient (identity) instead of a Kronecker solve that
    mixes in a zero weight gradient."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    model[2].weight.requires_grad_(False)
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    raw = model[2].bias.grad.clone()
    assert pre.step()
    assert model[2].weight.grad is None
    torch.testing.assert_close(model[2].bias.grad, raw, rtol=0, atol=0)
    assert "2" not in pre.active_blocks and "0" in pre.active_blocks


# ---------------------------------------------------------------------- gradient accumulation
def _conv_net() -> nn.Module:
    """Conv2d, Linear and LayerNorm blocks (no batch statistics: micro-batches see the same model)."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 3),
    )


class _Tagger(nn.Module):
    """Embedding and Linear over token positions; logits (N, C, T) for a per-position loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids))).transpose(1, 2)


def _batch(kind: str, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    if kind == "tokens":
        return torch.randint(0, 7, (n, 5), generator=gen), torch.randint(0, 3, (n, 5), generator=gen)
    return torch.randn(n, 2, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _accumulate(
    kind: str, sizes: list[int], loss_scale: str, steps: int = 2, **options: object
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """`steps` steps of one batch split into micro-batches of `sizes`, each micro-batch's loss
    multiplied by 'share' (n_i / N), 'one' (1) or 'count' (1/k); the factors and the last step's
    preconditioned gradients."""
    model = _Tagger() if kind == "tokens" else _conv_net()
    reduction = options.get("reduction", "mean")
    loss_fn = nn.CrossEntropyLoss(reduction="sum" if reduction == "sum" else "mean")
    if reduction == "mean_positions" or options.get("fisher_type", "empirical") != "empirical":
        options["loss_fn"] = loss_fn
    pre = KFACPreconditioner(model, damping=1e-2, inverse_method="eigh", **options)
    x, y = _batch(kind, sum(sizes))
    for _ in range(steps):
        model.zero_grad()
        start = 0
        for n in sizes:
            scale = {"share": n / sum(sizes), "one": 1.0, "count": 1.0 / len(sizes)}[loss_scale]
            (loss_fn(model(x[start : start + n]), y[start : start + n]) * scale).backward()
            start += n
        assert pre.step(batch=(x, y))
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
    factors = {
        f"{n}.{k}": b.state[f"{k}_ema"] / b.state[f"{k}_weight"]
        for n, b in pre.blocks.items()
        for k in b.FACTORS
    }
    return factors, [p.grad.clone() for p in model.parameters()]


def _assert_same(got: tuple[dict, list], want: tuple[dict, list], grads: bool = True) -> None:
    assert got[0].keys() == want[0].keys()
    for key, value in want[0].items():
        torch.testing.assert_close(got[0][key], value, rtol=1e-10, atol=1e-13, msg=key)
    for a, b in zip(got[1], want[1], strict=True) if grads else ():
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("approximation", ["kfac", "diagonal"])
def test_k_equal_micro_batches_with_the_loss_divided_by_k_give_the_full_batch(approximation: str) -> None:
    """The common loop, `(loss_i / k).backward()`: the gradients add up to the batch's, and the factors
    (A, G, the norm layer's F, the diagonal's D) and the preconditioned step are the full batch's; G
    does not carry 1/k^2."""
    full = _accumulate("images", [12], "one", approximation=approximation)
    _assert_same(_accumulate("images", [4, 4, 4], "count", approximation=approximation), full)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unequal_micro_batches_are_weighted_per_example(reduction: str) -> None:
    """Micro-batches of 2, 7 and 3 examples: with 'mean' each loss is scaled by n_i / N, with 'sum'
    the plain sums add up to the batch's; the factors and the step are those of the full batch's mean
    loss (with 'sum' the gradient is divided by all N examples, not by the last micro-batch's)."""
    full = _accumulate("images", [12], "one")  # the mean loss: 'sum' takes the same steps
    scale = "share" if reduction == "mean" else "one"
    _assert_same(_accumulate("images", [2, 7, 3], scale, reduction=reduction), full)


def test_micro_batch_accumulation_takes_each_loss_unscaled() -> None:
    """accumulation='micro-batch': each backward pass is its micro-batch's own mean loss; the factors
    are still the full batch's, weighted per example."""
    full = _accumulate("images", [12], "one", steps=1)  # one step: the gradients differ from here on
    got = _accumulate("images", [2, 7, 3], "one", steps=1, accumulation="micro-batch")
    _assert_same(got, full, grads=False)
    equal = _accumulate("images", [4, 4, 4], "one", steps=1, accumulation="micro-batch")
    _assert_same((equal[0], [g / 3 for g in equal[1]]), full)  # the sum of 3 means, divided by 3


def test_per_position_loss_with_an_embedding_is_weighted_per_example() -> None:
    """reduction='mean_positions' (an embedding and a linear layer over 5 positions): micro-batches
    of 3, 1 and 4 sequences with losses scaled by n_i / N give the full batch's factors and step."""
    full = _accumulate("tokens", [8], "one", reduction="mean_positions")
    _assert_same(_accumulate("tokens", [3, 1, 4], "share", reduction="mean_positions"), full)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mc_fisher_with_accumulated_gradients_is_the_full_batch(reduction: str) -> None:
    """fisher_type='mc' with a fixed seed: the factors come from the preconditioner's own pass on the
    batch given to step (two samples per example, averaged); the accumulated gradients of micro-batches
    of 5 and 7 examples give the full batch's step (with 'sum', divided by the 12 examples of the
    user's passes, not counting the preconditioner's own)."""
    options = {"fisher_type": "mc", "mc_samples": 2, "mc_seed": 11}
    full = _accumulate("images", [12], "one", **options)  # the mean loss: 'sum' takes the same steps
    scale = "share" if reduction == "mean" else "one"
    _assert_same(_accumulate("images", [5, 7], scale, reduction=reduction, **options), full)


@pytest.mark.parametrize("host_check_interval", [1, None])
def test_a_skipped_step_forgets_the_examples_of_its_gradients(host_check_interval: int | None) -> None:
    """reduction='sum' in front of SGD: after a step skipped for a non-finite gradient (known in the
    step, or only on the device until the host check), the next batch's gradient is divided by its own
    examples only."""
    runs = []
    for skip in (True, False):
        model = make_mlp()
        pre = KFACPreconditioner(
            model, damping=1e-2, reduction="sum", host_check_interval=host_check_interval
        )
        if skip:
            F.cross_entropy(model(make_data(seed=4)[0]), make_data(seed=4)[1], reduction="sum").backward()
            model[0].weight.grad[0, 0] = float("nan")
            with pytest.warns(RuntimeWarning, match="skipped"):
                assert not pre.step()
                assert pre.skipped_in_a_row == 1
            model.zero_grad()
        F.cross_entropy(model(make_data()[0]), make_data()[1], reduction="sum").backward()
        assert pre.step()
        runs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("container", ["tuple", "dict"])
def test_sum_accumulation_counts_the_examples_of_a_model_with_several_outputs(container: str) -> None:
    """A model returning (inputs, logits) or {"inputs", "logits"} (a Hugging Face `ModelOutput` is a
    mapping): the examples are counted on its first output that requires grad, so micro-batches of 5
    and 11 with reduction='sum' step like the whole batch."""

    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def forward(self, x: torch.Tensor) -> Any:
            outputs = {"inputs": x, "logits": self.net(x)}
            return outputs if container == "dict" else tuple(outputs.values())

    x, y = make_data()
    runs = []
    for sizes in ([16], [5, 11]):
        model = TwoOutputs()
        pre = KFACPreconditioner(model, damping=1e-2, reduction="sum")
        for xi, yi in zip(x.split(sizes), y.split(sizes), strict=True):
            outputs = model(xi)
            logits = outputs["logits"] if container == "dict" else outputs[1]
            F.cross_entropy(logits, yi, reduction="sum").backward()
        assert pre.step()
        runs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sum_reduction_with_an_output_the_hooks_cannot_see_scales_by_the_forward_batch_size() -> None:
    """A model returning an object that is no tensor, tuple or mapping: no output hook counts the
    examples, so reduction='sum' takes the batch size of the last forward pass (of its one block),
    and steps like reduction='mean' with the mean loss."""

    class Output:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> Output:
            return Output(self.layer(x))

    x, y = make_data()
    grads = {}
    for reduction in ("sum", "mean"):
        model = Wrapped()
        pre = KFACPreconditioner(model, damping=1e-2, reduction=reduction)
        F.cross_entropy(model(x).logits, y, reduction=reduction).backward()
        assert pre.step()
        grads[reduction] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["sum"], grads["mean"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sum_reduction_without_a_recorded_forward_pass_is_a_clear_error() -> None:
    """Gradients from a forward pass the hooks did not see (the preconditioner made afterwards):
    reduction='sum' has no batch size to divide by, and says so."""
    model = make_mlp()
    x, y = make_data()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    pre = KFACPreconditioner(model, damping=1e-2, reduction="sum")
    with pytest.raises(
        RuntimeError, match=r"^reduction='sum' needs the batch size: run a forward pass first$"
    ):
        pre.step()


def test_sum_reduction_without_blocks_leaves_the_gradients_alone() -> None:
    """A model with no layer K-FAC handles: reduction='sum' needs no batch size, the step keeps the
    raw gradients."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    model = Scale()
    pre = KFACPreconditioner(model, damping=1e-2, reduction="sum")
    assert pre.blocks == {}
    (model(make_data()[0]) ** 2).sum().backward()
    raw = model.weight.grad.clone()
    assert pre.step()
    assert torch.equal(model.weight.grad, raw)


def _backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def test_update_factors_says_whether_the_factors_changed_and_drops_non_finite_statistics() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, update_factors_manually=True)
    assert pre.update_factors() is False  # nothing recorded yet
    x, y = make_data()
    _backward(model, x, y)
    assert pre.update_factors() is True and pre.blocks["0"].has_factors()
    a = pre.blocks["0"].A.clone()
    x[0, 0] = float("nan")
    _backward(model, x, y)
    warned = "non-finite layer statistics; the factors were not updated"
    with pytest.warns(RuntimeWarning, match=warned) as rec:
        assert pre.update_factors() is False
    assert rec[0].filename != inspect.getsourcefile(KFACPreconditioner)  # the caller's line
    assert torch.equal(pre.blocks["0"].A, a) and pre.pending_statistics() == []


def test_pending_statistics_are_the_recorded_batch_statistics() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, update_factors_manually=True)
    x, y = make_data()
    _backward(model, x, y)
    pending = pre.pending_statistics()
    assert [tuple(p.shape) for p in pending] == [(1, 6, 6), (1, 8, 8), (1, 9, 9), (1, 3, 3)]  # A, G per block
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
    torch.testing.assert_close(pending[0][0], x1.T @ x1 / len(x), rtol=1e-12, atol=0)


def test_state_dict_is_a_snapshot_and_loading_keeps_the_damping_tensor() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    _backward(model, *make_data())
    pre.step()
    saved = pre.state_dict()
    pre.damping = 0.5
    assert saved["global"]["damping"].item() == 1e-2  # not a view of the live damping
    other = KFACPreconditioner(make_mlp(), damping=1.0)
    live = other.damping
    other.load_state_dict(saved)
    assert other.damping is live and live.item() == 1e-2
    other.damping = 3.0
    assert saved["global"]["damping"].item() == 1e-2  # loading copied it


def test_state_dict_round_trip_of_layers_without_bias() -> None:
    def build() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(5, 4, bias=False), torch.nn.Tanh(), torch.nn.Linear(4, 3, bias=False)
        )

    model = build()
    pre = KFACPreconditioner(model, damping=1e-2)
    _backward(model, *make_data())
    pre.step()
    other = KFACPreconditioner(build(), damping=1.0)
    other.load_state_dict(pre.state_dict())
    for name, block in pre.blocks.items():
        assert torch.equal(block.A, other.blocks[name].A) and torch.equal(block.G, other.blocks[name].G)


def test_state_dict_check_goes_past_a_block_without_factors_and_names_the_shapes() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    wider = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    wide = KFACPreconditioner(wider, damping=1e-2)
    _backward(wider, *make_data())
    wide.step()
    state = wide.state_dict()
    state["blocks"]["0"] = {}  # block '0' fits (no factors yet); block '2' has 4 outputs, not 3
    shapes = r"\{'A_ema': \(1, 9, 9\), 'G_ema': \(1, 4, 4\)\} do not fit its parameters \[\(3, 8\), \(3,\)\]"
    with pytest.raises(ValueError, match=f"block '2' {shapes}"):
        pre.load_state_dict(state)


def test_quadratic_form_is_the_kronecker_form_of_the_blocks_given() -> None:
    """delta^T (A (x) G) delta summed over the blocks delta covers; a block it leaves out adds nothing."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    _backward(model, *make_data())
    pre.step()
    delta = {p: torch.randn_like(p) for p in model[2].parameters()}
    vec = torch.cat([delta[model[2].weight], delta[model[2].bias][:, None]], 1).T.reshape(-1)
    expected = vec @ pre.blocks["2"].dense_curvature() @ vec
    torch.testing.assert_close(pre.quadratic_form(delta.get), expected, rtol=1e-12, atol=0)
    for p in model[0].parameters():
        delta[p] = torch.randn_like(p)
    vec0 = torch.cat([delta[model[0].weight], delta[model[0].bias][:, None]], 1).T.reshape(-1)
    both = expected + vec0 @ pre.blocks["0"].dense_curvature() @ vec0
    torch.testing.assert_close(pre.quadratic_form(delta.get), both, rtol=1e-12, atol=0)


def test_close_removes_the_hooks_and_may_be_called_twice() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, loss_fn=torch.nn.CrossEntropyLoss(), reduction="mean_positions")
    pre.close()
    pre.close()
    _backward(model, *make_data())
    assert pre.pending_statistics() == []


def test_options_read_as_attributes_and_an_unknown_name_raises_naming_the_class() -> None:
    pre = KFACPreconditioner(make_mlp(), damping=1e-2, mc_samples=3, warmup_steps=5)
    assert pre.mc_samples == 3 and pre.warmup_steps == 5 and pre.fisher_type is pre.options.fisher_type
    with pytest.raises(
        AttributeError, match=r"^'KFACPreconditioner' object has no attribute 'no_such_option'$"
    ):
        _ = pre.no_such_option


def test_sum_reduction_of_a_one_layer_model_takes_the_mean_loss_gradient() -> None:
    """reduction='sum' counts the examples of a model with a single block (the batch size of its only
    layer) and divides the summed loss's gradient by it: the step of the mean loss."""
    runs = []
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        pre = KFACPreconditioner(model, damping=1e-2, reduction=reduction)
        x, y = make_data()
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        assert pre.step()
        runs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_mlp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.body(x),)


def test_mean_positions_with_a_model_returning_a_tuple_counts_one_term_per_example() -> None:
    """Loss terms are counted from a tensor output only; a tuple output leaves one term per example, the
    plain mean-reduced step."""
    runs = []
    for reduction in ("mean", "mean_positions"):
        model = _TupleOutput()
        pre = KFACPreconditioner(model, damping=1e-2, reduction=reduction, loss_fn=nn.CrossEntropyLoss())
        x, y = make_data()
        F.cross_entropy(model(x)[0], y).backward()
        assert pre.step()
        runs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _stepped(**options: Any) -> tuple[nn.Sequential, KFACPreconditioner]:
    """make_mlp with a preconditioner (no warmup, inverses every 10 steps) after one step: step 1 next."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, warmup_steps=0, inverse_update_steps=10, **options)
    _backward(model, *make_data())
    assert pre.step()
    return model, pre


def test_update_inverses_refreshes_the_due_blocks_or_all_when_forced() -> None:
    _, pre = _stepped()
    kept = pre.blocks["0"].state["A_inv"]
    pre.update_inverses()  # step 1 of 10: not due
    assert pre.blocks["0"].state["A_inv"] is kept
    pre.update_inverses(force=True)
    assert pre.blocks["0"].state["A_inv"] is not kept


def test_calibrate_sets_the_damping_and_refreshes_every_inverse_with_it() -> None:
    _, pre = _stepped()
    pre.calibrate(0.5)  # at step 1, where no block is due
    assert pre.calibrated_damping == 0.5 and pre.damping.item() == 0.5
    calibrated = {n: dict(b.state) for n, b in pre.blocks.items()}
    pre.update_inverses(force=True)  # the same damping: the same inverses
    for name, block in pre.blocks.items():
        for key in ("A_inv", "G_inv"):
            torch.testing.assert_close(calibrated[name][key], block.state[key], rtol=1e-12, atol=0)


def test_a_factor_update_schedule_is_read_at_each_step() -> None:
    """factor_update_steps as a callable of the step: every step up to step 2, then every 3rd."""
    model = make_mlp()
    pre = KFACPreconditioner(
        model, damping=1e-2, warmup_steps=0, factor_update_steps=lambda step: 1 if step < 2 else 3
    )
    folded, previous = [], None
    for step in range(7):
        _backward(model, *make_data(seed=step))
        pre.step()
        folded.append(previous is None or not torch.equal(previous, pre.blocks["0"].A))
        previous = pre.blocks["0"].A.clone()
    assert folded == [True, True, False, True, False, False, True]


def test_mc_labels_sampled_from_non_finite_outputs_are_not_drawn_and_the_step_is_skipped() -> None:
    """A batch whose outputs are not finite: the Monte Carlo pass draws no labels from them (a
    categorical with NaN probabilities cannot be sampled) and the step is skipped with a warning."""
    model = make_mlp()
    pre = KFACPreconditioner(model, fisher_type="mc", loss_fn=nn.CrossEntropyLoss(), host_check_interval=1)
    x, y = make_data()
    x[0, 0] = float("nan")
    _backward(model, x, y)
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert pre.step(batch=(x, y)) is False
    assert not any(b.has_factors() for b in pre.blocks.values())


class _UnusedHead(nn.Module):
    """A layer whose output the model computes but does not use (an auxiliary head left out)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.head(x)
        return self.body(x)


@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_own_fisher_pass_goes_past_a_layer_whose_output_is_unused(fisher_type: str) -> None:
    model = _UnusedHead()
    pre = KFACPreconditioner(model, fisher_type=fisher_type, loss_fn=nn.CrossEntropyLoss(), warmup_steps=0)
    x, y = make_data()
    _backward(model, x, y)
    assert pre.step(batch=(x, y))
    assert pre.blocks["body"].has_factors() and not pre.blocks["head"].has_factors()


def test_mc_labels_of_a_step_are_drawn_from_mc_seed_and_the_step() -> None:
    """With mc_seed the labels of step s are drawn from the seed (mc_seed + s * 0x9E3779B97F4A7C15)
    mod 2^63: a fixed stream, so a run (or a resumed one) draws the same labels in every version."""
    model = make_mlp()
    pre = KFACPreconditioner(model, fisher_type="mc", loss_fn=nn.CrossEntropyLoss(), mc_seed=3)
    assert pre.loss_curvature is not None
    sample, seeds = pre.loss_curvature.sample_targets, []

    def spy(outputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        assert generator is not None
        seeds.append(generator.initial_seed())
        return sample(outputs, targets, generator)

    pre.loss_curvature.sample_targets = spy  # type: ignore[method-assign]
    x, y = make_data()
    for _ in range(3):
        _backward(model, x, y)
        pre.step(batch=(x, y))
    assert seeds == [(3 + s * 0x9E3779B97F4A7C15) % 2**63 for s in range(3)]


def test_quadratic_form_of_layers_without_bias_in_a_wider_factor_dtype() -> None:
    """float32 parameters, float64 factors: delta is cast to the factors' dtype; a block of one
    parameter (no bias) is covered."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False)).float()
    pre = KFACPreconditioner(model, damping=1e-2, factor_dtype=torch.float64)
    x, y = make_data()
    _backward(model, x.float(), y)
    pre.step()
    delta = {p: torch.randn_like(p) for p in model.parameters()}
    expected = sum(
        (vec := delta[model[i].weight].double().T.reshape(-1)) @ pre.blocks[str(i)].dense_curvature() @ vec
        for i in (0, 2)
    )
    form = pre.quadratic_form(delta.get)
    assert form.dtype == torch.float64
    torch.testing.assert_close(form, expected, rtol=1e-12, atol=0)


def test_a_clean_step_warns_of_nothing() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, host_check_interval=1)
    _backward(model, *make_data())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pre.step() is True


def test_state_dict_makes_the_pending_host_check() -> None:
    """A step skipped on the device only (no host check in the step) is warned of when the state is
    saved: state_dict reads what the device decided first."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    _backward(model, *make_data())
    model[0].weight.grad[0, 0] = float("nan")
    pre.step()
    with pytest.warns(RuntimeWarning, match="skipped"):
        pre.state_dict()
    assert pre._skipped_in_a_row == 1


def _break_inverses(
    block: Any,
    keys: tuple[str, ...] = ("_inv", "_eigvecs"),
    method: str | None = None,
    record: list[str] | None = None,
) -> Any:
    """Make the block's inverse refreshes (those with `method`, or all) non-finite: NaN in its state
    entries ending with `keys` (the factors stay finite); the methods asked for are appended to
    `record`. Returns the original refresh."""
    original = block.update_inverses

    def broken(*args: Any) -> None:
        if record is not None:
            record.append(args[-1])
        original(*args)
        if method is None or args[-1] == method:
            for key in [k for k in block.state if k.endswith(keys)]:
                block.state[key] = torch.full_like(block.state[key], float("nan"))

    block.update_inverses = broken
    return original


def _grad_step(pre: KFACPreconditioner, model: nn.Module, seed: int = 1, poison: bool = False) -> object:
    """One forward/backward of the 5-8-3 MLP on a batch, the first weight's gradient NaN if `poison`."""
    x, y = make_data(seed=seed)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if poison:
        model[0].weight.grad[0, 0] = float("nan")
    return pre.step()


def test_inverses_are_refreshed_only_on_their_schedule_while_the_factors_change() -> None:
    model = make_mlp()
    pre = KFACPreconditioner(
        model, damping=1e-2, factor_update_steps=1, inverse_update_steps=3, warmup_steps=0
    )
    block = pre.blocks["0"]
    _grad_step(pre, model, seed=1)
    factor, inverse = block.A.clone(), block.state["A_inv"]
    _grad_step(pre, model, seed=2)
    assert not torch.equal(block.A, factor)  # the factor was folded ...
    assert block.state["A_inv"] is inverse  # ... the inverse not refreshed (due at step 3)
    _grad_step(pre, model, seed=3)
    _grad_step(pre, model, seed=4)
    assert block.state["A_inv"] is not inverse


def test_an_inverse_refresh_leaves_the_factors_in_place() -> None:
    """Only the new inverses are checked and masked; the factors are not copied."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    _grad_step(pre, model)
    block = pre.blocks["0"]
    factors = {k: v for k, v in block.state.items() if not k.endswith("_inv")}
    pre.update_inverses(force=True)
    assert all(block.state[k] is v for k, v in factors.items())


def test_without_factors_a_forced_refresh_skips_the_block_and_the_step_passes_the_raw_gradient() -> None:
    """update_factors_manually with no factors yet: `update_inverses(force=True)` (also what damping='auto'
    calls) has nothing to invert."""
    model = make_mlp()
    pre = KFACPreconditioner(model, update_factors_manually=True)
    x, y = make_data()
    F.cross_entropy(model(x), y).backward()
    pre.discard_statistics()
    grads = [p.grad.clone() for p in model.parameters()]
    pre.update_inverses(force=True)
    assert pre.step()
    assert not any(b.has_factors() or b.has_inverses() for b in pre.blocks.values())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_a_skipped_first_step_is_no_inverse_failure_with_eigh_either() -> None:
    """eigh raises on the skipped step's factors: its state is put back without a failure warning,
    and the next step refreshes."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, inverse_method="eigh")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _grad_step(pre, model, poison=True)
        _grad_step(pre, model)
        assert pre.check() == (True, False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "step was skipped" in messages[0], messages
    assert all(b.has_inverses() for b in pre.blocks.values())


def test_a_skipped_first_step_is_no_inverse_failure() -> None:
    """Its factors (weight 0) give non-finite inverses, which the skip masks: the host check warns of
    the skipped step only, and the next step refreshes with the configured method."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    _grad_step(pre, model, poison=True)
    _grad_step(pre, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pre.check() == (True, False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "step was skipped" in messages[0]
    assert not pre._refresh_next


def test_an_embedding_whose_first_inverses_are_not_finite_gets_the_raw_gradient() -> None:
    """No previous inverses to keep: the device puts identities in their layout (ones for the diagonal
    A of an embedding, eye for its G), so the block's step is its raw gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3))
    pre = KFACPreconditioner(model, damping=1e-2)
    _break_inverses(pre.blocks["0"])
    tokens, y = torch.randint(0, 7, (16,)), make_data()[1]
    F.cross_entropy(model(tokens), y).backward()
    raw = model[0].weight.grad.clone()
    pre.step()
    assert set(pre.blocks["0"].state) >= {"A_inv", "G_inv"}
    torch.testing.assert_close(model[0].weight.grad, raw, rtol=0, atol=0)


def test_a_failed_refresh_read_at_the_check_of_a_skipped_step_is_warned_and_redone_with_eigh() -> None:
    """Block '0' refreshes to non-finite inverses at step 0 (no host check then); the host check of the
    skipped step 1, where block '0' is not due, warns of it and schedules it again, with eigh in place
    of the failed Cholesky."""
    model = make_mlp()
    pre = KFACPreconditioner(
        model, damping=1e-2, warmup_steps=0, inverse_update_steps=2, host_check_interval=2
    )
    block = pre.blocks["0"]
    original = _break_inverses(block)
    x, y = make_data()
    _backward(model, x, y)
    pre.step()
    block.update_inverses = original  # type: ignore[method-assign]
    _backward(model, x, y)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning) as rec:
        assert pre.step() is False
    messages = [str(r.message) for r in rec]
    assert any("skipped" in m for m in messages)
    assert any("inverse update of block '0' failed (the result is not finite" in m for m in messages)
    _backward(model, x, y)
    assert pre.step() is True
    assert "A_eigvecs" in block.state and "A_inv" not in block.state
    assert "A_inv" in pre.blocks["2"].state  # not due: kept as it was


class _TiedLinear(nn.Module):
    """Two Linear layers sharing one weight (a tied block), then an output layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_a_tied_block_retried_with_eigh_gets_the_inverses_of_its_damping_and_pi() -> None:
    """Cholesky inverses that are not finite are redone in the step with 'eigh', with the same damping
    and pi correction: a tied block (whose refresh uses both whatever the method) then holds exactly the
    inverses of an undisturbed run."""
    runs = []
    for broken in (False, True):
        model = _TiedLinear()
        pre = KFACPreconditioner(model, damping=1e-2, host_check_interval=1)
        block = pre.blocks["a+b"]
        if broken:
            _break_inverses(block, ("tied_lr", "tied_lc", "tied_denom"), method="cholesky")
        x, y = make_data()
        F.cross_entropy(model(x[:, :4]), y).backward()
        assert pre.step() is True
        runs.append({k: block.state[k] for k in ("tied_lr", "tied_lc", "tied_denom")})
    for key, value in runs[0].items():
        torch.testing.assert_close(runs[1][key], value, rtol=0, atol=0)


def test_reset_factors_forgets_the_inverse_layout_loaded_from_a_distributed_checkpoint() -> None:
    """A checkpoint of a distributed run records which ranks hold each block's inverses; after
    reset_factors there are none, so the layout goes too (a later distributed load would take the
    blocks' inverses as ready)."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2)
    _backward(model, *make_data())
    pre.step()
    state = pre.state_dict()
    state["global"][LAYOUT_KEY] = {name: [0] for name in pre.blocks}  # as a distributed run saves it
    pre.load_state_dict(state)
    pre.reset_factors()
    assert LAYOUT_KEY not in pre.state_dict()["global"]
    assert not any(block.has_factors() or block.has_inverses() for block in pre.blocks.values())


def _failed_refresh() -> tuple[nn.Module, KFACPreconditioner, Any, Any]:
    """An MLP whose first block's inverse refresh failed (not finite) in its second step, unchecked
    yet: the model, the preconditioner, the block and the block's original refresh."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping=1e-2, inverse_update_steps=1, warmup_steps=0)
    _grad_step(pre, model, seed=1)
    block = pre.blocks["0"]
    original = _break_inverses(block)
    _grad_step(pre, model, seed=2)
    return model, pre, block, original


def test_a_failed_refresh_is_reported_even_when_a_later_one_before_the_check_succeeds() -> None:
    model, pre, block, original = _failed_refresh()
    block.update_inverses = original
    _grad_step(pre, model, seed=3)
    with pytest.warns(RuntimeWarning, match=r"inverse update of block '0' failed \(the result is not finite"):
        pre.check()


def test_a_block_whose_refresh_failed_is_refreshed_once_with_eigh() -> None:
    """Found at a later host check: refreshed at the next step with eigh, then with the configured method."""
    model, pre, block, original = _failed_refresh()
    with pytest.warns(RuntimeWarning, match="refreshed again at the next step"):
        pre.check()
    methods: list[str] = []
    _break_inverses(block, record=methods)
    block.update_inverses = lambda *args: (methods.append(args[-1]), original(*args))[-1]
    _grad_step(pre, model, seed=3)
    _grad_step(pre, model, seed=4)
    assert methods == ["eigh", "cholesky"]
    assert not pre._refresh_next


def test_auto_damping_is_not_calibrated_from_a_skipped_first_step() -> None:
    """The first step with damping='auto' makes the host check: a skipped one returns False before the
    calibration, and the next (clean) step calibrates from its own gradients."""
    model = make_mlp()
    pre = KFACPreconditioner(model, damping="auto")
    assert _grad_step(pre, model, poison=True) is False
    assert pre.calibrated_damping is None and pre.steps == 0
    assert _grad_step(pre, model) is True
    assert pre.calibrated_damping is not None and pre.steps == 1


def test_recorded_statistics_stay_in_the_factor_dtype_after_a_step() -> None:
    model = make_mlp().float()
    pre = KFACPreconditioner(model, factor_dtype=torch.float64)
    x, y = make_data()
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x.float()), y).backward()
        assert all(b.pending(k).dtype == torch.float64 for b in pre.blocks.values() for k in b.FACTORS)
        pre.step()


def test_factors_and_damping_follow_the_model_to_another_device() -> None:
    """`model.to(device)` after construction (the meta device stands in for a GPU on the CPU): a step
    that records no statistics moves the factors, inverses and damping with the model."""
    model = make_mlp()
    pre = KFACPreconditioner(
        model, damping=1e-2, factor_update_steps=2, inverse_update_steps=2, warmup_steps=0
    )
    _grad_step(pre, model, seed=1)
    x, y = make_data(seed=2)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model.to("meta")  # the gradients move too
    pre.step()
    assert pre.damping.device.type == "meta"
    assert all(t.device.type == "meta" for b in pre.blocks.values() for t in b.state.values())


@pytest.mark.parametrize(
    ("built", "converted"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float64, torch.bfloat16)],
    ids=["up", "down", "to-bf16"],
)
def test_a_model_converted_to_another_dtype_after_construction_steps_as_one_built_in_it(
    built: torch.dtype, converted: torch.dtype
) -> None:
    """`model.to(dtype)` between construction and the first pass: that pass's statistics are taken
    in the new factor dtype (float32 for bfloat16), so the step equals that of a model built in it
    (up to the initial damping's rounding in the construction dtype)."""
    grads, factors = [], []
    for convert_after in (True, False):
        model = make_mlp().to(built)  # the same weights in both runs
        if not convert_after:
            model.to(converted)
        pre = KFACPreconditioner(model, damping=1e-2, warmup_steps=0)
        model.to(converted)  # (a no-op for the model built in it)
        x, y = make_data()
        model.zero_grad()
        F.cross_entropy(model(x.to(converted)), y).backward()
        pre.step()
        grads.append([p.grad for p in model.parameters()])
        factors.append([t for b in pre.blocks.values() for k, t in b.state.items() if k.endswith("_ema")])
    assert all(t.dtype == (torch.float32 if converted == torch.bfloat16 else converted) for t in factors[0])
    assert all(torch.equal(a, b) for a, b in zip(*factors, strict=True))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_flags_live_on_the_models_device_not_on_the_default_device() -> None:
    """Skip and inverse flags are made on the damping's device, also where no tensor decides them (a
    diagonal block's refresh computes nothing; a step whose blocks are all frozen): the meta default
    device stands in for a GPU default with a CPU model."""
    model = make_mlp()
    pre = KFACPreconditioner(
        model, damping=1e-2, approximation="diagonal", factor_update_steps=2, warmup_steps=0
    )
    x, y = make_data()
    for frozen in (False, True):  # the second step records no statistics and has no active block
        if frozen:
            model[0].weight.requires_grad_(False)
            model[2].weight.requires_grad_(False)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.device("meta"):
            pre.step()
            pre.update_inverses(force=True)
            assert pre.check() == (True, False)


def test_a_forward_pass_back_propagated_after_a_step_keeps_its_joint_statistics() -> None:
    """The rows a diagonal block keeps from a forward pass wait for its backward pass, even across a
    step: recording x_a, stepping on x_b, then back-propagating x_a gives the factors of the plain
    order (x_b, then x_a)."""
    (xa, ya), (xb, yb) = make_data(seed=1), make_data(seed=2)
    runs = []
    for interleaved in (True, False):
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        pre = KFACPreconditioner(model, approximation="diagonal", factor_update_steps=1, damping=1e-2)
        if interleaved:
            loss_a = F.cross_entropy(model(xa), ya)
            F.cross_entropy(model(xb), yb).backward()
            pre.step()
            model.zero_grad()
            loss_a.backward()
            pre.step()
        else:
            for x, y in ((xb, yb), (xa, ya)):
                model.zero_grad()
                F.cross_entropy(model(x), y).backward()
                pre.step()
        runs.append({k: v.clone() for k, v in pre.blocks[""].state.items()})
    assert runs[0].keys() == runs[1].keys()
    for key, value in runs[0].items():
        torch.testing.assert_close(value, runs[1][key], rtol=1e-12, atol=0)


class _Positions(nn.Module):
    """Token and position embeddings summed, a head: logits (N, vocab, T). `lookup` says how the
    position table is looked up: 'shared' (ids (T,), broadcast), 'one' (ids (1, T)), 'expanded' (N, T)."""

    def __init__(self, lookup: str) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 7)
        self.lookup = lookup

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])
        if self.lookup == "one":
            positions = positions[None]
        elif self.lookup == "expanded":
            positions = positions.expand(ids.shape[0], -1)
        return self.head(torch.tanh(self.tok(ids) + self.pos(positions))).transpose(1, 2)


@pytest.mark.parametrize("lookup", ["shared", "one", "expanded"])
def test_a_position_table_shared_by_the_examples_is_reported(lookup: str) -> None:
    """A lookup whose output the examples share (ids arange(T) or (1, T), broadcast over the batch)
    gives the block the summed gradient, not per-example ones: one warning names the table and the
    fix; ids of shape (N, T) (whose block is exact: the one-hot Linear test of test_embedding) and a
    batch of one example raise none."""
    model = _Positions(lookup)
    pre = KFACPreconditioner(model, factor_update_steps=1)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (4, 4, 1):
            ids = torch.randint(0, 7, (n, 5), generator=gen)
            nn.functional.cross_entropy(model(ids), torch.randint(0, 7, (n, 5), generator=gen)).backward()
            pre.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if lookup == "expanded":
        assert messages == []
    else:
        rows = 5 if lookup == "shared" else 1
        assert len(messages) == 1
        assert messages[0].startswith(
            f"K-FAC: nn.Embedding 'pos' was looked up with ids of {rows} row(s) for a batch of 4 examples"
        )
        assert "positions.expand(N, T)" in messages[0] and "skip_modules=['pos']" in messages[0]


class _RecurrentTagger(nn.Module):
    """An LSTM and a per-step head (logits (..., 6)). `layout`: 'batch-first' (inputs (N, T, 6)),
    'sequence-first' ((T, N, 6), the LSTM's default) or 'flattened' (batch-first, the head applied
    to the (N * T, 4) rows)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.rnn = nn.LSTM(6, 4, batch_first=layout != "sequence-first")
        self.out = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.out(h.reshape(-1, 4) if self.layout == "flattened" else h)


def _recurrent_tagger_factors(layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Two steps of `_RecurrentTagger(layout)` from one start on the same 3 sequences of 5 steps (float64):
    the head's factors and the RuntimeWarnings raised."""
    torch.manual_seed(0)
    model = _RecurrentTagger(layout).double()
    pre = KFACPreconditioner(model, factor_update_steps=1, cov_ema_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            x = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 6, (3, 5), generator=gen)
            if layout == "sequence-first":
                x, y = x.transpose(0, 1), y.t()
            F.cross_entropy(model(x).reshape(-1, 6), y.reshape(-1)).backward()
            pre.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return {k: v.clone() for k, v in pre.blocks["out"].state.items()}, messages


def test_layers_that_count_different_examples_are_reported() -> None:
    """A head on sequence-first activations counts the 5 time steps as its examples and one on
    flattened rows the 15 positions, while the LSTM counts the 3 sequences: the head's G is then
    5/3 or 5 times the batch-first model's (its A is the same average), on another scale than the
    LSTM's blocks. One warning (over two steps) names both layers and their counts; the batch-first
    model raises none."""
    reference, quiet = _recurrent_tagger_factors("batch-first")
    assert quiet == []
    for layout, examples, ratio in (("sequence-first", 5, 5 / 3), ("flattened", 15, 5.0)):
        factors, messages = _recurrent_tagger_factors(layout)
        torch.testing.assert_close(factors["A_ema"], reference["A_ema"], rtol=1e-12, atol=0)
        torch.testing.assert_close(factors["G_ema"], ratio * reference["G_ema"], rtol=1e-12, atol=0)
        assert len(messages) == 1
        assert messages[0].startswith(
            f"K-FAC: layers 'rnn' and 'out' count different numbers of examples in the same passes "
            f"(3 examples and {examples} examples"
        )
        assert "nn.LSTM(batch_first=True)" in messages[0] and "skip_modules" in messages[0]


class _Branched(nn.Module):
    """A trunk called twice per pass (on the input and on its own output) and a branch that runs
    on batches of 8 only."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.branch, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(torch.tanh(self.trunk(x))))
        if self.training and x.shape[0] == 8:  # the branch runs in the first micro-batch only
            h = h + self.branch(h)
        return self.head(h)


def test_layers_called_twice_or_in_some_micro_batches_are_not_reported() -> None:
    """Example counts that differ without being disjoint are no error: a layer called twice per
    pass, micro-batches of 8 and 5 examples, and a layer called in the first of them only."""
    model = _Branched()
    pre = KFACPreconditioner(model, factor_update_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (8, 5):
            x, y = make_data(n, seed=n)
            F.cross_entropy(model(x), y).backward()
        pre.step()
    assert pre.blocks["branch"].has_factors() and pre.blocks["trunk"].has_factors()
