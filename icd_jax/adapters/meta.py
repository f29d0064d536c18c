"""The ``meta`` record every adapter returns, and the no-op fallback on failure.

Every ``apply_*`` adapter returns ``(out, meta)`` with ``meta`` a plain JSON-ready dict:

- ``transform`` (str) and ``settings`` (dict): what ran, with which arguments;
- ``ok`` (bool): ``False`` when the transform failed and ``out`` is the input unchanged;
- ``delta_layout`` (dict ``{"repermute": bool, "reason": str}``): whether a
  re-permutation should follow, and why;
- ``error`` (dict of float): the measured reconstruction error (``rel_fro`` = relative
  Frobenius error, plus transform-specific figures);
- ``expected_quality`` (str): the expected effect on model quality;
- ``warning`` (str or None): why a failed transform fell back.

Input validation (wrong rank, unknown setting) raises a typed error before anything
runs; a failure inside the transform itself warns ``AdapterWarning`` and returns the
input unchanged (``strict=True`` re-raises instead).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from icd_jax.errors import AdapterWarning

KEYS = ("transform", "settings", "ok", "delta_layout", "error", "expected_quality",
        "warning")


def make(transform: str, settings: dict, *, repermute: bool, reason: str,
         error: dict | None = None, expected_quality: str = "", ok: bool = True,
         warning: str | None = None, **extra: Any) -> dict:
    """A ``meta`` dict with every key of ``KEYS`` (plus ``extra``), JSON-ready."""
    meta = dict(transform=transform, settings=jsonable(settings), ok=bool(ok),
                delta_layout=dict(repermute=bool(repermute), reason=str(reason)),
                error={k: float(v) for k, v in (error or {}).items()},
                expected_quality=str(expected_quality), warning=warning)
    meta.update(jsonable(extra))
    return meta


def jsonable(x):
    """NumPy scalars and arrays inside mappings/lists as plain Python values; NaN and
    infinities become None (strict JSON has no such numbers)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray)):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def guarded(transform: str, settings: dict, fallback, body: Callable[[], tuple],
            strict: bool = False):
    """Run ``body() -> (out, meta)``; if it raises, warn ``AdapterWarning`` and return
    ``(fallback, meta)`` with ``ok=False`` (``strict=True`` re-raises)."""
    try:
        return body()
    except Exception as e:  # noqa: BLE001 - the fallback is the contract
        if strict:
            raise
        msg = f"{transform} failed ({type(e).__name__}: {e}); input returned unchanged"
        warnings.warn(msg, AdapterWarning, stacklevel=3)
        return fallback, make(transform, settings, repermute=False,
                              reason="transform failed; layout unchanged", ok=False,
                              warning=msg)


def rel_error(ref, approx) -> float:
    """``||ref - approx||_F / ||ref||_F`` in float64 (0 when ``ref`` is all zeros)."""
    ref = np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(ref - np.asarray(approx, np.float64))
    return float(num / den) if den > 0 else float(num)
