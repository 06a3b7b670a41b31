"""Exact curvature products against the dense GGN, and the quadratic-model solve."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from tests.conftest import make_data, make_mlp
from torch_kfac import KFACPreconditioner, losses
from torch_kfac.qmodel import ExactCurvature, choose_coefficients, dot, quadratic_value, solve_coefficients

pytestmark = pytest.mark.usefixtures("float64")


def flat(d: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Concatenate a direction dict in parameter order."""
    return torch.cat([d[n].reshape(-1) for n in names])


def dense_ggn(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """J^T H J over all parameters (flattened in named_parameters order)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    def out(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, values, strict=True)), (x,))

    outputs = out(*params.values())
    jac = jacrev(out, argnums=tuple(range(len(names))))(*params.values())
    j = torch.cat([jj.reshape(outputs.numel(), -1) for jj in jac], 1)
    h = hessian(lambda o: loss_fn(o.reshape(outputs.shape), y))(outputs.reshape(-1))
    return j.T @ h @ j


def grams_in_both_modes(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    directions: list[dict[str, torch.Tensor]],
    seed: int | None = None,
) -> list[torch.Tensor]:
    """The Gram matrix from the forward-mode pass and from the reverse-mode fallback (each call
    from random state `seed` when given, for dropout)."""
    grams = []
    for forward_mode in (True, False):
        curvature = ExactCurvature(model, loss_fn)
        curvature.forward_mode = forward_mode
        if seed is not None:
            torch.manual_seed(seed)
        grams.append(curvature.gram(x, y, directions))
    return grams


def test_gram_equals_dense_ggn_quadratic_forms() -> None:
    model = make_mlp()
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_data()
    names = [n for n, _ in model.named_parameters()]
    dirs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]
    curvature = ExactCurvature(model, loss_fn)
    gram = curvature.gram(x, y, dirs)
    assert curvature.forward_mode  # the forward-mode pass itself, not the reverse-mode fallback
    vs = torch.stack([flat(d, names) for d in dirs])
    torch.testing.assert_close(gram, vs @ dense_ggn(model, loss_fn, x, y) @ vs.T, rtol=1e-10, atol=1e-12)


def test_gram_with_partial_directions_and_mse() -> None:
    model = make_mlp()
    loss_fn = nn.MSELoss()
    x = torch.randn(7, 5)
    y = torch.randn(7, 3)
    names = [n for n, _ in model.named_parameters()]
    only_last = {"2.weight": torch.randn(3, 8), "2.bias": torch.randn(3)}
    full = {n: torch.zeros_like(p) for n, p in model.named_parameters()} | only_last
    gram = ExactCurvature(model, loss_fn).gram(x, y, [only_last])
    v = flat(full, names)
    torch.testing.assert_close(gram[0, 0], v @ dense_ggn(model, loss_fn, x, y) @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sub_batch_gram_is_the_gram_of_the_leading_examples(reduction: str) -> None:
    """max_examples m < n: exactly the Gram of the first m examples, times n / m for a summed loss."""
    model = make_mlp()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    x, y = make_data(n=16)
    dirs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    sub = ExactCurvature(model, loss_fn, max_examples=5).gram(x, y, dirs)
    on_five = ExactCurvature(model, loss_fn).gram(x[:5], y[:5], dirs)
    assert torch.equal(sub, on_five * (16 / 5) if reduction == "sum" else on_five)
    names = [n for n, _ in model.named_parameters()]
    vs = torch.stack([flat(d, names) for d in dirs])
    reference = vs @ dense_ggn(model, nn.CrossEntropyLoss(), x[:5], y[:5]) @ vs.T
    expected = reference * 16 if reduction == "sum" else reference
    torch.testing.assert_close(sub, expected, rtol=1e-10, atol=1e-12)
    whole = ExactCurvature(model, loss_fn).gram(x, y, dirs)
    assert not torch.allclose(sub, whole)
    assert torch.equal(ExactCurvature(model, loss_fn, max_examples=16).gram(x, y, dirs), whole)


def test_gram_of_directions_over_different_parameters() -> None:
    """Each direction is zero on the parameters it leaves out."""
    model = make_mlp()
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_data()
    names = [n for n, _ in model.named_parameters()]
    first = {"0.weight": torch.randn(8, 5)}
    last = {"2.weight": torch.randn(3, 8), "2.bias": torch.randn(3)}
    gram = ExactCurvature(model, loss_fn).gram(x, y, [first, last])
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    vs = torch.stack([flat(zeros | first, names), flat(zeros | last, names)])
    torch.testing.assert_close(gram, vs @ dense_ggn(model, loss_fn, x, y) @ vs.T, rtol=1e-10, atol=1e-12)


def test_dot_over_the_shared_keys() -> None:
    u = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    v = {"a": torch.tensor([4.0, -1.0]), "c": torch.tensor(5.0)}
    assert dot(u, v).item() == 2.0
    assert dot({"b": u["b"]}, v).item() == 0.0  # nothing shared


def test_a_single_scalar_target_is_used_whole_with_max_examples() -> None:
    """A 0-d target (one summed output) has no examples to take the leading ones of."""

    class Total(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = make_mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).sum()

    model, x = Total(), make_data()[0]
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    y = torch.tensor(0.5)
    whole = ExactCurvature(model, nn.MSELoss()).gram(x, y, [direction])
    assert torch.equal(ExactCurvature(model, nn.MSELoss(), max_examples=4).gram(x, y, [direction]), whole)


def test_a_batch_of_max_examples_is_used_as_given() -> None:
    """n == max_examples takes the whole-batch path: the inputs are not sliced, so an input whose
    dim 0 is not the examples' (a sequence-first one, T > n) keeps all its positions."""

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = make_mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x.mean(0))  # x: (T, n, 5)

    model = SequenceFirst()
    x, y = torch.randn(6, 4, 5), torch.randint(0, 3, (4,))
    dirs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    whole = ExactCurvature(model, nn.CrossEntropyLoss()).gram(x, y, dirs)
    assert torch.equal(ExactCurvature(model, nn.CrossEntropyLoss(), max_examples=4).gram(x, y, dirs), whole)


