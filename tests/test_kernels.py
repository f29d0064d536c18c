"""The C++ CPU kernels' loader: the extension builds, its handlers register and run
inside jit, and a missing build falls back with one clear warning."""

from __future__ import annotations

import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsla_jax
from vsla_jax import kernels
from vsla_jax.errors import KernelFallbackWarning


def twice(x):
    name = kernels.target("vsla_selftest_twice", x)
    assert name is not None
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


def test_the_extension_is_built_and_its_handler_runs_in_jit():
    assert kernels.library() is not None, "pip install -e . should build vsla_jax.cpu_kernels"
    x = np.arange(7, dtype=np.float32)
    np.testing.assert_array_equal(jax.jit(twice)(x), 2 * x)
    np.testing.assert_array_equal(jax.jit(twice)(jnp.zeros((0,), jnp.float32)), np.zeros(0))


def test_two_threads_share_one_compiled_kernel():
    f = jax.jit(twice)
    xs = [np.full(1000, i, np.float32) for i in range(8)]
    out = [None] * len(xs)

    def work(i):
        out[i] = np.asarray(f(xs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, o in enumerate(out):
        np.testing.assert_array_equal(o, 2 * xs[i])


def test_a_missing_build_falls_back_with_one_warning(monkeypatch):
    kernels.library.cache_clear()
    kernels.registered.cache_clear()
    monkeypatch.setitem(sys.modules, "vsla_jax.cpu_kernels", None)  # import fails
    monkeypatch.delattr(vsla_jax, "cpu_kernels", raising=False)
    try:
        with pytest.warns(KernelFallbackWarning, match="XLA path"):
            assert kernels.target("vsla_selftest_twice") is None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.target("vsla_selftest_twice") is None  # warned once only
    finally:
        kernels.library.cache_clear()
        kernels.registered.cache_clear()


def test_an_unknown_symbol_is_a_fallback_not_a_crash():
    with pytest.warns(KernelFallbackWarning, match="lack vsla_no_such_kernel"):
        assert kernels.target("vsla_no_such_kernel") is None
