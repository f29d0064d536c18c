"""Measurement: latency statistics, paired tests, energy (NVML) and the L2 hit rate.

Latency is wall-clock around calls whose results are blocked on
(``jax.block_until_ready``), warmup calls excluded, arms interleaved (A B A B ...) so
drift of a shared machine hits every arm alike. Energy comes from NVML power samples
taken in a background thread (trapezoid rule over the timed window); the hardware L2 hit
rate from Nsight Compute (``ncu``). Where neither exists the value is ``None`` with the
reason; the cache *simulation* (``icd_jax.runtime.cachesim``) is always labelled as such.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from scipy import stats

from icd_jax.errors import ConfigError

NCU_METRIC = "lts__t_sector_hit_rate.pct"


def summarize(samples_s: Sequence[float], tokens: int) -> dict:
    """Mean, p50, p95 and the t-based CI95 of the mean (ms), the raw samples (ms) and
    tokens/s (tokens over the mean time) of per-call seconds ``samples_s``.

    The interval's lower end is clamped at 0: a mean time cannot be negative, and the
    intersection of a confidence interval with the values the mean can take keeps its
    coverage (a few heavy-tailed samples otherwise gave bounds like ``[-0.38, 6.50]``).
    NaN bounds for one sample."""
    s = np.asarray(samples_s, np.float64) * 1e3
    if s.size == 0:
        raise ConfigError("summarize: no samples")
    mean = float(s.mean())
    half = (float(stats.t.ppf(0.975, s.size - 1) * s.std(ddof=1) / np.sqrt(s.size))
            if s.size > 1 else float("nan"))
    lo = mean - half if np.isnan(half) else max(mean - half, 0.0)
    return dict(mean_ms=mean, p50_ms=float(np.percentile(s, 50)),
                p95_ms=float(np.percentile(s, 95)), ci95_ms=[lo, mean + half],
                samples_ms=s.tolist(), n=int(s.size), tokens=int(tokens),
                tokens_per_s=float(tokens / (mean / 1e3)) if mean > 0 else None)


def once(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn``, its result blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int,
                progress: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """Per-call seconds of each function over ``repeats`` interleaved rounds.

    Each function first runs ``warmup`` untimed calls (compilation included). Every round
    calls each function twice and times the second call, so each timed call finds its own
    caches warm whatever ran before it (``progress(round, repeats)`` after each round).
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for fn in fns.values():
        for _ in range(max(warmup, 1)):
            once(fn)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            once(fn)
            out[k].append(once(fn))
        if progress is not None:
            progress(r + 1, repeats)
    return out


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired comparison of interleaved samples ``a`` and ``b`` (same rounds):
    mean of ``b - a`` with its t CI95, the paired t-test and Wilcoxon signed-rank
    p-values (``None`` where the test is undefined)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"paired: samples must be 1-D of one length, got {a.shape}, "
                          f"{b.shape}")
    d = b - a
    n = d.size
    mean = float(d.mean()) if n else float("nan")
    half = (float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)) if n > 1
            else float("nan"))
    p_t = p_w = None
    if n > 1 and np.any(d != d[0]):
        p_t = float(stats.ttest_rel(b, a).pvalue)
    if n > 1 and np.any(d != 0):
        p_w = float(stats.wilcoxon(d).pvalue)
    return dict(mean_diff=mean, ci95=[mean - half, mean + half], p_value=p_w,
                p_value_t=p_t, test="Wilcoxon signed-rank (p_value), paired t (p_value_t)",
                n=int(n), rel_diff_pct=100.0 * mean / float(a.mean()) if n and a.mean() else
                None)


def mcnemar(a: Sequence[float], b: Sequence[float]) -> dict | None:
    """Exact McNemar test of two paired 0/x outcome vectors (``> 0`` = success): the
    discordant counts and the two-sided binomial p-value; None unless both are binary."""
    ra, rb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if ra.shape != rb.shape or np.union1d(np.unique(ra), np.unique(rb)).size > 2:
        return None
    a, b = ra > 0, rb > 0
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = float(stats.binomtest(only_a, n, 0.5).pvalue) if n else 1.0
    return dict(only_a=only_a, only_b=only_b, p_value=p, test="exact McNemar")


def change_pct(new: float | None, base: float | None) -> float | None:
    """``100 (new - base) / base``, or None if either is missing."""
    if new is None or base in (None, 0):
        return None
    return 100.0 * (new - base) / base


# -- energy ---------------------------------------------------------------------------------
def nvml_status() -> tuple[bool, str | None]:
    """``(available, reason if not)`` for NVML power readings."""
    try:
        import pynvml
    except ImportError:
        return False, "pynvml is not installed (the gpu extra); no NVIDIA power readings"
    try:
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
    except Exception as e:  # noqa: BLE001 - NVMLError_* on hosts without a driver
        return False, f"NVML unavailable on this host ({type(e).__name__}: {e})"
    if n < 1:
        return False, "NVML found no NVIDIA GPU"
    return True, None