def test_sub_batch_gram_of_a_registered_loss_without_reduction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss of one's own with no `reduction` attribute counts as a mean: its sub-batch Gram is the
    leading examples' own, unscaled."""

    class MeanSquare(nn.Module):
        def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return ((outputs - targets) ** 2).mean()

    monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
    losses.register_loss(MeanSquare, losses.MSECurvature)
    model, x = make_mlp(), make_data()[0]
    y = torch.randn(16, 3)
    dirs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    sub = ExactCurvature(model, MeanSquare(), max_examples=5).gram(x, y, dirs)
    assert torch.equal(sub, ExactCurvature(model, nn.MSELoss()).gram(x[:5], y[:5], dirs))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sub_batch_grams_average_to_the_whole_batch_gram(reduction: str) -> None:
    """The sub-batch Gram estimates the whole batch's without bias: over the equal parts of a
    batch (each part the leading examples of a reordering) the estimates average to it exactly."""
    model = make_mlp()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    x, y = make_data(n=16)
    dirs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    sub = ExactCurvature(model, loss_fn, max_examples=4)
    parts = [torch.roll(torch.arange(16), -4 * i) for i in range(4)]
    average = torch.stack([sub.gram(x[order], y[order], dirs) for order in parts]).mean(0)
    whole = ExactCurvature(model, loss_fn).gram(x, y, dirs)
    torch.testing.assert_close(average, whole, rtol=1e-12, atol=1e-14)


def test_extra_passes_leave_buffers_and_statistics_alone() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    pre = KFACPreconditioner(model)
    x, y = make_data()
    running = model[1].running_mean.clone()
    with pre.paused():
        ExactCurvature(model, nn.CrossEntropyLoss()).gram(x, y, [{"0.weight": torch.ones(4, 5)}])
    assert torch.equal(running, model[1].running_mean)
    assert pre.pending_statistics() == []


def test_solve_matches_brute_force_minimisation() -> None:
    gen = torch.Generator().manual_seed(4)
    root = torch.randn(2, 2, generator=gen)
    gram = root @ root.T + 0.1 * torch.eye(2)
    linear = torch.randn(2, generator=gen)
    coeffs = solve_coefficients(gram, linear)
    grid = torch.linspace(-3, 3, 601)
    a, b = torch.meshgrid(grid + coeffs[0], grid + coeffs[1], indexing="ij")
    cand = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    values = cand @ linear + 0.5 * ((cand @ gram) * cand).sum(1)
    assert quadratic_value(gram, linear, coeffs) <= values.min() + 1e-12
    fixed = solve_coefficients(gram, linear, {1: 0.3})
    assert fixed[1].item() == 0.3
    line = torch.stack([grid + fixed[0], torch.full_like(grid, 0.3)], 1)
    line_values = line @ linear + 0.5 * ((line @ gram) * line).sum(1)
    assert quadratic_value(gram, linear, fixed) <= line_values.min() + 1e-12


