"""A batch sharded over 8 forced host devices gives the single-device results."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    import vsla_jax as vs
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    items = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(0, 60, 13)]
    x = vs.stack(items)
    k = vs.tensor([0.5, -1.0, 2.0])
    xs = vs.shard_batch(x, pad=True)
    assert len(xs.data.sharding.device_set) == 8
    assert xs.batch_shape == (16,)
    f = jax.jit(lambda t: vs.add(vs.conv(t, k), t))
    out_sharded = f(xs)
    assert len(out_sharded.data.sharding.device_set) == 8
    out_single = f(x)
    got = out_sharded.to_list()[:13]
    for g, s in zip(got, out_single.to_list()):
        np.testing.assert_allclose(g, s, rtol=1e-6, atol=1e-6)
    for g, it in zip(got, items):
        ref = np.convolve(it, [0.5, -1.0, 2.0]) if len(it) else np.zeros(0)
        ref[: len(it)] += it
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vs.norm(xs)[:13], vs.norm(x), rtol=1e-6)
    try:
        vs.shard_batch(x)
    except vs.ShapeError as e:
        assert "does not split" in str(e)
    else:
        raise AssertionError("expected ShapeError")
    print("SHARDING_OK")
    """
)


def test_sharded_batch_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SHARDING_OK" in res.stdout
