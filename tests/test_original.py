"""The original port's API on KFAC (torch_kfac.original): its names, setters and explicit calls."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_data, make_mlp
from tests.test_optimizer import loss_of, natural, train
from torch_kfac import KFAC

pytestmark = pytest.mark.usefixtures("float64")


def test_original_positional_and_alias_arguments() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.05, 1e-3)
    assert opt.learning_rate == 0.05 and opt.param_groups[0]["lr"] == 0.05
    assert opt.damping.item() == pytest.approx(1e-3)
    opt.learning_rate = 0.01
    assert opt.param_groups[0]["lr"] == 0.01
    alias = KFAC(make_mlp(), learning_rate=0.2, damping=1e-2, momentum_type="ADAM")
    assert alias.learning_rate == 0.2 and alias.momentum_type == "adam"
    assert set(alias.blocks) == {"0", "2"}


def test_learning_rate_setter_sets_every_group_and_validates() -> None:
    opt = KFAC(make_mlp(), 0.05, 1e-3)
    opt.learning_rate = 0.02
    assert [g["lr"] for g in opt.param_groups] == [0.02] * len(opt.param_groups)
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = -1.0
    assert opt.learning_rate == 0.02
    # The adaptive learning rate would ignore it: refused, the group untouched.
    loss_fn = torch.nn.CrossEntropyLoss()
    adaptive = KFAC(make_mlp(), damping=1e-3, loss_fn=loss_fn, adaptive_learning_rate=True)
    with pytest.raises(ValueError, match="learning_rate cannot be set with adaptive_learning_rate=True"):
        adaptive.learning_rate = 0.1
    assert adaptive.param_groups[0]["lr"] == 0.0


def test_damping_setter_reaches_the_preconditioner() -> None:
    opt = KFAC(make_mlp(), 0.05, 1e-3)
    opt.damping = 0.25
    assert opt.preconditioner.damping.item() == 0.25 and opt.damping.item() == 0.25


def test_blocks_expose_named_factors() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    train(opt, model, 1)
    assert set(opt.blocks) == {"0", "2"}
    assert opt.blocks["0"].A.shape == (6, 6) and opt.blocks["0"].G.shape == (8, 8)
    covs = opt.covariances
    assert set(covs) == {"0", "2"}
    doubled = {n: (2 * a, 2 * g) for n, (a, g) in covs.items()}
    opt.covariances = doubled
    torch.testing.assert_close(opt.blocks["2"].A, doubled["2"][0])


def test_reset_cov_forgets_the_factors() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    train(opt, model, 1)
    opt.reset_cov()
    assert not any(b.has_factors() for b in opt.blocks.values())


def test_setting_covariances_refreshes_the_inverses() -> None:
    """The next preconditioned gradient uses the factors set by hand (G^-1 M A^-1, pi-damped)."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    train(opt, model, 1)
    block = opt.blocks["0"]
    n_a, n_g = block.A.shape[0], block.G.shape[0]
    mat = torch.randn(n_g, n_a)
    before = natural(opt, "0", mat)
    opt.covariances = {n: (4 * a, 9 * g) for n, (a, g) in opt.covariances.items()}
    pi = (torch.trace(block.A) / n_a / (torch.trace(block.G) / n_g)).sqrt()
    d = opt.damping.sqrt()
    expected = torch.linalg.solve(block.G + d / pi * torch.eye(n_g), mat) @ torch.linalg.inv(
        block.A + d * pi * torch.eye(n_a)
    )
    torch.testing.assert_close(natural(opt, "0", mat), expected)
    assert not torch.allclose(natural(opt, "0", mat), before)


def test_setting_covariances_of_an_unknown_module_is_an_error() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    train(opt, model, 1)
    a, g = opt.covariances["0"]
    with pytest.raises(ValueError, match="nope"):
        opt.covariances = {"nope": (a, g)}
    assert torch.equal(opt.blocks["0"].A, a)


def test_update_cov_folds_the_recorded_statistics_once() -> None:
    """update_cov_manually=True: factors change at update_cov() only, which says whether they did."""
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2, update_cov_manually=True)
    x, y = make_data()
    assert opt.update_cov() is False  # nothing recorded yet
    loss_of(model, x, y).backward()
    assert not any(b.has_factors() for b in opt.blocks.values())
    assert opt.update_cov() is True
    assert all(b.has_factors() for b in opt.blocks.values())
    assert opt.update_cov() is False  # the statistics were consumed


def test_close_removes_every_hook() -> None:
    model = make_mlp()
    opt = KFAC(model, 0.1, 1e-2)
    assert model[0]._forward_hooks
    opt.close()
    assert not any(m._forward_hooks for m in model.modules())
