"""damping='auto': the curvature along the gradient, against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import make_data, make_mlp
from torch_kfac import KFAC
from torch_kfac.calibration import AUTO_DAMPING_FRACTION, curvature_along, initial_damping
from torch_kfac.options import FALLBACK_DAMPING

pytestmark = pytest.mark.usefixtures("float64")


def test_curvature_along_is_the_rayleigh_quotient_of_the_dense_block_curvature() -> None:
    model = make_mlp()
    opt = KFAC(model, lr=0.1, damping=1.0, inverse_update_steps=1)
    x, y = make_data()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    mats = {n: torch.randn_like(b.grad_matrix()) for n, b in opt.blocks.items()}
    quad, norm = 0.0, 0.0
    for name, block in opt.blocks.items():
        vec = mats[name].mT.reshape(-1)  # column stacking, the layout of dense_curvature
        quad += vec @ block.dense_curvature() @ vec
        norm += vec @ vec
    torch.testing.assert_close(curvature_along(opt.blocks, mats), quad / norm, rtol=1e-12, atol=0)
    expected = float(quad / norm) * AUTO_DAMPING_FRACTION
    assert initial_damping(opt.blocks, mats) == pytest.approx(expected, rel=1e-12)


def test_without_factors_the_fallback_damping_is_used() -> None:
    model = make_mlp()
    opt = KFAC(model, lr=0.1)
    assert curvature_along(opt.blocks, {}) is None
    assert initial_damping(opt.blocks, {}) == FALLBACK_DAMPING


def test_auto_damping_is_set_at_the_first_step_and_the_inverses_use_it() -> None:
    model = make_mlp()
    opt = KFAC(model, lr=0.1, damping="auto", inverse_update_steps=100, warmup_steps=0, norm_constraint=None)
    x, y = make_data()
    nn.functional.cross_entropy(model(x), y).backward()
    mats = {n: b.grad_matrix().clone() for n, b in opt.blocks.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    expected = initial_damping(opt.blocks, mats)
    assert expected != FALLBACK_DAMPING
    assert opt.damping.item() == pytest.approx(expected, rel=1e-12)
    # The step was preconditioned with the calibrated damping, not the placeholder.
    for name, block in opt.blocks.items():
        natural = block.precondition(mats[name], opt.damping, True)
        weight, bias = block.from_matrix(natural)
        torch.testing.assert_close(params[f"{name}.weight"] - 0.1 * weight, model.get_submodule(name).weight)
        torch.testing.assert_close(params[f"{name}.bias"] - 0.1 * bias, model.get_submodule(name).bias)
    assert grads  # gradients were present
    # Later steps keep the damping (no recalibration).
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.damping.item() == pytest.approx(expected, rel=1e-12)


def test_bad_damping_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="damping"):
        KFAC(make_mlp(), lr=0.1, damping="automatic")
