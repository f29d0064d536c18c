"""Variable-length attention: every backend against a NumPy reference and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import vsla_jax as vs
from vsla_jax.attention import BACKENDS

TILE = 8
EDGE_LENGTHS = [0, 1, TILE - 1, TILE, TILE + 1, 21]  # 21 = capacity of the batch below


def np_attention(q, k, v, causal, scale):
    """Loop reference: q [n, H, D], k/v [m, Hkv, D]."""
    n, h, d = q.shape
    m, hk, _ = k.shape
    out = np.zeros((n, h, d))
    if m == 0:
        return out
    kk, vv = np.repeat(k, h // hk, axis=1), np.repeat(v, h // hk, axis=1)
    for hh in range(h):
        for i in range(n):
            s = np.array([q[i, hh] @ kk[j, hh] * scale for j in range(m)])
            allowed = np.array([(j <= i) if causal else True for j in range(m)])
            if not allowed.any():
                continue
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, hh] = p @ vv[:, hh]
    return out


def make(lengths_q, lengths_k, h=4, hk=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda lens, heads: vs.from_padded(*_pad(
        [rng.standard_normal((n, heads, d)).astype(np.float32) for n in lens]), rank=1)
    return mk(lengths_q, h), mk(lengths_k, hk), mk(lengths_k, hk)


def _pad(items):
    cap = max(max(len(x) for x in items), 1)
    data = np.zeros((len(items), cap) + items[0].shape[1:], np.float32)
    for i, x in enumerate(items):
        data[i, : len(x)] = x
    return data, np.array([[len(x)] for x in items])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_backends_match_numpy_on_edge_lengths(backend, causal):
    q, k, v = make(EDGE_LENGTHS, EDGE_LENGTHS[::-1][:3] + EDGE_LENGTHS[:3])
    out = vs.attention(q, k, v, causal=causal, backend=backend,
                       tile=TILE if backend == "tiled" else None)  # pallas: interpret on CPU
    assert out.capacity == q.capacity and out.features == q.features
    mask = np.asarray(q.mask())
    assert np.all(np.asarray(out.data)[~mask] == 0)  # zero slack
    scale = 1 / np.sqrt(8)
    for o, qi, ki, vi in zip(out.to_list(), q.to_list(), k.to_list(), v.to_list()):
        np.testing.assert_allclose(o, np_attention(qi, ki, vi, causal, scale), atol=2e-5)


@pytest.mark.parametrize("h,hk", [(4, 4), (4, 1), (6, 2)])
def test_gqa_and_random_ragged(h, hk):
    rng = np.random.default_rng(h * 10 + hk)
    lens = rng.integers(0, 30, 5).tolist()
    q, k, v = make(lens, lens, h=h, hk=hk, seed=1)
    ref = vs.attention(q, k, v, backend="xla")
    for b in ("bucketed", "tiled", "pallas"):
        got = vs.attention(q, k, v, backend=b)
        np.testing.assert_allclose(np.asarray(got.data), np.asarray(ref.data), atol=2e-5)


@pytest.mark.parametrize("backend", ["tiled", "pallas", "bucketed"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_xla_and_finite_differences(causal, backend):
    q, k, v = make([5, 0, 12], [7, 3, 12], h=2, hk=1, d=4, seed=2)

    def loss(backend):
        def f(qd, kd, vd):
            o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                             vs.VarTensor(vd, v.lengths), causal=causal, backend=backend,
                             tile=4 if backend == "tiled" else 16)
            return jnp.sum(jnp.sin(o.data))
        return f

    args = (q.data, k.data, v.data)
    gx = jax.grad(loss("xla"), argnums=(0, 1, 2))(*args)
    gt = jax.grad(loss(backend), argnums=(0, 1, 2))(*args)
    for a, b in zip(gx, gt):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for g, x in zip(gt, (q, k, v)):  # gradient slack is zero
        assert np.all(np.asarray(g)[~np.asarray(x.mask())] == 0)
    with jax.enable_x64(True):
        a64 = tuple(jnp.asarray(np.asarray(a), jnp.float64) for a in args)
        if backend != "pallas":  # the Pallas forward computes in float32 by design
            check_grads(loss(backend), a64, order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_tiled_under_jit_with_traced_lengths():
    q, k, v = make([3, 9], [9, 4], seed=3)
    f = jax.jit(lambda q, k, v: vs.attention(q, k, v, backend="tiled", tile=4).data)
    np.testing.assert_allclose(np.asarray(f(q, k, v)),
                               np.asarray(vs.attention(q, k, v, backend="xla").data), atol=2e-5)


def test_tiling_strategy():
    ts = vs.TilingStrategy()
    lengths = np.array([32, 64, 128, 256, 512])
    t = ts.compute_optimal_tile_size(lengths, available_memory=1 << 22)
    assert t in ts.candidates
    # a tiny memory budget forces the smallest tile that fits
    assert ts.compute_optimal_tile_size(lengths, available_memory=1) == ts.candidates[0]
    # lengths of 17 waste less with 16-wide tiles than with 256-wide ones
    assert ts.compute_optimal_tile_size([17] * 8, 1 << 30) <= 32
    tiles = ts.split_into_tiles([0, 5, 16, 17], 16)
    assert tiles == [(1, 0, 5), (2, 0, 16), (3, 0, 16), (3, 16, 1)]


def test_bad_input():
    q, k, v = make([3], [3])
    with pytest.raises(vs.ShapeError, match="multiple"):
        vs.attention(q, *make([3], [3], h=4, hk=3)[1:])
    with pytest.raises(ValueError, match="backend"):
        vs.attention(q, k, v, backend="flash9")
    with pytest.raises(vs.ShapeError, match="features"):
        vs.attention(vs.stack([np.ones(3)]), k, v)
    with pytest.raises(vs.LengthError, match="differ"):
        vs.attention(q, k, vs.VarTensor(v.data, v.lengths - 1))


def test_approximate_mode_is_exact_at_full_resolution_and_on_constant_tiles():
    q, k, v = make([5, 20, 13], [9, 20, 0], seed=4)
    exact = np.asarray(vs.attention(q, k, v, backend="xla").data)
    full, st = vs.approximate_attention(q, k, v, config=vs.ApproxConfig(r_min=1.0))
    np.testing.assert_allclose(np.asarray(full.data), exact, atol=2e-6)
    assert st["kept_fraction"] == pytest.approx(1.0)
    # keys and values constant inside each 4-wide tile: subsampling with multiplicities
    # loses nothing, yet most keys are dropped
    rng = np.random.default_rng(5)
    lens = [16, 11, 4]
    kd = np.zeros((3, 16, 2, 8), np.float32)
    vd = np.zeros((3, 16, 2, 8), np.float32)
    for b, n in enumerate(lens):
        for t0 in range(0, n, 4):
            kd[b, t0 : min(t0 + 4, n)] = rng.standard_normal((2, 8))
            vd[b, t0 : min(t0 + 4, n)] = rng.standard_normal((2, 8))
    lengths = np.array(lens)[:, None]
    kk, vv = vs.from_padded(kd, lengths), vs.from_padded(vd, lengths)
    qq = vs.from_padded(rng.standard_normal((3, 16, 4, 8)).astype(np.float32), lengths)
    cfg = vs.ApproxConfig(tile=4, r_min=0.25)
    approx, st = vs.approximate_attention(qq, kk, vv, config=cfg)
    exact = vs.attention(qq, kk, vv, backend="xla")
    np.testing.assert_allclose(np.asarray(approx.data), np.asarray(exact.data), atol=2e-5)
    assert st["kept_fraction"] < 0.5


def test_approximate_mode_error_is_reported_not_hidden():
    q, k, v = make([40, 33], [40, 33], seed=6)
    approx, st = vs.approximate_attention(q, k, v, config=vs.ApproxConfig(r_min=0.25,
                                                                         spread_ref=10.0))
    exact = np.asarray(vs.attention(q, k, v, backend="xla").data)
    err = np.abs(np.asarray(approx.data) - exact).max()
    assert st["kept_fraction"] < 1.0 and err > 0  # random keys: lossy, and it shows
    with pytest.raises(ValueError):
        vs.ApproxConfig(r_min=0)


def test_tiled_second_order_gradients_raise_a_clear_error_and_first_order_still_works():
    """The tiled backend's loops have length-dependent trip counts, which JAX cannot
    reverse: grad of grad must say so (VSLAError naming the backends that can), not
    surface JAX's while_loop error; grad and jax.hessian (forward over reverse) work."""
    from vsla_jax.errors import VSLAError

    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 5, 1, 2)).astype(np.float32))
    lens = jnp.array([[3], [5]], jnp.int32)

    def f(backend):
        return lambda qd: jnp.sum(vs.attention(vs.VarTensor(qd, lens), vs.VarTensor(q, lens),
                                               vs.VarTensor(q, lens), backend=backend).data ** 2)

    with pytest.raises(VSLAError, match="backend='xla' or 'bucketed'"):
        jax.grad(lambda x: jnp.sum(jnp.sin(jax.grad(f("tiled"))(x))))(q)
    np.testing.assert_allclose(np.asarray(jax.grad(f("tiled"))(q)),
                               np.asarray(jax.grad(f("xla"))(q)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.hessian(f("tiled"))(q)),
                               np.asarray(jax.hessian(f("xla"))(q)), rtol=1e-4, atol=1e-5)
