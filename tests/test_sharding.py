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


KERNELS_SCRIPT = textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp, numpy as np
    import vsla_jax as vs
    from vsla_jax import kernels
    from vsla_jax.conv import cpu
    if kernels.target(cpu.FWD) is None:
        print("NO_KERNELS"); raise SystemExit(0)
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(1)

    def collectives(f, *args):
        hlo = jax.jit(f).lower(*args).compile().as_text()
        return set(re.findall(r"all-gather|all-reduce|all-to-all|collective-permute", hlo))

    # the conv kernels: forward and both correlations, per shard
    xs = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(0, 50, 16)]
    ks = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(0, 9, 16)]
    a, k = vs.stack(xs), vs.stack(ks)
    sa, sk = vs.shard_batch(a), vs.shard_batch(k)
    w = rng.standard_normal((16, a.capacity[0] + k.capacity[0] - 1)).astype(np.float32)
    def loss(da, db, la, lb):
        return jnp.sum(vs.conv(vs.VarTensor(da, la), vs.VarTensor(db, lb)).data * w)

    g = jax.jit(jax.grad(loss, (0, 1)))
    args = (sa.data, sk.data, sa.lengths, sk.lengths)
    for f, xs_ in ((lambda p, q: vs.conv(p, q).data, (sa, sk)), (g, args)):
        assert not collectives(f, *xs_), collectives(f, *xs_)
    hlo = g.lower(*args).compile().as_text()
    # the first result of each conv kernel call: its items per device
    first = r"f32\\[(\\d+),\\d+\\]\\{1,0\\}"
    calls = re.findall(first + r", [^\\n]*custom_call_target=\\"vsla_conv", hlo)
    calls += re.findall(r"= " + first + r" custom-call[^\\n]*vsla_conv", hlo)
    assert calls and set(calls) == {"2"}, calls  # 16 items over 8 devices
    out = vs.conv(sa, sk)
    assert out.data.sharding.spec[0] == "batch", out.data.sharding
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(vs.conv(a, k).data))
    for got, want in zip(g(*args), g(a.data, k.data, a.lengths, k.lengths)):
        assert got.sharding.spec[0] == "batch", got.sharding
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)

    # the attention kernels, forward and backward, per shard
    lens = rng.integers(1, 20, 8)
    qkv = [vs.stack([rng.standard_normal((int(n), 2, 8)).astype(np.float32) for n in lens],
                    rank=1) for _ in range(3)]
    sq = [vs.shard_batch(t) for t in qkv]
    def att(qd, kd, vd, ls):
        t = [vs.VarTensor(d, ls) for d in (qd, kd, vd)]
        return jnp.sum(vs.attention(*t).data ** 2)

    ga = jax.jit(jax.grad(att, (0, 1, 2)))
    sargs = (*(t.data for t in sq), sq[0].lengths)
    assert not collectives(lambda *t: vs.attention(*t).data, *sq)
    assert not collectives(ga, *sargs), collectives(ga, *sargs)
    hlo = ga.lower(*sargs).compile().as_text()
    assert "vsla_attention_fwd" in hlo and "vsla_attention_bwd" in hlo  # the kernels ran
    # their outputs o: the 8 sequences split over 8 devices, one per call
    fwd_calls = r"\\(f32\\[(\\d+),[^\\n]*custom_call_target=\\"vsla_attention_fwd"
    assert re.findall(fwd_calls, hlo) == ["1"], re.findall(fwd_calls, hlo)
    np.testing.assert_allclose(np.asarray(vs.attention(*sq).data),
                               np.asarray(vs.attention(*qkv).data), rtol=1e-6, atol=1e-6)
    for got, want in zip(ga(*sargs), ga(*(t.data for t in qkv), qkv[0].lengths)):
        assert got.sharding.spec[0] == "batch", got.sharding
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    print("KERNELS_SHARDED_OK")
    """
)


def test_kernels_run_per_shard_of_a_sharded_batch():
    """The C++ kernels on a batch split over 8 devices: each device runs its own items
    (custom calls over 2 items, no collective in the program), the results stay split,
    and they equal the single-device ones, forward and backward. Before the partitioning
    rule every device all-gathered the batch and ran it whole into a replicated result."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", KERNELS_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "KERNELS_SHARDED_OK" in res.stdout or "NO_KERNELS" in res.stdout
