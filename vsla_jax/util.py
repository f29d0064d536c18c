"""Small helpers shared by vsla_jax modules (not part of the public API).

Every module that needs one of these imports it from here; no module imports another
module's private names.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

from vsla_jax.errors import ShapeError, VSLAError, VSLATypeError

#: Host buffers handed to XLA:CPU are aligned to this many bytes, so that XLA reads
#: them in place instead of copying them.
HOST_ALIGN = 64


# -- tracing ----------------------------------------------------------------------------
def is_traced(x) -> bool:
    """True for a JAX tracer (inside ``jit``, ``grad`` or ``vmap``)."""
    return isinstance(x, jax.core.Tracer)


# -- array conversion -------------------------------------------------------------------
def check_numeric(arr, what: str) -> None:
    """Raise ``VSLATypeError`` unless ``arr`` has a numeric or bool dtype (bfloat16, a
    NumPy extension dtype that ``np.number`` misses, included)."""
    dt = np.dtype(arr.dtype)
    if not (np.issubdtype(dt, np.number) or np.issubdtype(dt, np.bool_)
            or dt == jnp.bfloat16):
        raise VSLATypeError(f"{what} must be numeric (bool, integer, float16, bfloat16, "
                            f"float32, float64 or complex), got dtype {dt}")


def numeric_dtype(dtype, who: str) -> np.dtype:
    """``dtype`` as a NumPy dtype if it is numeric or bool (``check_numeric``'s set), else
    ``VSLATypeError`` naming ``who``."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise VSLATypeError(f"{who}: dtype {dtype!r} is not a NumPy/JAX dtype") from None
    check_numeric(np.zeros(0, dt), f"{who}: dtype")
    return dt


def as_array(values, what: str) -> np.ndarray | jax.Array:
    """``values`` as a numeric NumPy or JAX array (JAX arrays and tracers pass through).

    Raises ``ShapeError`` for ragged nested lists and ``VSLATypeError`` for
    non-numeric data, naming ``what``.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        return values  # fast path: already a numeric NumPy array
    if isinstance(values, (jax.Array, jax.core.Tracer)):
        arr = values
    else:
        try:
            arr = np.asarray(values)
        except ValueError as e:  # ragged nested lists
            raise ShapeError(f"{what} is ragged: {e}") from None
        if arr.dtype == object:
            raise ShapeError(f"{what} is ragged or holds non-numeric objects")
    check_numeric(arr, what)
    return arr


def as_arrays(values: Sequence, what: str) -> list:
    """``as_array`` over a sequence, skipping the call for numeric NumPy arrays."""
    return [v if type(v) is np.ndarray and v.dtype.kind in "biuf" else as_array(v, f"{what} {i}")
            for i, v in enumerate(values)]


def default_float(arr):
    """Integer and bool arrays cast to the default float dtype; others unchanged."""
    dt = np.dtype(arr.dtype)
    if np.issubdtype(dt, np.integer) or dt == np.bool_:
        return arr.astype(jnp.result_type(float))
    return arr


def aligned_empty(n: int, dtype) -> np.ndarray:
    """An uninitialised 1-D NumPy array of ``n`` elements, ``HOST_ALIGN``-byte aligned.

    Hand it to a jitted function and do not write to it afterwards: XLA:CPU may read it
    in place.
    """
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + HOST_ALIGN, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGN
    return raw[start : start + n * dtype.itemsize].view(dtype)


def aligned_zeros(shape: Sequence[int], dtype) -> np.ndarray:
    """A zeroed C-contiguous NumPy array of ``shape``, ``HOST_ALIGN``-byte aligned.

    ``jax.device_put`` on CPU adopts such an array without copying it, so do not write
    to it after handing it over.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(n + HOST_ALIGN, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGN
    return raw[start : start + n].view(dtype).reshape(tuple(shape))


# JAX's refusals to push tangents forward through a custom_vjp function or an FFI call.
_FORWARD_MODE_REFUSALS = ("forward-mode autodiff (jvp) to a custom_vjp",
                          "cannot be differentiated",
                          "Differentiation rule for 'custom_lin'")


def forward_mode(*arrays) -> bool:
    """Whether any of ``arrays`` carries a forward-mode tangent (``jax.jvp``, ``jacfwd``,
    ``hessian``'s outer ``jacfwd``, also inside ``jit``): a JVP tracer at any level of
    its tracer chain. Reverse mode (``grad``, ``vjp``) traces with linearize tracers and
    is not forward mode. A function jitted before forward mode is applied to it
    (``jax.jvp(jax.jit(f))``) is traced without tangents: False there."""
    for x in arrays:
        while isinstance(x, jax.core.Tracer):
            if isinstance(x, ad.JVPTracer):
                return True
            x = getattr(x, "primal", getattr(x, "val", None))
    return False


def call_or_none(fn: Callable[..., Any], *args, **kwargs) -> Any | None:
    """``fn(*args, **kwargs)``, or None when JAX refuses to trace it under forward-mode
    AD (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``, ``jvp`` of ``grad``).

    For the ``custom_vjp`` paths (the C++ kernels, the bucketed, tiled and Pallas
    attention), which are differentiable in reverse mode only: JAX raises while tracing
    the call, before anything runs, and callers then take a pure-XLA path that every
    transformation goes through. Any other error propagates.
    """
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError, NotImplementedError) as e:
        if isinstance(e, VSLAError) or not any(m in str(e) for m in _FORWARD_MODE_REFUSALS):
            raise
        return None


# -- shapes -----------------------------------------------------------------------------
def cdiv(a, b):
    """Ceiling division (ints or integer arrays)."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def pad_axis(x: jax.Array, multiple: int, axis: int = 0, value=0) -> jax.Array:
    """Zero-pad (or ``value``-pad) ``axis`` of ``x`` up to a multiple of ``multiple``."""
    extra = (-x.shape[axis]) % multiple
    if not extra:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads, constant_values=value)


def pad_axis_to(x: jax.Array, size: int, axis: int = 0, value=0) -> jax.Array:
    """Pad ``axis`` of ``x`` with ``value`` up to ``size`` (no-op when already there)."""
    extra = size - x.shape[axis]
    if extra <= 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads, constant_values=value)


def neg_inf(dtype) -> jax.Array:
    """A large negative score for masked keys that stays finite after adding a real one."""
    return jnp.asarray(-0.7 * float(jnp.finfo(dtype).max), dtype)


# -- host utilities ---------------------------------------------------------------------
def best_time(fn: Callable, *args, repeats: int = 5) -> float:
    """Best wall time in seconds of ``fn(*args)`` over ``repeats`` calls after one warm call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def current_umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsynced, with
    the mode ``open()`` would give, then renamed over ``path``. The one atomic writer of
    the project (the runtime's artefacts and the StableHLO bridge use it too)."""
    atomic_write_files({path: data})


def atomic_write_files(files: dict) -> None:
    """Write several files as one set: every ``{path: bytes}`` is first staged as a
    fsynced temp file beside its target, and only when all are staged are they renamed
    into place, in the dict's order (put the file that commits the set last). A failure
    while staging (disk full, a folder that cannot be written) removes the temps and
    leaves every target as it was; only a crash during the renames themselves can leave
    a mixed set."""
    staged = []  # (temp, target); each temp gets the mode open() would give
    try:
        for path, data in files.items():
            path = os.fspath(path)
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                       suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:  # a failed rename leaves no temps behind either
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (``atomic_write_bytes``)."""
    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())


# -- appended for vsla_jax.attention ----------------------------------------------------
def prev_pow2(n: int) -> int:
    """Largest power of two ``<= n`` (1 for ``n <= 1``)."""
    return 1 << (max(int(n), 1).bit_length() - 1)


def float0_zeros(x) -> np.ndarray:
    """The cotangent of an integer argument of a ``custom_vjp`` (``float0`` zeros)."""
    return np.zeros(np.shape(x), jax.dtypes.float0)


def host_or_none(x) -> np.ndarray | None:
    """A host (NumPy) copy of a concrete array, or None when ``x`` is traced."""
    return None if is_traced(x) else np.asarray(x)


def underscored_flags(argv: Sequence[str]) -> list[str]:
    """``--dry-run=1`` -> ``--dry_run=1`` (absl flag names use underscores), for the
    command lines of the project; values and positional arguments are left alone."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out
