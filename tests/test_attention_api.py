"""The attention front door: AttentionConfig reaching every backend knob, typed errors for
bad tiles, configs and backends, and batches stacked with every axis variable."""

import jax
import numpy as np
import pytest

import vsla_jax as vs
from vsla_jax.attention import (
    BACKENDS,
    AttentionConfig,
    BucketPlan,
    TilingStrategy,
    UnknownBackendError,
    backends_for,
)
from vsla_jax.attention import bucketed as ba


def _make(lengths, h=4, hk=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    items = lambda heads: [rng.standard_normal((n, heads, d)).astype(np.float32)
                           for n in lengths]
    return (vs.stack(items(h), rank=1), vs.stack(items(hk), rank=1),
            vs.stack(items(hk), rank=1))


def _close(a, b, atol=2e-5):
    np.testing.assert_allclose(np.asarray(a.data), np.asarray(b.data), atol=atol)


# -- AttentionConfig -------------------------------------------------------------------
def test_config_reaches_the_bucketed_plan():
    q, k, v = _make([0, 1, 15, 17, 33, 40, 7, 2], seed=1)
    ref = vs.attention(q, k, v, causal=True, backend="xla")
    # a tiny score budget forces query chunks; no merging keeps several groups
    cfg = AttentionConfig(bucket=BucketPlan(block_bytes=1, group_overhead_flops=0.0,
                                            fuse_after=0))
    _close(vs.attention(q, k, v, causal=True, backend="bucketed", config=cfg), ref)
    backend = backends_for(cfg)["bucketed"]
    assert backend.plan is cfg.bucket
    groups = backend.prepare(q, k, v)["groups"]
    assert len(groups) > 1 and any(g.qc < g.cq for g in groups)
    assert len(backend.seen) == 0  # fuse_after=0 never counts signatures
    assert backends_for(cfg) is backends_for(AttentionConfig(bucket=cfg.bucket))


def test_config_fuse_after_is_state_of_the_backend_object():
    top = 45  # a batch capacity of its own: signatures unseen by other tests
    q, k, v = _make([3, 20, top, 9, 30], seed=2)
    ref = vs.attention(q, k, v, backend="xla")
    cfg = AttentionConfig(bucket=BucketPlan(group_overhead_flops=0.0, fuse_after=2))
    backend = backends_for(cfg)["bucketed"]
    backend.seen.clear()
    before = ba._fused._cache_size()
    _close(vs.attention(q, k, v, config=cfg, backend="bucketed"), ref)
    assert ba._fused._cache_size() == before  # first run: one program per group
    _close(vs.attention(q, k, v, config=cfg, backend="bucketed"), ref)
    assert ba._fused._cache_size() == before + 1  # second run of the signature: fused
    assert len(backend.seen) == 1
    # a fresh backend object starts counting from zero
    fresh = vs.attention(q, k, v, backend=ba.BucketedBackend(cfg.bucket))
    _close(fresh, ref)


def test_config_reaches_the_tiling_strategy_and_the_pallas_interpreter():
    q, k, v = _make([5, 0, 12, 30], seed=3)
    ref = vs.attention(q, k, v, backend="xla")
    cfg = AttentionConfig(tiling=TilingStrategy(candidates=(8,)), pallas_interpret=True)
    assert backends_for(cfg)["tiled"].prepare(q, k, v) == dict(tq=8, tk=8)
    assert backends_for(cfg)["pallas"].interpret is True
    _close(vs.attention(q, k, v, backend="tiled", config=cfg), ref)
    _close(vs.attention(q, k, v, backend="pallas", config=cfg), ref)
    # an explicit tile wins over the strategy
    _close(vs.attention(q, k, v, backend="tiled", tile=(4, 16), config=cfg), ref)


def test_bad_configs_raise_typed_errors():
    q, k, v = _make([3, 4])
    with pytest.raises(vs.VSLATypeError, match="config"):
        vs.attention(q, k, v, config=BucketPlan())
    with pytest.raises(vs.VSLATypeError, match="bucket"):
        AttentionConfig(bucket=TilingStrategy())
    with pytest.raises(vs.VSLATypeError, match="pallas_interpret"):
        AttentionConfig(pallas_interpret="yes")
    with pytest.raises(ValueError, match="fuse_after"):
        BucketPlan(fuse_after=-1)


# -- tiles and backends ----------------------------------------------------------------
@pytest.mark.parametrize("tile,error", [
    (0, vs.ShapeError), (-4, vs.ShapeError), ((8, 0), vs.ShapeError), ((8,), vs.ShapeError),
    (2.5, vs.VSLATypeError), ("8", vs.VSLATypeError), (True, vs.VSLATypeError),
    ((8, None), vs.VSLATypeError)])
@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_bad_tiles_name_the_tile(tile, error, backend):
    q, k, v = _make([3, 4])
    with pytest.raises(error, match="tile") as info:
        vs.attention(q, k, v, backend=backend, tile=tile)
    assert repr(tile) in str(info.value)
    assert isinstance(info.value, vs.VSLAError)


def test_good_tiles_are_accepted_as_ints_pairs_and_numpy_ints():
    q, k, v = _make([9, 4, 17])
    ref = vs.attention(q, k, v, backend="xla")
    for tile in (1, 4, np.int64(8), (4, 8), [16, 4]):
        _close(vs.attention(q, k, v, backend="tiled", tile=tile), ref)


def test_unknown_backend_lists_every_valid_name():
    q, k, v = _make([3])
    with pytest.raises(UnknownBackendError) as info:
        vs.attention(q, k, v, backend="flash9")
    for name in ("auto",) + BACKENDS:
        assert repr(name) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, vs.VSLAError)
    with pytest.raises(vs.VSLATypeError, match="backend"):
        vs.attention(q, k, v, backend=3)


