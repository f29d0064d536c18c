"""The convolution engine's one cost model and its one calibration.

``CostModel`` predicts the seconds of one dense convolution program from its work:

- ``direct``: ``overhead + s_per_mac · multiply-adds`` (the shift-and-add kernel);
- ``fft``: ``overhead + s_per_flop · fft_flops_at(N, rows)`` (two forward and one
  inverse real FFT of ``N`` points per row, plus the product);
- ``copy``: ``s_per_copy · elements`` for the gathers that move values between the
  padded batch and a plan's layout.

Every planner (padded, bucketed, blocked) prices its candidates with the same model.
``calibrate()`` times the kernels on the running machine at the shapes the planners
use, fits the coefficients, and memoises the fit for the process; with ``cache_dir``
(or the ``VSLA_CACHE_DIR`` environment variable) it is also stored as JSON and read
back by later processes. Nothing is measured or read unless asked for: the engine
calibrates lazily on its first eager call with ``ConvPolicy(calibrate=True)``, and
never while ``jit`` traces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.conv import kernels
from vsla_jax.util import atomic_write_json, best_time


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Predicted seconds of one convolution program (see the module docstring)."""

    direct_overhead_s: float = 5e-5
    direct_s_per_mac: float = 1.0 / 12e9
    fft_overhead_s: float = 1e-4
    fft_s_per_flop: float = 1.0 / 8e9
    s_per_copy: float = 1.0 / 1e9
    source: str = "static"

    def direct(self, macs: float) -> float:
        return self.direct_overhead_s + self.direct_s_per_mac * macs

    def fft(self, n_fft: int, rows: int) -> float:
        return self.fft_overhead_s + self.fft_s_per_flop * kernels.fft_flops_at(n_fft, rows)

    def copy(self, elements: float) -> float:
        return self.s_per_copy * elements

    def predict(self, method: str, cap_a, cap_b, items: int) -> float:
        """Seconds of ``items`` padded convolutions at capacities ``cap_a``, ``cap_b``."""
        if method == "direct":
            return self.direct(kernels.direct_macs(cap_a, cap_b, items))
        if method == "fft":
            return self.fft(kernels.fft_size(cap_a, cap_b), items)
        raise ValueError(f"method must be 'direct' or 'fft', got {method!r}")

    def choose(self, cap_a, cap_b, items: int) -> str:
        """``"direct"`` or ``"fft"``, whichever is predicted faster."""
        d = self.predict("direct", cap_a, cap_b, items)
        f = self.predict("fft", cap_a, cap_b, items)
        return "fft" if f < d else "direct"

    def best(self, cap_a, cap_b, items: int) -> float:
        return min(self.predict(m, cap_a, cap_b, items) for m in ("direct", "fft"))


STATIC_COST_MODEL = CostModel()
COEFFICIENTS = ("direct_overhead_s", "direct_s_per_mac", "fft_overhead_s", "fft_s_per_flop",
                "s_per_copy")
#: Shapes timed by ``calibrate``: ``(rows, block, taps)`` for direct (valid shift-and-add
#: over ``block + taps - 1`` inputs), ``(rows, N)`` for FFT, elements for the copy.
CALIBRATION_SHAPES = {
    "direct": ((128, 256, 8), (128, 256, 32), (128, 256, 128), (64, 256, 256)),
    "fft": ((128, 64), (128, 256), (128, 512), (64, 1024)),
    "copy": (1 << 16, 1 << 19),  # values, in rows of 256
}
CALIBRATION_ROUNDS = 15


def machine_key() -> str:
    """Hash of the jax version, platform and device kind: the calibration's cache key."""
    dev = jax.devices()[0]
    key = f"{jax.__version__}|{dev.platform}|{getattr(dev, 'device_kind', '')}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike) -> str:
    """The calibration file of this machine in ``cache_dir``."""
    return os.path.join(os.fspath(cache_dir), f"conv_cost_{machine_key()}.json")


