"""Run one arm of a run once, in its own process: what Nsight Compute profiles.

    python -m icd_jax.runtime.probe RUN_DIR ARM [CALLS [WARMUP]]

rebuilds the run's model from ``config.lock.json``, the arm's layout from its
``perm_*.json`` (``identity`` and ``dense`` need none), runs the timed item set
``WARMUP`` times unprofiled (default 2: compilation and warm caches), then ``CALLS``
times (default 1) between ``cudaProfilerStart`` and ``cudaProfilerStop``.
``measure.ncu_l2_hit`` wraps this command with ``ncu --profile-from-start off --metrics
lts__t_sector_hit_rate.pct``, so only those timed calls' kernels are profiled. Without
libcudart the profiler calls are no-ops and the reason goes to stderr.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from collections.abc import Callable

import jax

from icd_jax.errors import ConfigError
from icd_jax.runtime import targets
from icd_jax.runtime.rundir import RunDir

PERM_FILES = {"before": "perm_before", "after": "perm_after"}
CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


def arm_of(run_dir: str, arm: str):
    """``(target, Arm)`` of ``arm`` in the run at ``run_dir``."""
    rd = RunDir(run_dir)
    cfg = rd.config()
    t = targets.make(cfg)
    if arm == "dense":
        return t, t.dense_arm()
    if arm == "identity":
        return t, t.arm("identity", t.identity(), cfg.transform)
    if arm not in PERM_FILES:
        raise ConfigError(f"unknown arm {arm!r}; choose dense, identity, before, after")
    perms, _ = rd.perms(PERM_FILES[arm])
    return t, t.arm(arm, dict(t.identity(), **perms), cfg.transform)


def cudart_candidates() -> list[str]:
    """Names and paths libcudart may be loaded from: the sonames (found if JAX's CUDA
    plugin already loaded it), the system library path and the nvidia-cuda-runtime
    wheel."""
    out = list(CUDART_NAMES)
    found = ctypes.util.find_library("cudart")
    if found:
        out.append(found)
    try:
        import nvidia.cuda_runtime as rt  # the wheel JAX's CUDA plugin depends on
        for d in rt.__path__:
            out += sorted(glob.glob(os.path.join(d, "lib", "libcudart.so*")))
    except ImportError:
        pass
    return out


def load_cudart() -> tuple[ctypes.CDLL | None, str | None]:
    """``(libcudart, None)`` or ``(None, reason)``."""
    for name in cudart_candidates():
        try:
            return ctypes.CDLL(name), None
        except OSError:
            continue
    return None, ("libcudart not found (no CUDA runtime in this process); the CUDA "
                  "profiler was not started, so ncu --profile-from-start off sees no kernel")


def cuda_profiler(call: str) -> str | None:
    """Call libcudart's ``call`` (``cudaProfilerStart`` / ``cudaProfilerStop``): None
    when it succeeded, else the reason it was a no-op."""
    lib, reason = load_cudart()
    if lib is None:
        return reason
    rc = getattr(lib, call)()
    return None if rc == 0 else f"{call} returned CUDA error {rc}"


def profiler_start() -> str | None:
    """Start the CUDA profiler (``None``, or why not)."""
    return cuda_profiler("cudaProfilerStart")


def profiler_stop() -> str | None:
    """Stop the CUDA profiler (``None``, or why not)."""
    return cuda_profiler("cudaProfilerStop")


def run_profiled(fn: Callable[[], object], calls: int, warmup: int) -> str | None:
    """``warmup`` unprofiled calls of ``fn`` (compilation included), then ``calls``
    calls between ``profiler_start`` and ``profiler_stop``, each blocked on so that no
    kernel runs outside the window. Returns why the profiler was not started, if so."""
    if calls < 1 or warmup < 0:
        raise ConfigError(f"probe: CALLS must be >= 1 and WARMUP >= 0, got {calls}, "
                          f"{warmup}")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    reason = profiler_start()
    try:
        for _ in range(calls):
            jax.block_until_ready(fn())
    finally:
        stopped = profiler_stop()
    return reason or stopped


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4, 5) or not all(a.isdigit() for a in argv[3:]):
        print(__doc__, file=sys.stderr)
        return 2
    given = argv[3:]
    calls, warmup = (int(a) for a in [*given, *("1", "2")[len(given):]])
    t, a = arm_of(argv[1], argv[2])
    reason = run_profiled(t.call(a), calls, warmup)
    if reason is not None:
        print(f"probe: profiler not started: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