# -- batches stacked with every axis variable ------------------------------------------
@pytest.mark.parametrize("h,d", [(3, 5), (8, 64), (2, 16)])
def test_items_stacked_with_every_axis_variable(h, d):
    rng = np.random.default_rng(h + d)
    lens = [5, 0, 19, 12]
    mk = lambda: [rng.standard_normal((n, h, d)).astype(np.float32) for n in lens]
    qi, ki, vi = mk(), mk(), mk()
    q3, k3, v3 = vs.stack(qi), vs.stack(ki), vs.stack(vi)
    assert q3.rank == 3 and q3.capacity[1:] >= (h, d)
    q1, k1, v1 = (vs.stack(x, rank=1) for x in (qi, ki, vi))
    for backend in ("xla", "bucketed", "tiled"):
        got = vs.attention(q3, k3, v3, causal=True, backend=backend)
        ref = vs.attention(q1, k1, v1, causal=True, backend=backend)
        assert got.rank == 1 and got.features == (h, d)
        np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(q1.lengths))
        _close(got, ref, atol=1e-6)
    # mixed: rank-3 queries with rank-1 keys and values
    _close(vs.attention(q3, k1, v1), vs.attention(q1, k1, v1), atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "xla", "bucketed", "tiled"])
def test_items_stacked_with_heads_variable_and_head_size_as_a_feature(backend):
    """``vs.stack(items, rank=2)`` of ``[n, H, D]`` items: the head axis is variable and
    D a feature axis. Every backend gives the rank-1 batch's answer."""
    rng = np.random.default_rng(7)
    lens, h, d = [4, 9, 0, 6], 3, 8
    mk = lambda: [rng.standard_normal((n, h, d)).astype(np.float32) for n in lens]
    items = mk(), mk(), mk()
    q2, k2, v2 = (vs.stack(x, rank=2) for x in items)
    assert q2.rank == 2 and q2.features == (d,) and q2.capacity[1] >= h
    got = vs.attention(q2, k2, v2, backend=backend)
    ref = vs.attention(*(vs.stack(x, rank=1) for x in items), backend="xla")
    assert got.rank == 1 and got.features == (h, d)
    _close(got, ref, atol=1e-6)


def test_zero_kv_heads_is_a_shape_error_not_a_crash():
    q, _, _ = _make([3, 2])
    k = vs.VarTensor(np.zeros((2, 3, 0, 8), np.float32), np.array([[3], [2]]))
    with pytest.raises(vs.ShapeError, match="multiple of 0 K/V heads"):
        vs.attention(q, k, k)


def test_ragged_trailing_axes_say_how_to_stack():
    rng = np.random.default_rng(0)
    items = [rng.standard_normal((4, 2, 8)), rng.standard_normal((6, 3, 8))]
    q = vs.stack(items)
    k = vs.stack([rng.standard_normal((4, 2, 8)), rng.standard_normal((6, 2, 8))])
    with pytest.raises(vs.ShapeError, match=r"ragged.*vs\.stack\(items, rank=1\)"):
        vs.attention(q, k, k)


