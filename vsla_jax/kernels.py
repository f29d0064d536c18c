"""The C++ CPU kernels: the optional extension ``vsla_jax.cpu_kernels``, its XLA FFI
handlers and the fallback.

The extension (built from ``csrc/*.cc`` by ``pip install``, see setup.py) exports each
handler as a C symbol; ``target(name)`` registers it once with
``jax.ffi.register_ffi_target`` and returns its FFI target name, or None where the
kernels cannot run (no extension, or a non-CPU backend), after one
``KernelFallbackWarning`` that names why. Callers then take their XLA path.
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import jax
import jax.extend

from vsla_jax.errors import KernelFallbackWarning, VSLAError

#: The ABI version ``csrc/module.cc`` reports; a stale build is not used.
ABI_VERSION = 3


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded extension, or None (with one warning) if it is missing or stale."""
    try:
        from vsla_jax import cpu_kernels
    except ImportError as e:
        warnings.warn(f"vsla_jax C++ CPU kernels unavailable ({e}); using the XLA path. "
                      "Reinstall with a C++17 compiler (pip install -e .) to build them.",
                      KernelFallbackWarning, stacklevel=3)
        return None
    lib = ctypes.CDLL(cpu_kernels.__file__)
    version = lib.vsla_kernels_abi_version()
    if version != ABI_VERSION:
        warnings.warn(f"vsla_jax C++ CPU kernels are a stale build (ABI {version}, expected "
                      f"{ABI_VERSION}); using the XLA path. Rebuild: pip install -e .",
                      KernelFallbackWarning, stacklevel=3)
        return None
    return lib


@functools.cache
def registered(symbol: str) -> bool:
    """Register handler ``symbol`` of the extension as an FFI target of the same name
    (once); False if the extension or the symbol is missing."""
    lib = library()
    if lib is None:
        return False
    try:
        fn = getattr(lib, symbol)
    except AttributeError:
        warnings.warn(f"vsla_jax C++ CPU kernels lack {symbol} (a stale build); using the "
                      "XLA path. Rebuild: pip install -e .", KernelFallbackWarning,
                      stacklevel=3)
        return False
    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(fn), platform="cpu")
    return True


@functools.cache
def cpu_only() -> bool:
    """Whether every backend of this process is a CPU, so that every array is on one."""
    return all(name == "cpu" for name in jax.extend.backend.backends())


def on_cpu(*arrays) -> bool:
    """Whether ``arrays`` (or, for tracers and none, the default backend) live on CPU
    (the first concrete array decides; in a process with only CPU backends, always)."""
    if cpu_only():
        return True
    for a in arrays:
        if not isinstance(a, jax.core.Tracer):
            sharding = getattr(a, "sharding", None)
            if sharding is not None:
                return sharding_on_cpu(sharding)
    return jax.default_backend() == "cpu"


@functools.lru_cache(maxsize=256)
def sharding_on_cpu(sharding) -> bool:
    """Whether every device of ``sharding`` is a CPU (cached: checked on every call)."""
    return all(d.platform == "cpu" for d in sharding.device_set)


def target(symbol: str, *arrays) -> str | None:
    """The FFI target ``symbol`` when the kernels can run on ``arrays`` here, else None
    (the caller takes its XLA path)."""
    if not on_cpu(*arrays):
        return None
    return symbol if registered(symbol) else None


def required(symbol: str, who: str, fallback: str, *arrays) -> str:
    """``symbol``, registered as an FFI target, for a caller that must run it: a
    ``VSLAError`` naming ``who`` and its ``fallback`` where it cannot (no build of the
    extension or of ``symbol``; with ``arrays``, also when they are not on CPU, as
    ``target`` decides). The public entry points check ``target`` first and take their
    XLA path; this is the check of the primitives they bind."""
    ok = target(symbol, *arrays) is not None if arrays else registered(symbol)
    if not ok:
        where = "no build of vsla_jax.cpu_kernels" + (", or not on CPU" if arrays else "")
        raise VSLAError(f"{who}: the C++ kernel {symbol} cannot run here ({where}); "
                        f"{fallback}")
    return symbol
