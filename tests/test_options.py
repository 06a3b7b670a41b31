"""options.py: every option declared, defaulted and checked once; choices as string enums."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import make_mlp
from torch_kfac import KFAC, KFACPreconditioner
from torch_kfac.options import (
    CHECKS,
    ORIGINAL_POSITIONAL,
    Approximation,
    FisherType,
    KFACOptions,
    MomentumType,
    PreconditionerOptions,
    Reduction,
    kfac_options,
)


# ------------------------------------------------------------------------ declarations
def test_every_option_has_exactly_one_check() -> None:
    names = {f.name for f in dataclasses.fields(KFACOptions)}
    assert names == set(CHECKS)
    assert {f.name for f in dataclasses.fields(PreconditionerOptions)} < names


def test_kfac_and_preconditioner_share_the_curvature_defaults() -> None:
    kfac = KFACOptions(lr=0.1)
    pre = PreconditionerOptions()
    for f in dataclasses.fields(PreconditionerOptions):
        assert getattr(kfac, f.name) == getattr(pre, f.name), f.name


def test_signatures_are_generated_from_the_options() -> None:
    kfac = inspect.signature(KFAC)
    pre = inspect.signature(KFACPreconditioner)
    assert list(kfac.parameters)[1 : 1 + len(ORIGINAL_POSITIONAL)] == list(ORIGINAL_POSITIONAL)
    assert kfac.parameters["damping"].default == 1e-3
    assert kfac.parameters["update_cov_manually"].default is False
    assert kfac.parameters["max_damping"].default == math.inf
    assert kfac.parameters["learning_rate"].kind is inspect.Parameter.KEYWORD_ONLY
    assert pre.parameters["warmup_steps"].default == 20
    assert "lr" not in pre.parameters and "update_cov_manually" not in pre.parameters


# ------------------------------------------------------------------------------ choices
def test_choices_accept_plain_strings_in_any_case_and_behave_as_strings() -> None:
    options = PreconditionerOptions(fisher_type="MC", loss_fn=nn.CrossEntropyLoss(), reduction="Mean")
    assert options.fisher_type is FisherType.MC
    assert options.reduction is Reduction.MEAN
    assert options.fisher_type == "mc" and {"mc": 1}[options.fisher_type] == 1
    assert f"{options.fisher_type!r} {options.fisher_type}" == "'mc' mc"
    ekfac = PreconditionerOptions(approximation=Approximation.EKFAC, inverse_method="eigh")
    assert ekfac.approximation == "ekfac"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("fisher_type", "true"),
        ("approximation", "kron"),
        ("kfac_approx", 1),
        ("reduction", "none"),
        ("inverse_method", "svd"),
        ("damping_type", None),
        ("accumulation", "mean"),
        ("accumulated_passes", "first"),
    ],
)
def test_bad_choices_name_the_option_and_the_allowed_values(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be one of '") as err:
        PreconditionerOptions(**{name: value})
    assert repr(value) in str(err.value)


def test_momentum_type_is_an_enum() -> None:
    assert KFACOptions(lr=0.1, momentum_type="ADAM").momentum_type is MomentumType.ADAM


# ---------------------------------------------------------------------------- validation
BAD: list[tuple[str, Any, str]] = [
    ("lr", math.inf, "finite"),
    ("lr", -0.1, r"\[0.0"),
    ("lr", "0.1", "number"),
    ("damping", 0.0, r"\(0.0"),
    ("damping", math.nan, "lie in"),
    ("damping", math.inf, "finite"),
    ("momentum", 1.0, r"1.0\)"),
    ("weight_decay", -1.0, "lie in"),
    ("norm_constraint", 0.0, r"\(0.0"),
    ("cov_ema_decay", 1.0, "lie in"),
    ("damping_adaptation_decay", 0.0, "lie in"),
    ("damping_adaptation_interval", 0, "positive integer"),
    ("damping_adaptation_interval", lambda k: 2, "positive integer"),
    ("mc_samples", 2.0, "positive integer"),
    ("factor_update_steps", True, "positive integer"),
    ("warmup_steps", -1, "non-negative integer"),
    ("burn_in_steps", 1.5, "non-negative integer"),
    ("l2_reg", math.inf, "finite"),
    ("patches_per_dim", 0.0, "lie in"),
    ("patches_per_dim", math.inf, "finite"),
    ("min_damping", -1e-3, "lie in"),
    ("max_damping", 1e-9, "lie in"),
    ("damping_rho_thresholds", (0.75, 0.25), "low < high"),
    ("damping_rho_thresholds", 0.5, "pair"),
    ("damping_rho_thresholds", (0.1, 0.2, 0.3), "pair"),
    ("momentum_bounds", (0.9, 0.1), "low < high"),
    ("momentum_bounds", 0.9, "pair"),
    ("momentum_bounds", (0.0, math.inf), "finite"),
    ("skip_modules", "0", "iterable of module names"),
    ("skip_modules", 3, "iterable of module names"),
    ("skip_modules", [0], "module names"),
    ("loss_fn", torch.nn.functional.cross_entropy, "loss module"),
    ("inverse_power", -2.0, "-1 or -0.5"),
    ("inverse_power", True, "-1 or -0.5"),
]
BOOLEANS = [f.name for f in dataclasses.fields(KFACOptions) if CHECKS[f.name].__name__ == "check_bool"]


@pytest.mark.parametrize(("name", "value", "message"), BAD)
def test_each_bad_value_raises_a_value_error_naming_the_option(name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=name) as err:
        KFACOptions(**{"lr": 0.1, name: value})
    assert err.match(message)


def test_every_boolean_option_is_listed() -> None:
    assert set(BOOLEANS) == {
        "enable_pi_correction",
        "center",
        "update_factors_manually",
        "adapt_damping",
        "include_damping_in_qmodel_change",
        "adaptive_learning_rate",
        "adaptive_momentum",
        "reject_steps",
        "low_rank_gradients",
    }


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("value", ["False", 0, 1, None])
def test_booleans_must_be_real_bools(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        KFACOptions(**{"lr": 0.1, name: value})


def test_kfac_reports_a_string_boolean_through_its_alias() -> None:
    with pytest.raises(ValueError, match="update_factors_manually must be True or False"):
        KFAC(make_mlp(), 0.1, update_cov_manually="False")
    with pytest.raises(ValueError, match="adapt_damping must be True or False"):
        KFAC(make_mlp(), 0.1, 1e-3, "False")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"damping_type": "exact"}, "damping_type='exact' needs inverse_method='eigh'"),
        ({"inverse_power": -0.5}, "inverse_power=-0.5 needs inverse_method='eigh'"),
        ({"fisher_type": "mc"}, "fisher_type='mc' needs loss_fn"),
        ({"reduction": "mean_positions"}, "reduction='mean_positions' needs loss_fn"),
        ({"reduction": "sum", "loss_fn": nn.CrossEntropyLoss()}, "does not match reduction='sum'"),
    ],
)
def test_combinations_that_do_not_fit_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreconditionerOptions(**options)


def test_diagonal_square_root_needs_no_eigendecomposition() -> None:
    assert PreconditionerOptions(approximation="diagonal", inverse_power=-0.5).inverse_power == -0.5


def test_lr_is_required_unless_adaptive() -> None:
    with pytest.raises(ValueError, match="lr"):
        KFACOptions()
    options = KFACOptions(adaptive_learning_rate=True, loss_fn=nn.CrossEntropyLoss())
    assert options.lr == 0.0
    # A learning rate the adaptive one would override is refused, not silently ignored.
    for lr in (0.1, lambda step: 0.1):
        with pytest.raises(ValueError, match=r"lr=.* would be ignored: with adaptive_learning_rate=True"):
            KFACOptions(adaptive_learning_rate=True, lr=lr, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="loss_fn is required"):
        KFACOptions(lr=0.1, qmodel_curvature="exact")


def test_momentum_bounds_need_the_adaptive_momentum() -> None:
    with pytest.raises(ValueError, match=r"momentum_bounds .* needs adaptive_momentum=True"):
        KFACOptions(lr=0.1, momentum_bounds=(0.0, 0.9))
    options = KFACOptions(adaptive_momentum=True, lr=0.1, loss_fn=nn.MSELoss(), momentum_bounds=[-0.5, 1])
    assert options.momentum_bounds == (-0.5, 1.0)


def test_weight_decay_none_means_zero() -> None:
    assert KFACOptions(lr=0.1).weight_decay == 0.0
    assert KFACOptions(lr=0.1, weight_decay=None).value_at("weight_decay", 3) == 0.0


# ---------------------------------------------------------------------------- schedules
def test_schedules_are_kept_and_checked_at_each_step() -> None:
    options = KFACOptions(lr=lambda k: 0.1 * k, momentum=lambda k: 0.5, factor_update_steps=lambda k: k + 1)
    assert options.value_at("lr", 3) == pytest.approx(0.3)
    assert options.value_at("momentum", 0) == 0.5
    assert options.value_at("factor_update_steps", 4) == 5
    with pytest.raises(ValueError, match="lr must be finite"):
        KFACOptions(lr=lambda k: math.inf).value_at("lr", 0)
    with pytest.raises(ValueError, match="factor_update_steps must be a positive integer"):
        PreconditionerOptions(factor_update_steps=lambda k: 0).value_at("factor_update_steps", 1)


def test_the_preconditioner_damping_is_not_a_schedule() -> None:
    with pytest.raises(ValueError, match="damping must be a number"):
        PreconditionerOptions(damping=lambda k: 1.0)  # type: ignore[arg-type]
    assert KFACOptions(lr=0.1, damping=lambda k: 0.5).initial_damping == 0.5


def test_derived_quantities() -> None:
    options = KFACOptions(
        lr=0.1, damping_adaptation_decay=0.9, damping_adaptation_interval=2, min_damping=1e-4, l2_reg=1e-3
    )
    assert options.omega == pytest.approx(0.81)
    assert options.damping_bounds == (pytest.approx(1.1e-3), math.inf)


# ------------------------------------------------------------------ KFAC's argument list
def test_original_positional_order_and_aliases() -> None:
    options = kfac_options((0.2, 1e-2, True, 0.9, 3), {"update_cov_manually": True, "center": True})
    assert (options.lr, options.damping, options.adapt_damping) == (0.2, 1e-2, True)
    assert (options.damping_adaptation_decay, options.damping_adaptation_interval) == (0.9, 3)
    assert options.update_factors_manually and options.center
    assert kfac_options((), {"learning_rate": 0.3}).lr == 0.3


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        kfac_options((0.1,), {"learning_rate": 0.1})
    with pytest.raises(TypeError, match="multiple values for argument 'damping'"):
        kfac_options((0.1, 1e-3), {"damping": 1e-2})
    with pytest.raises(TypeError, match="at most"):
        kfac_options(tuple(range(len(ORIGINAL_POSITIONAL) + 1)), {})
    with pytest.raises(TypeError, match="unexpected keyword"):
        kfac_options((0.1,), {"not_an_option": 1})
    with pytest.raises(TypeError, match="not both"):
        kfac_options((0.1,), {"update_cov_manually": True, "update_factors_manually": True})


def test_optimizer_and_preconditioner_read_their_options() -> None:
    opt = KFAC(make_mlp(), 0.1, momentum_type="adam", fisher_type="empirical")
    assert opt.options.momentum_type is MomentumType.ADAM
    assert opt.preconditioner.options is opt.options
    assert opt.momentum_type == "adam" and opt.preconditioner.fisher_type == "empirical"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = opt.nope
    with pytest.raises(TypeError, match="not both"):
        KFACPreconditioner(make_mlp(), options=PreconditionerOptions(), damping=1.0)
