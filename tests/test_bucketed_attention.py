"""Bucketed attention: host planning (ladder, merge DP, step shapes) and execution paths
that the default settings do not reach on small shapes (query chunks, several items per
step, several steps), against the dense ``xla`` reference and a brute-force planner."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import vsla_jax as vs
from vsla_jax.attention import BucketedBackend, choose_backend
from vsla_jax.attention.bucketed import (
    ATTENTION_POLICY,
    BucketPlan,
    merge_buckets,
    plan_groups,
    step_shape,
    switch_caps,
)


@given(st.integers(16, 100_000))
def test_octave_ladder_ratio_and_powers_of_two(n):
    c = ATTENTION_POLICY.bucket(n)
    assert n <= c <= 1.25 * n
    p2 = 1 << (n.bit_length() - 1)
    assert ATTENTION_POLICY.bucket(p2) == p2  # every power of two >= 16 is a rung


def test_octave_ladder_values_and_bad_settings():
    assert ATTENTION_POLICY.ladder(130) == [16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112,
                                            128, 160]
    assert ATTENTION_POLICY.bucket(0) == 16
    with pytest.raises(ValueError, match="steps_per_octave"):
        vs.CapacityPolicy(minimum=24, alignment=1, steps_per_octave=4)
    with pytest.raises(ValueError, match="steps_per_octave"):
        vs.CapacityPolicy(minimum=2, alignment=1, steps_per_octave=4)


def _brute_force(caps, counts, cost, overhead):
    """Cheapest partition of the sorted buckets into contiguous runs, by enumeration."""
    m = len(caps)
    best = np.inf
    for cuts in itertools.product([0, 1], repeat=m - 1):
        runs, start = [], 0
        for i, c in enumerate(cuts):
            if c:
                runs.append((start, i))
                start = i + 1
        runs.append((start, m - 1))
        total = sum(overhead + counts[a:b + 1].sum() * cost(caps[b]) for a, b in runs)
        best = min(best, total)
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=7),
       st.floats(0.0, 5e4), st.integers(0, 1000))
def test_merge_buckets_is_optimal(counts, overhead, seed):
    rng = np.random.default_rng(seed)
    caps = np.sort(rng.choice(np.arange(16, 400), len(counts), replace=False))
    counts = np.asarray(counts)
    cost = lambda c: float(c) ** 2
    runs = merge_buckets(caps, counts, cost, overhead)
    assert runs[0][0] == 0 and runs[-1][1] == len(caps) - 1  # contiguous cover
    assert all(b + 1 == c for (_, b), (c, _) in zip(runs, runs[1:]))
    got = sum(overhead + counts[a:b + 1].sum() * cost(caps[b]) for a, b in runs)
    assert got == pytest.approx(_brute_force(caps, counts, cost, overhead))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=40), st.integers(0, 2 ** 20),
       st.floats(0, 1e9))
def test_plan_groups_covers_every_item_once(lengths, block, overhead):
    lq = np.asarray(lengths)
    lk = np.maximum(lq[::-1] - 3, 0)
    cap = max(int(lq.max()), int(lk.max()), 1)
    plan = BucketPlan(block_bytes=max(block, 1), group_overhead_flops=overhead)
    groups = plan_groups(lq, lk, cap, cap, heads=4, head_dim=8, plan=plan)
    seen = np.concatenate([g.idx[g.idx < len(lq)] for g in groups])
    assert sorted(seen.tolist()) == list(range(len(lq)))
    for g in groups:
        members = g.idx[g.idx < len(lq)]
        assert np.all(g.idx[len(members):] == len(lq))  # padding only at the end
        assert lq[members].max() <= g.cq <= cap and lk[members].max() <= g.ck <= cap
        assert len(g.idx) % g.ips == 0 and g.steps * g.ips >= len(members)
        assert (g.steps - 1) * g.ips < len(members)
        assert 1 <= g.qc <= g.cq


def test_step_shape_respects_the_budget():
    assert step_shape(64, 64, 8, 8 << 20) == (64, 64)  # whole items, many per step
    ips, qc = step_shape(512, 512, 8, 2 << 20)
    assert ips == 1 and qc == 128 and 4 * 8 * qc * 512 <= 2 << 20
    assert step_shape(512, 512, 8, 1) == (1, 16)  # never below 16 query rows


def _make(lengths_q, lengths_k, h=4, hk=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    cap_q, cap_k = max(max(lengths_q), 1), max(max(lengths_k), 1)

    def mk(lens, heads, cap):
        data = np.zeros((len(lens), cap, heads, d), np.float32)
        for i, n in enumerate(lens):
            data[i, :n] = rng.standard_normal((n, heads, d))
        return vs.from_padded(data, np.asarray(lens)[:, None], rank=1)

    return mk(lengths_q, h, cap_q), mk(lengths_k, hk, cap_k), mk(lengths_k, hk, cap_k)


# a tiny block budget forces query chunks; a small overhead keeps several groups; a
# large one merges everything; a middle one packs several items per step
PLANS = [BucketPlan(block_bytes=1, group_overhead_flops=0.0),
         BucketPlan(block_bytes=4 * 4 * 16 * 40, group_overhead_flops=1e12),
         BucketPlan(block_bytes=1 << 16, group_overhead_flops=1e4)]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_and_multi_step_paths_match_xla(plan, causal):
    lq = [0, 1, 15, 16, 17, 33, 40, 7, 40, 2]
    lk = [3, 1, 15, 0, 17, 40, 33, 7, 40, 9]
    q, k, v = _make(lq, lk, seed=1)
    backend = BucketedBackend(plan)
    groups = backend.prepare(q, k, v)["groups"]
    assert any(g.qc < g.cq for g in groups) or any(g.steps > 1 for g in groups) or (
        any(g.ips > 1 for g in groups))
    got = backend.compute(q, k, v, causal, 0.3, backend.prepare(q, k, v))
    ref = vs.attention(q, k, v, causal=causal, scale=0.3, backend="xla")
    np.testing.assert_allclose(np.asarray(got.data), np.asarray(ref.data), atol=2e-5)
    assert np.all(np.asarray(got.data)[~np.asarray(q.mask())] == 0)

    def loss(fn):
        def f(qd, kd, vd):
            o = fn(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                   vs.VarTensor(vd, v.lengths))
            return jnp.sum(jnp.cos(o.data))
        return f

    ours = lambda a, b, c: backend.compute(a, b, c, causal, 0.3, backend.prepare(a, b, c))
    dense = lambda a, b, c: vs.attention(a, b, c, causal=causal, scale=0.3, backend="xla")
    args = (q.data, k.data, v.data)
    for g1, g2 in zip(jax.grad(loss(ours), (0, 1, 2))(*args),
                      jax.grad(loss(dense), (0, 1, 2))(*args)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_bucketed_under_jit_with_closed_over_and_traced_lengths(causal):
    lq, lk = [3, 9, 0, 40, 17, 1], [9, 4, 5, 40, 33, 0]
    q, k, v = _make(lq, lk, h=6, hk=2, seed=3)
    ref = vs.attention(q, k, v, causal=causal, backend="xla")
    closed = jax.jit(lambda qd, kd, vd: vs.attention(
        vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths), vs.VarTensor(vd, v.lengths),
        causal=causal, backend="bucketed").data)
    np.testing.assert_allclose(np.asarray(closed(q.data, k.data, v.data)),
                               np.asarray(ref.data), atol=2e-5)
    # traced lengths: the per-item switch over static bucket capacities
    traced = jax.jit(lambda q, k, v: vs.attention(q, k, v, causal=causal,
                                                  backend="bucketed").data)
    got = np.asarray(traced(q, k, v))
    np.testing.assert_allclose(got, np.asarray(ref.data), atol=2e-5)
    assert np.all(got[~np.asarray(q.mask())] == 0)

    def loss(backend):
        def f(q, k, v):
            return jnp.sum(jnp.sin(vs.attention(q, k, v, causal=causal, backend=backend).data))
        return jax.jit(jax.grad(lambda qd, kd, vd: f(vs.VarTensor(qd, q.lengths),
                                                     vs.VarTensor(kd, k.lengths),
                                                     vs.VarTensor(vd, v.lengths)),
                                argnums=(0, 1, 2)))

    def traced_loss(qd, kd, vd, lengths_q, lengths_k):
        o = vs.attention(vs.VarTensor(qd, lengths_q), vs.VarTensor(kd, lengths_k),
                         vs.VarTensor(vd, lengths_k), causal=causal, backend="bucketed")
        return jnp.sum(jnp.sin(o.data))

    g_traced = jax.jit(jax.grad(traced_loss, argnums=(0, 1, 2)))(
        q.data, k.data, v.data, q.lengths, k.lengths)
    for a, b in zip(g_traced, loss("xla")(q.data, k.data, v.data)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_switch_caps():
    assert switch_caps(40, 40) == (16, 24, 32, 40)
    assert switch_caps(64, 20) == (16, 24, 32, 48, 64)
    assert switch_caps(0, 0) == (1,)


def test_traced_float64_matches_finite_differences():
    with jax.enable_x64(True):
        q, k, v = _make([5, 0, 12], [7, 3, 12], h=2, hk=1, d=4, seed=2)
        args = tuple(x.data.astype(jnp.float64) for x in (q, k, v))
        # lengths are jit arguments, so they are traced: the per-item switch path
        g = jax.jit(lambda qd, kd, vd, lq, lk: jnp.sum(jnp.sin(vs.attention(
            vs.VarTensor(qd, lq), vs.VarTensor(kd, lk), vs.VarTensor(vd, lk), causal=True,
            backend="bucketed").data)))
        h = lambda qd, kd, vd: g(qd, kd, vd, q.lengths, k.lengths)
        check_grads(h, args, order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_auto_picks_the_cpu_kernels_on_cpu():
    q, k, _ = _make([3, 9], [9, 4])
    want = {"gpu": "pallas", "cpu": "cpu"}.get(jax.default_backend(), "bucketed")
    assert choose_backend(q, k) == want


def test_float64_inputs_compute_in_float64():
    with jax.enable_x64(True):
        q, k, v = _make([5, 12, 0], [7, 12, 2], seed=4)
        q, k, v = (vs.VarTensor(x.data.astype(jnp.float64), x.lengths) for x in (q, k, v))
        got = vs.attention(q, k, v, backend="bucketed")
        ref = vs.attention(q, k, v, backend="xla")
        assert got.data.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got.data), np.asarray(ref.data), atol=1e-12)


@pytest.mark.parametrize("fuse_after", [0, 1, 2])
def test_fused_program_matches_per_group_programs(fuse_after):
    from vsla_jax.attention import bucketed as ba

    top = 41 + fuse_after  # a batch capacity of its own: no signature seen by other tests
    q, k, v = _make([0, 1, 15, 16, 17, 33, 40, 7, top, 2], [3, 1, 15, 0, 17, 40, 33, 7, top, 9],
                    seed=7)
    backend = BucketedBackend(BucketPlan(block_bytes=1 << 16, group_overhead_flops=1e4,
                                         fuse_after=fuse_after))
    ref = np.asarray(vs.attention(q, k, v, causal=True, backend="xla").data)
    before = ba._fused._cache_size()
    outs = [np.asarray(backend.compute(q, k, v, True, 1 / np.sqrt(8),
                                       backend.prepare(q, k, v)).data) for _ in range(3)]
    for o in outs:
        np.testing.assert_allclose(o, ref, atol=2e-5)
    np.testing.assert_array_equal(outs[0], outs[-1])
    assert len(backend.prepare(q, k, v)["groups"]) > 1
    assert (ba._fused._cache_size() > before) == (fuse_after > 0)


def test_causal_chunks_skip_keys_above_the_diagonal():
    from vsla_jax.attention.bucketed import causal_chunk

    assert causal_chunk(512, 512) == 256 and causal_chunk(64, 64) == 64
    assert causal_chunk(256, 131) == 66  # ceil(131 / 2) rows: two chunks, the last short
    assert causal_chunk(32, 512) == 32  # never wider than the block budget allows
    q, k, v = _make([131, 0, 77, 200], [131, 5, 77, 200], h=2, hk=1, d=4, seed=8)
    ref = vs.attention(q, k, v, causal=True, backend="xla")
    got = vs.attention(q, k, v, causal=True, backend="bucketed")
    np.testing.assert_allclose(np.asarray(got.data), np.asarray(ref.data), atol=2e-5)
    traced = jax.jit(lambda q, k, v: vs.attention(q, k, v, causal=True,
                                                  backend="bucketed").data)
    np.testing.assert_allclose(np.asarray(traced(q, k, v)), np.asarray(ref.data), atol=2e-5)

    def grads(backend):
        f = lambda qd, kd, vd: jnp.sum(jnp.cos(vs.attention(
            vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
            vs.VarTensor(vd, v.lengths), causal=True, backend=backend).data))
        return jax.grad(f, (0, 1, 2))(q.data, k.data, v.data)

    for a, b in zip(grads("bucketed"), grads("xla")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_second_order_gradients_match_xla_with_empty_and_partial_items(causal, traced):
    """grad of grad differentiates the custom VJP's backward itself: rows past lq (lse =
    neg_inf) and items without keys must not turn 0 * inf into NaN there. Eager lengths
    take the planned groups, traced ones the switched program; both against ``xla``."""
    rng = np.random.default_rng(7)
    b, c, h, d = 4, 9, 2, 3
    q, k, v = (rng.standard_normal((b, c, h, d)).astype(np.float32) for _ in range(3))
    lengths = jnp.array([[5], [0], [9], [1]], jnp.int32)

    def second(backend):
        def f(qd, kd, lens):
            o = vs.attention(vs.VarTensor(qd, lens), vs.VarTensor(kd, lens),
                             vs.VarTensor(jnp.asarray(v), lens), causal=causal,
                             backend=backend)
            return jnp.sum(o.data ** 2)

        def g(qd, kd, lens):
            gq, gk = jax.grad(f, argnums=(0, 1))(qd, kd, lens)
            return jnp.sum(jnp.sin(gq)) + jnp.sum(gk ** 2)

        run = jax.grad(g, argnums=(0, 1))
        if traced:
            run = jax.jit(run)
        return run(jnp.asarray(q), jnp.asarray(k), lengths)

    want = second("xla")
    for got, ref in zip(second(BucketedBackend()), want):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=2e-5)
