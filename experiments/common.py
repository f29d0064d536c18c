"""Helpers shared by the benchmark scripts: timing and atomic JSON output."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np


def _once(fn: Callable[[], object]) -> float:
    """Seconds for one call of ``fn``, its result blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """``(first-call seconds, median steady-state seconds)``; results are blocked on."""
    first = _once(fn)
    return first, float(np.median([_once(fn) for _ in range(repeats)]))


def write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON to a temp file in the target folder, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True, default=float)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def timed_interleaved(fns: dict[str, Callable[[], object]],
                      repeats: int) -> dict[str, tuple[float, float]]:
    """``timed`` for several functions, measured in interleaved rounds.

    Every function is called once (first call, compile included), then ``repeats``
    rounds each call every function twice and time the second call, so slow drifts of
    a shared machine hit all of them alike while each timed call still finds its own
    library warm (thread pools awake, caches filled: switching between PyTorch and XLA
    costs the first call after a switch several times its steady time). Returns
    ``{label: (first-call seconds, median seconds)}``.
    """
    first = {label: _once(fn) for label, fn in fns.items()}
    samples = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            _once(fn)  # warm: this library's threads and caches, after the previous row
            samples[label].append(_once(fn))
    return {label: (first[label], float(np.median(samples[label]))) for label in fns}