class PowerSampler:
    """Samples NVML board power (W) of GPU ``index`` every ``interval_s`` in a thread.

    ``with PowerSampler() as p: ...`` then ``p.energy_j()``: the trapezoid integral of
    the samples over the window.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.01):
        import pynvml

        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.interval_s = interval_s
        self.t: list[float] = []
        self.w: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.t.append(time.perf_counter())
            self.w.append(self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3)  # mW -> W
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def energy_j(self) -> float | None:
        return trapezoid_j(self.t, self.w)


def trapezoid_j(t: Sequence[float], watts: Sequence[float]) -> float | None:
    """Energy (J) of power samples ``watts`` at times ``t`` (s), trapezoid rule; None
    with fewer than two samples (no interval to integrate over)."""
    t, w = np.asarray(t, np.float64), np.asarray(watts, np.float64)
    if t.size < 2:
        return None
    return float(np.sum((w[1:] + w[:-1]) * np.diff(t)) / 2.0)


def arm_energy(t: Sequence[float], watts: Sequence[float], tokens: int,
               min_samples: int) -> tuple[float | None, str | None]:
    """``(J/token, None)`` of one arm's power samples, or ``(None, reason)`` when fewer
    than ``min_samples`` (at least 2) were taken: a window that short has no energy to
    report, and 0 J would read as a -100% change."""
    need = max(int(min_samples), 2)
    if len(t) < need:
        return None, (f"{len(t)} NVML power samples, fewer than measure.nvml_min_samples="
                      f"{need}; lengthen the timed window or shorten nvml_interval_s")
    e = trapezoid_j(t, watts)
    return (None, "no energy integrated") if e is None else (e / max(tokens, 1), None)


def energy_per_token(fns: Mapping[str, Callable[[], object]], tokens: int, calls: int,
                     interval_s: float = 0.01, min_samples: int = 10
                     ) -> tuple[dict | None, str | None]:
    """``({arm: J/token}, reason)`` from NVML over ``calls`` calls per arm, or
    ``(None, reason)`` where NVML is unavailable. An arm with fewer than ``min_samples``
    power samples gets ``None`` and its reason is in the returned reason (``None`` when
    every arm was measured); if no arm was, the result is ``(None, reason)``."""
    ok, reason = nvml_status()
    if not ok:
        return None, reason
    out, why = {}, []
    for k, fn in fns.items():
        with PowerSampler(interval_s=interval_s) as p:
            for _ in range(calls):
                jax.block_until_ready(fn())
        out[k], r = arm_energy(p.t, p.w, tokens * calls, min_samples)
        if r is not None:
            why.append(f"{k}: {r}")
    reason = "; ".join(why) or None
    if all(v is None for v in out.values()):
        return None, reason
    return out, reason


# -- hardware L2 ----------------------------------------------------------------------------
def ncu_status() -> tuple[bool, str | None]:
    """``(available, reason if not)`` for Nsight Compute L2 readings."""
    if shutil.which("ncu") is None:
        return False, ("Nsight Compute (ncu) is not on PATH; the hardware L2 hit rate "
                       f"({NCU_METRIC}) needs an NVIDIA GPU and ncu")
    if not any(d.platform == "gpu" for d in jax.devices()):
        return False, f"ncu is on PATH but JAX runs on {jax.default_backend()}, not a GPU"
    return True, None


def parse_ncu_csv(text: str, metric: str = NCU_METRIC) -> float | None:
    """The mean of ``metric`` over kernels in ``ncu --csv --metrics`` output."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    vals = []
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if row.get("Metric Name") == metric:
            try:
                vals.append(float(str(row.get("Metric Value", "")).replace(",", "")))
            except ValueError:
                continue
    return float(np.mean(vals)) if vals else None


def ncu_command(command: Sequence[str]) -> list[str]:
    """The ncu command line around ``command``: profiling starts *off*, so only the
    kernels between the probe's ``cudaProfilerStart`` and ``cudaProfilerStop`` (the timed
    calls, not compilation or calibration) are profiled."""
    return ["ncu", "--profile-from-start", "off", "--csv", "--metrics", NCU_METRIC,
            *command]


def ncu_l2_hit(command: Sequence[str], timeout_s: float = 600.0) -> tuple[float | None,
                                                                          str | None]:
    """Run ``command`` (``python -m icd_jax.runtime.probe RUN ARM``, which starts the
    profiler around its timed calls) under ncu and return ``(mean L2 sector hit %, None)``
    or ``(None, reason)``."""
    ok, reason = ncu_status()
    if not ok:
        return None, reason
    try:
        res = subprocess.run(ncu_command(command), capture_output=True, text=True,
                             timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"ncu failed: {e}"
    val = parse_ncu_csv(res.stdout)
    if val is None:
        tail = (res.stderr or "").strip().splitlines()[-1:]
        return None, (f"ncu reported no {NCU_METRIC} (exit {res.returncode})"
                      + (f": {tail[0]}" if tail else ""))
    return val, None
