"""The host allocator under XLA:CPU: keep large freed buffers for reuse (opt-in).

XLA:CPU takes every buffer from ``malloc``. With glibc's defaults, a buffer of 32 MiB or
more is a fresh ``mmap`` on every call and goes back to the OS when freed, and buffers
that XLA's worker threads allocate come from per-thread arenas whose 64 MiB heaps shrink
page by page when they free; so every call pays a page fault (~1 us on a VM) for each
page of such buffers that it touches. A ``jit(grad)`` step over large padded batches
touches hundreds of MiB (the saved output, the loss's cotangent, the gradients).
``retain_host_memory`` asks glibc to keep them: measured on ``bench_attention``'s corpus
batch, the step of ``vs.attention`` went from ~29 to ~17-18 ms (BENCHMARKS.md,
``experiments/profile_attention_step.py``).

It changes the whole process (PyTorch or NumPy in it included) and the process's
resident memory no longer shrinks when buffers are freed, so it is never applied
implicitly.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from vsla_jax.errors import VSLATypeError

# mallopt's options (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_C_INT_MAX = 2**31 - 1


def retain_host_memory(limit_bytes: int = 1 << 30) -> bool:
    """Make glibc ``malloc`` serve allocations up to ``limit_bytes`` from its heap, keep
    freed memory there (no trim), and use one arena for every thread that has not
    allocated yet. Call it once, early, before the first JAX computation (threads that
    already allocated keep their arenas).

    Args:
      limit_bytes: the largest allocation served from the heap, ``1 <= limit_bytes <=
        2**31 - 1`` (mallopt takes a C int); default 1 GiB.

    Returns:
      True when every setting took effect; False where the C library is not glibc (or
      refuses one), in which case nothing is guaranteed to have changed.
    """
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise VSLATypeError(f"retain_host_memory: limit_bytes must be an int, got "
                            f"{type(limit_bytes).__name__}")
    if not 1 <= limit_bytes <= _C_INT_MAX:
        raise ValueError(f"retain_host_memory: limit_bytes must lie in [1, {_C_INT_MAX}] "
                         f"(a C int), got {limit_bytes}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, limit_bytes), (_M_TRIM_THRESHOLD, _C_INT_MAX),
                (_M_ARENA_MAX, 1))
    return all([mallopt(option, value) == 1 for option, value in settings])