def read_cached_model(path: str) -> CostModel | None:
    """The ``CostModel`` stored at ``path``, or None when it is missing or corrupt."""
    try:
        with open(path) as f:
            d = json.load(f)
        return CostModel(**{k: float(d[k]) for k in COEFFICIENTS}, source=f"cache:{path}")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``t = c0 + c1 * work`` (relative error), both kept positive."""
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    w = 1.0 / y
    a = np.stack([np.ones_like(x), x], 1) * w[:, None]
    c0, c1 = np.linalg.lstsq(a, y * w, rcond=None)[0]
    return max(float(c0), 1e-7), max(float(c1), 1e-14)


def fit_model(points: dict[str, list[tuple[float, float]]], source: str) -> CostModel:
    """A ``CostModel`` fitted to timed ``(work, seconds)`` points per method.

    An FFT convolution runs more operations than a direct one, so a fitted FFT fixed
    cost below the direct one is measurement noise (it would send tiny convolutions to
    the FFT); it is raised to the direct one.
    """
    d0, d1 = fit_line(points["direct"])
    f0, f1 = fit_line(points["fft"])
    copy = max(min(t / n for n, t in points["copy"]), 1e-13)
    return CostModel(d0, d1, max(f0, d0), f1, copy, source=source)


def _direct_program(rows: int, block: int, taps: int):
    fn = lambda x, w: kernels.shift_add(x, w, (block,), 1, 1)
    return jax.jit(fn), (rows, block + taps - 1), (rows, taps), float(rows * block * taps)


def _fft_program(rows: int, n: int):
    fn = lambda x, w: jnp.fft.irfft(jnp.fft.rfft(x, n) * jnp.fft.rfft(w, n), n)
    return jax.jit(fn), (rows, n - n // 4), (rows, n // 4), kernels.fft_flops_at(n, rows)


def _copy_program(n: int):
    # rows of 256 values in a random row order: the plans move whole rows (bucketed
    # groups, blocked outputs) or sorted runs (blocked packing), not scattered values
    fn = lambda x, idx: jnp.take(x.reshape(-1, 256), idx, axis=0)
    return jax.jit(fn), float(n)


def measure(rounds: int = CALIBRATION_ROUNDS) -> dict[str, list[tuple[float, float]]]:
    """Time the engine's kernels at ``CALIBRATION_SHAPES``: ``{method: [(work, s)]}``.

    Rounds are interleaved and the best time per shape is kept, so the drift of a
    shared machine hits every shape alike instead of biasing one method.
    """
    rng = np.random.default_rng(0)
    calls = []
    for rows, block, taps in CALIBRATION_SHAPES["direct"]:
        fn, sx, sw, work = _direct_program(rows, block, taps)
        calls.append(("direct", work, fn, (jnp.asarray(rng.standard_normal(sx), jnp.float32),
                                           jnp.asarray(rng.standard_normal(sw), jnp.float32))))
    for rows, n in CALIBRATION_SHAPES["fft"]:
        fn, sx, sw, work = _fft_program(rows, n)
        calls.append(("fft", work, fn, (jnp.asarray(rng.standard_normal(sx), jnp.float32),
                                        jnp.asarray(rng.standard_normal(sw), jnp.float32))))
    for n in CALIBRATION_SHAPES["copy"]:
        fn, work = _copy_program(n)
        idx = jnp.asarray(rng.permutation(n // 256).astype(np.int32))
        calls.append(("copy", work, fn, (jnp.asarray(rng.standard_normal(n), jnp.float32), idx)))
    best = [math.inf] * len(calls)
    for _ in range(rounds):
        best = [min(b, best_time(fn, *args, repeats=1)) for b, (_, _, fn, args) in
                zip(best, calls)]
    points: dict[str, list] = {"direct": [], "fft": [], "copy": []}
    for (method, work, _, _), t in zip(calls, best):
        points[method].append((work, t))
    return points


#: Fits memoised in this process, by cache folder (None: memory only). A cache of
#: measurements, not a switch: every entry is what ``calibrate`` returns for its key.
_FITS: dict[str | None, CostModel] = {}


def _load_or_measure(cache_dir: str | None) -> CostModel:
    path = cache_path(cache_dir) if cache_dir else None
    if path:
        cached = read_cached_model(path)
        if cached is not None:
            return cached
    points = measure()
    model = fit_model(points, source=f"calibrated:{path or 'memory'}")
    if path:
        atomic_write_json(path, dataclasses.asdict(model) | {"points": points,
                                                             "jax": jax.__version__})
    return model


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """``cache_dir``, else ``$VSLA_CACHE_DIR``, else None (memoise in memory only)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("VSLA_CACHE_DIR") or None


def calibrate(cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> CostModel:
    """Fit the ``CostModel`` to this machine (about 1-2 s the first time in a process).

    Args:
      cache_dir: folder for a JSON copy that later processes read instead of measuring
        (default ``$VSLA_CACHE_DIR``; with neither, the fit lives in this process only).
      refresh: measure again even if a fit is memoised or cached.

    The file is read at most once per process. A missing or corrupt cache file is
    measured again and rewritten (atomically).
    """
    key = resolve_cache_dir(cache_dir)
    if refresh:
        _FITS.pop(key, None)
        if key and os.path.exists(cache_path(key)):
            os.unlink(cache_path(key))
    if key not in _FITS:
        _FITS[key] = _load_or_measure(key)
    return _FITS[key]


def forget_calibrations() -> None:
    """Drop the fits memoised in this process (the next ``calibrate`` reads or measures)."""
    _FITS.clear()


def calibrated_or_none(cache_dir: str | os.PathLike | None = None) -> CostModel | None:
    """The fit already memoised in this process for ``cache_dir``, else None.

    Never measures and never touches the disk: safe while ``jit`` traces.
    """
    return _FITS.get(resolve_cache_dir(cache_dir))
