"""Validation of user-facing options: every bad value raises a ValueError naming the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """A string option, case-insensitive, that must be one of `choices`."""
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value.lower()


def check_number(
    name: str,
    value: object,
    *,
    low: float = 0.0,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """A real number in the interval [low, high] (ends open where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]  # 0-d tensors, numpy scalars
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    value = float(value)
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if math.isnan(value) or not (ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value}")
    return value


def check_interval(name: str, value: Any) -> Any:
    """A positive whole number of steps, or a schedule (callable of the step) returning one."""
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_count(name: str, value: Any) -> int:
    """A whole number of steps that may be zero (a warm-up, a burn-in)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def resolve(value: Any, step: int) -> Any:
    """A hyperparameter's value at `step`: called with the step if it is a schedule (a callable)."""
    return value(step) if callable(value) else value
