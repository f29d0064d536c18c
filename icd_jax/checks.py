"""Argument checks shared by the solver, cost and graph modules: a typed ``ConfigError``
that names the argument, instead of a NumPy error deep inside."""

from __future__ import annotations

import math
import numbers

from icd_jax.errors import ConfigError


def integer(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (either bound optional); bools are refused."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f" in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"{name} must be an integer"
                          f"{span if (lo, hi) != (None, None) else ''}, got {value!r}")
    return int(value)


def number(value, name: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a finite float in ``[lo, hi]``; bools are refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return float(value)