def test_traced_lengths_with_every_axis_variable_say_how_to_stack():
    rng = np.random.default_rng(0)
    q = vs.stack([rng.standard_normal((n, 2, 8)).astype(np.float32) for n in (3, 5)])
    f = jax.jit(lambda q: vs.attention(q, q, q).data)
    with pytest.raises(vs.ShapeError, match=r"traced.*vs\.stack\(items, rank=1\)"):
        f(q)


def test_other_shapes_still_point_at_rank_one_stacking():
    q, k, v = _make([3])
    with pytest.raises(vs.ShapeError, match=r"vs\.stack\(items, rank=1\)"):
        vs.attention(vs.stack([np.ones(3)]), k, v)
    with pytest.raises(vs.ShapeError, match="features"):
        vs.attention(vs.stack([np.ones((3, 4))], rank=1), k, v)


# -- planner ---------------------------------------------------------------------------
def test_buckets_above_the_batch_capacity_are_clipped_before_merging():
    lq = np.array([388, 454])
    # 388 -> bucket 448, 454 -> bucket 480, clipped to the capacity 454: merging them
    # costs 454^2 - 448^2 more per item, under one group's overhead
    plan = BucketPlan(group_overhead_flops=2.5e7)
    groups = ba.plan_groups(lq, lq, 454, 454, heads=8, head_dim=64, plan=plan)
    assert len(groups) == 1 and groups[0].cq == 454
    # with an unclipped capacity the 480 bucket stays its own group
    groups = ba.plan_groups(lq, lq, 480, 480, heads=8, head_dim=64, plan=plan)
    assert [g.cq for g in groups] == [448, 480]


def test_stacked_k_v_compare_sequence_lengths_only():
    # stacked k and v with different head sizes have different [B, 3] lengths rows; only
    # column 0 (the sequence) must agree, and a differing sequence is a LengthError
    rng = np.random.default_rng(1)
    n = [3, 5]
    q = vs.stack([rng.standard_normal((m, 2, 4)) for m in n])
    k = vs.stack([rng.standard_normal((m, 2, 4)) for m in n])
    v = vs.stack([rng.standard_normal((m, 2, 6)) for m in n])
    got = vs.attention(q, k, v)
    ref = vs.attention(*(vs.stack([np.asarray(x.data[i, :m, :2, :d]) for i, m in
                                   enumerate(n)], rank=1) for x, d in ((q, 4), (k, 4), (v, 6))),
                       backend="xla")
    _close(got, ref, atol=1e-6)
    v_short = vs.stack([rng.standard_normal((m, 2, 6)) for m in [3, 4]])
    for _ in range(2):  # the shape checks are cached; the length check runs every call
        with pytest.raises(vs.LengthError, match="k and v lengths differ"):
            vs.attention(q, k, v_short)


@pytest.mark.parametrize("backend", ["bucketed", "tiled"])
def test_forward_mode_on_reverse_only_backends_runs_xla_also_inside_jit(backend):
    """jvp, jit(jvp), jacfwd and hessian of a call on a custom-VJP backend equal the
    `xla` backend's (they raised TypeError inside jit: JAX defers its refusal there)."""
    import jax.numpy as jnp
    close = lambda a, b, atol: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                          atol=atol, rtol=1e-4)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((5, 2, 4)).astype(np.float32)
    k = rng.standard_normal((7, 2, 4)).astype(np.float32)

    def f(q, be):
        t = lambda x: vs.tensor(x, rank=1)
        return jnp.sum(jnp.sin(vs.attention(t(q), t(k), t(k), backend=be).to_padded(5)))

    t = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    for wrap in (lambda g: g, jax.jit):
        got = wrap(lambda q: jax.jvp(lambda x: f(x, backend), (q,), (t,)))(q)
        want = jax.jvp(lambda x: f(x, "xla"), (q,), (t,))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
        close(wrap(jax.jacfwd(lambda x: f(x, backend)))(q), jax.grad(lambda x: f(x, "xla"))(q),
               atol=1e-4)
    close(jax.hessian(lambda x: f(x, backend))(q[:2]), jax.hessian(lambda x: f(x, "xla"))(q[:2]),
           atol=1e-3)
    # reverse mode still runs the backend's own backward
    close(jax.jit(jax.grad(lambda x: f(x, backend)))(q), jax.grad(lambda x: f(x, "xla"))(q),
           atol=1e-4)
