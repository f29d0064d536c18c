"""The Pallas direct-convolution kernel in interpret mode against the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsla_jax as vs
from vsla_jax.conv.pallas import pallas_direct_conv


@pytest.mark.parametrize("tile", [8, 16])
def test_kernel_matches_numpy_including_edge_lengths(tile):
    rng = np.random.default_rng(0)
    # lengths 0, 1, tile - 1, tile, tile + 1 and capacity
    la = np.array([0, 1, tile - 1, tile, tile + 1, 40, 40])
    lb = np.array([3, 1, 2, 5, 16, 16, 0])
    a = np.zeros((7, 40), np.float32)
    b = np.zeros((7, 16), np.float32)
    for i in range(7):
        a[i, : la[i]] = rng.standard_normal(la[i])
        b[i, : lb[i]] = rng.standard_normal(lb[i])
    out = np.asarray(pallas_direct_conv(jnp.asarray(a), jnp.asarray(b), jnp.asarray(la),
                                        jnp.asarray(lb), tile=tile, interpret=True))
    assert out.shape == (7, 55)
    for i in range(7):
        ref = np.convolve(a[i, : la[i]], b[i, : lb[i]]) if la[i] and lb[i] else np.zeros(0)
        np.testing.assert_allclose(out[i, : len(ref)], ref, rtol=1e-5, atol=1e-5)
        assert np.all(out[i, len(ref) :] == 0)


@pytest.mark.parametrize("plan", ["padded", "bucketed"])
def test_dispatch_through_vs_conv_with_gradients(plan):
    rng = np.random.default_rng(1)
    x = vs.stack([rng.standard_normal((n, 2)).astype(np.float32) for n in [5, 0, 19]], rank=1)
    k = vs.stack([rng.standard_normal((n, 2)).astype(np.float32) for n in [3, 2, 1]], rank=1)
    off = vs.ConvPolicy(plan=plan, pallas="off", calibrate=False)
    interp = vs.ConvPolicy(plan=plan, pallas="interpret", calibrate=False)
    assert interp.pallas_mode(1) == "interpret" and off.pallas_mode(1) is None
    f = lambda pol: lambda dx: jnp.sum(jnp.sin(vs.conv(vs.VarTensor(dx, x.lengths), k,
                                                       "direct", pol).data))
    y_xla = np.asarray(vs.conv(x, k, "direct", off).data)
    g_xla = np.asarray(jax.grad(f(off))(x.data))
    y_pl = np.asarray(vs.conv(x, k, "direct", interp).data)
    g_pl = np.asarray(jax.grad(f(interp))(x.data))
    np.testing.assert_allclose(y_pl, y_xla, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_pl, g_xla, rtol=1e-5, atol=1e-5)
