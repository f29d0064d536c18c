"""Helpers shared by the benchmark scripts: timing and atomic JSON output."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """``(first-call seconds, median steady-state seconds)``; results are blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return first, float(np.median(ts))


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
