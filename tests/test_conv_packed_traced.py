"""``vs.conv_packed`` under ``jit`` and ``grad``: traced items are packed with ``jnp``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import vsla_jax as vs


@pytest.mark.parametrize("method", ["auto", "direct", "fft"])
def test_jitted_conv_packed_matches_numpy(method):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(n).astype(np.float32) for n in (7, 0, 1, 40)]
    ks = [rng.standard_normal(n).astype(np.float32) for n in (3, 2, 5, 1)]
    run = jax.jit(lambda xs, ks: vs.conv_packed(xs, ks, method=method).items())
    got = run([jnp.asarray(x) for x in xs], [jnp.asarray(k) for k in ks])
    for g, x, k in zip(got, xs, ks):
        want = np.convolve(x, k) if len(x) and len(k) else np.zeros(0)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)


def test_conv_packed_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    a, b = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal(3))

    def loss(a, b):
        out = vs.conv_packed([a, a[:2]], [b, b[1:]]).items()
        return sum((o * jnp.arange(1.0, o.shape[0] + 1)).sum() for o in out)

    check_grads(loss, (a, b), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
    want = jax.grad(lambda a, b: (jnp.convolve(a, b) * jnp.arange(1.0, 9)).sum()
                    + (jnp.convolve(a[:2], b[1:]) * jnp.arange(1.0, 4)).sum())(a, b)
    np.testing.assert_allclose(jax.grad(loss)(a, b), want, rtol=1e-5)