def test_singular_system_gets_the_minimum_norm_solution() -> None:
    gram = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    coeffs = solve_coefficients(gram, torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(coeffs, torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize("bad", ["curvature", "overlap", "linear"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_that_cannot_be_evaluated_gives_no_move_and_infinite_q(bad: str, value: float) -> None:
    """A non-finite term (an overflowed forward-mode pass) gives zero coefficients and q = inf,
    with or without a bound on the momentum, instead of pinv's error."""
    terms = {"curvature": torch.tensor([[2.0, 0.5], [0.5, 1.0]]), "overlap": torch.eye(2)}
    terms["linear"] = torch.tensor([-1.0, 0.3])
    terms[bad] = terms[bad].clone().reshape(-1).index_fill(0, torch.tensor([0]), value).view_as(terms[bad])
    for bounds in (None, (1, (0.0, 1.0))):
        coeffs, q = choose_coefficients(
            terms["curvature"], terms["overlap"], terms["linear"], torch.tensor(0.1), 0.1, {}, bounds
        )
        assert torch.equal(coeffs, torch.zeros(2)) and q.item() == math.inf


def test_a_model_whose_solution_overflows_gives_no_move_and_infinite_q() -> None:
    """Finite terms whose minimiser is not representable (1e30 / 1e-30 in float32)."""
    curvature, overlap = torch.eye(2, dtype=torch.float32) * 1e-30, torch.zeros(2, 2, dtype=torch.float32)
    linear = torch.tensor([-1e30, 0.0], dtype=torch.float32)
    assert not torch.isfinite(solve_coefficients(curvature, linear)).all()
    coeffs, q = choose_coefficients(curvature, overlap, linear, torch.tensor(0.0), 0.0, {})
    assert torch.equal(coeffs, torch.zeros(2)) and q.item() == math.inf


def test_a_finite_model_keeps_its_minimiser_and_value() -> None:
    curvature, linear = torch.tensor([[2.0, 0.5], [0.5, 1.0]]), torch.tensor([-1.0, 0.3])
    coeffs, q = choose_coefficients(curvature, torch.eye(2), linear, torch.tensor(0.1), 0.0, {})
    damped = curvature + 0.1 * torch.eye(2)
    torch.testing.assert_close(coeffs, torch.linalg.solve(damped, -linear))
    torch.testing.assert_close(q, quadratic_value(curvature, linear, coeffs))


def test_gram_through_fused_attention() -> None:
    """Forward-mode passes run attention through the math kernel (fused ones have no JVP)."""

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0].mean(1)

    torch.manual_seed(0)
    model = Attend()
    x, y = torch.randn(3, 5, 4), torch.randn(3, 4)
    names = [n for n, _ in model.named_parameters()]
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    expected = flat(direction, names) @ dense_ggn(model, nn.MSELoss(), x, y) @ flat(direction, names)
    # Both modes: reverse mode's fused kernels have no double backward either.
    for gram in grams_in_both_modes(model, nn.MSELoss(), x, y, [direction]):
        torch.testing.assert_close(gram[0, 0], expected, rtol=1e-8, atol=1e-10)


def test_gram_of_a_model_with_dropout_uses_one_mask_for_every_direction() -> None:
    """Dropout in training mode: the forward-mode pass draws one mask, the one a plain forward pass
    draws from the same random state, for the outputs and both directions, so the Gram matrix is
    that of the network with that mask (checked against the dense GGN with the mask fixed)."""

    class Masked(nn.Module):
        def __init__(self, scale: torch.Tensor) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))
    x, y = make_data(n=6)
    masks = []
    model[1].register_forward_hook(lambda m, inp, out: masks.append(out / inp[0]))
    torch.manual_seed(7)
    expected_outputs = model(x).detach()
    scale = masks[0].detach()
    assert 0 < int((scale == 0).sum()) < scale.numel()  # a mask that drops some units
    reference = nn.Sequential(model[0], Masked(scale), model[2], model[3])
    names = [n for n, _ in model.named_parameters()]
    directions = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    curvature = ExactCurvature(model, nn.CrossEntropyLoss())
    torch.manual_seed(7)
    outputs, _ = curvature.output_directions(x, directions)
    torch.testing.assert_close(outputs, expected_outputs, rtol=1e-12, atol=1e-14)
    torch.manual_seed(7)
    gram = curvature.gram(x, y, directions)
    assert curvature.forward_mode  # the forward-mode pass itself drew the mask
    v = torch.stack([flat(d, names) for d in directions])
    torch.testing.assert_close(
        gram, v @ dense_ggn(reference, nn.CrossEntropyLoss(), x, y) @ v.T, rtol=1e-10, atol=1e-12
    )


def test_reverse_mode_products_equal_the_forward_mode_ones() -> None:
    """J v from two reverse-mode passes (the path for models without forward-mode derivatives)
    equals the vectorised forward-mode pass, with dropout's one mask for every direction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))
    x, y = make_data(n=6)
    directions = [
        {n: torch.randn_like(p) for n, p in model.named_parameters() if n != "3.bias"} for _ in range(2)
    ]
    grams = grams_in_both_modes(model, nn.CrossEntropyLoss(), x, y, directions, seed=7)
    torch.testing.assert_close(grams[1], grams[0], rtol=1e-10, atol=1e-12)


def test_a_model_without_forward_mode_derivatives_falls_back_to_reverse_mode() -> None:
    """weight_norm has no forward-mode derivative in PyTorch: the Gram matrix still equals the dense
    GGN's quadratic forms, with one warning, and the later calls go straight to reverse mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 3))
    x, y = make_data(n=6)
    names = [n for n, _ in model.named_parameters()]
    directions = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    curvature = ExactCurvature(model, nn.CrossEntropyLoss())
    message = r"forward-mode pass failed \(.*_weight_norm_interface.*\); it uses two reverse-mode passes"
    with pytest.warns(RuntimeWarning, match=message):
        gram = curvature.gram(x, y, directions)
    assert not curvature.forward_mode
    v = torch.stack([flat(d, names) for d in directions])
    expected = v @ dense_ggn(model, nn.CrossEntropyLoss(), x, y) @ v.T
    torch.testing.assert_close(gram, expected, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="K-FAC")
        torch.testing.assert_close(curvature.gram(x, y, directions), gram, rtol=0, atol=0)


def test_running_out_of_memory_in_forward_mode_is_not_a_missing_derivative(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An out-of-memory error propagates and forward mode stays on (reverse mode needs more memory)."""

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("out of memory")

    curvature = ExactCurvature(make_mlp(), nn.CrossEntropyLoss())
    monkeypatch.setattr("torch_kfac.qmodel.vmap", lambda *a, **k: out_of_memory)
    x, y = make_data(n=4)
    direction = {n: torch.randn_like(p) for n, p in curvature.model.named_parameters()}
    with pytest.raises(torch.OutOfMemoryError):
        curvature.gram(x, y, [direction])
    assert curvature.forward_mode


def test_reverse_mode_ignores_parameters_the_outputs_do_not_depend_on() -> None:
    """A layer the forward pass never calls: no pullback in reverse mode, no tangent effect in
    forward mode; a direction that moves only that layer has J v = 0 in both."""

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
            self.spare = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    model = Unused()
    x, y = make_data(n=6)
    everything = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    spare_only = {n: torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("spare")}
    grams = grams_in_both_modes(model, nn.CrossEntropyLoss(), x, y, [everything, spare_only])
    alone = grams_in_both_modes(model, nn.CrossEntropyLoss(), x, y, [spare_only])  # none it depends on
    torch.testing.assert_close(grams[1], grams[0], rtol=1e-10, atol=1e-12)
    assert grams[1][0, 0] > 0 and torch.equal(grams[1][1], torch.zeros(2))
    assert all(torch.equal(g, torch.zeros(1, 1)) for g in alone)


def test_reverse_mode_of_a_piecewise_constant_model_is_zero() -> None:
    """Outputs rounded: their derivative is 0, and the pullback has no graph to differentiate."""

    class Rounded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.round(self.linear(x))

    torch.manual_seed(0)
    model, (x, y) = Rounded(), make_data(n=6)
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for gram in grams_in_both_modes(model, nn.CrossEntropyLoss(), x, y, [direction]):
        assert torch.equal(gram, torch.zeros(1, 1))
