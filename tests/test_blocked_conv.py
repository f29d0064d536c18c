"""The blocked plan (``vsla_jax.conv.blocked``) and the packed ``conv_packed`` against
NumPy: plans, layouts and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from tests.reference import assert_items_match, convolve_items
from vsla_jax.conv import blocked as bcv
from vsla_jax.conv.cost import STATIC_COST_MODEL, CostModel
from vsla_jax.conv.kernels import fast_fft_length
from vsla_jax.errors import ShapeError, VSLATypeError


def _check(res, xs, ks, rtol=1e-4, atol=1e-5):
    assert_items_match(res.to_list(), convolve_items(xs, ks), rtol, atol)


def _batch(rng, n, max_a, max_b):
    la = np.exp(rng.uniform(0, np.log(max_a), n)).astype(int)
    lb = np.exp(rng.uniform(0, np.log(max_b), n)).astype(int)
    xs = [rng.standard_normal(m).astype(np.float32) for m in la]
    ks = [rng.standard_normal(m).astype(np.float32) for m in lb]
    return xs, ks


@pytest.mark.parametrize("method", ["auto", "direct", "fft"])
def test_heterogeneous_matches_numpy(method):
    rng = np.random.default_rng(0)
    xs, ks = _batch(rng, 70, 3000, 600)
    xs[0], ks[1] = xs[0][:0], ks[1][:0]  # empty signal, empty kernel
    xs[2], ks[2] = xs[2][:1], ks[2][:1]  # single elements
    xs[3], ks[3] = ks[3][:400], xs[3][:9]  # kernel longer than the signal (operands swap)
    res = bcv.conv_packed(xs, ks, method)
    _check(res, xs, ks)
    np.testing.assert_array_equal(
        res.lengths, [len(x) + len(k) - 1 if len(x) and len(k) else 0 for x, k in zip(xs, ks)])


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=12),
       st.sampled_from(["direct", "fft"]), st.integers(0, 2**16))
def test_edge_lengths_match_numpy(pairs, method, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(a).astype(np.float32) for a, _ in pairs]
    ks = [rng.standard_normal(b).astype(np.float32) for _, b in pairs]
    _check(bcv.conv_packed(xs, ks, method), xs, ks)


def test_fft_and_direct_agree_within_error_bounds():
    rng = np.random.default_rng(1)
    xs, ks = _batch(rng, 40, 2048, 300)
    d = bcv.conv_packed(xs, ks, "direct").to_list()
    f = bcv.conv_packed(xs, ks, "fft").to_list()
    for a, b in zip(d, f):  # the f32 bound of conv_engine: atol 1e-6, rtol 1e-4 (normwise)
        if a.size:
            assert np.abs(a - b).max() <= 1e-6 + 1e-4 * max(np.abs(a).max(), np.abs(b).max())


def test_plan_invariants():
    rng = np.random.default_rng(2)
    la = np.exp(rng.uniform(0, np.log(2048), 300)).astype(np.int64)
    lb = np.exp(rng.uniform(0, np.log(256), 300)).astype(np.int64)
    la[:5] = 0
    plan = bcv.plan_blocks(la, lb, "auto", STATIC_COST_MODEL, ladder=None)
    out = np.where((la > 0) & (lb > 0), la + lb - 1, 0)
    np.testing.assert_array_equal(plan.lengths, out)
    # every output region lies inside its class's array and no two overlap
    live = np.flatnonzero(out > 0)
    for k, c in enumerate(plan.layout):
        mine = live[plan.part[live] == k]
        order = mine[np.argsort(plan.offsets[mine])]
        ends = plan.offsets[order] + out[order]
        assert (plan.offsets[order][1:] >= ends[:-1]).all()
        assert ends.max() <= c.blocks * c.block
    assert (plan.part[out == 0] == -1).all()
    seen = np.concatenate(plan.members)
    np.testing.assert_array_equal(np.sort(seen), live)  # each non-empty item in one class
    for c, mem in zip(plan.layout, plan.members):
        short = np.minimum(la[mem], lb[mem])
        assert c.taps == short.max() and c.block >= c.taps - 1
        assert short.min() > c.taps // 2 or c.taps <= 8  # octave classes
        # padded work: at most one partly filled block per item
        assert c.blocks * c.block < out[mem].sum() + mem.size * c.block
        if c.method == "fft":
            assert c.fft_length >= c.block + c.taps - 1 and c.block % bcv.BLOCK_QUANTUM == 0
            assert fast_fft_length(c.fft_length) == c.fft_length
    assert plan.first.sum() == live.size
    assert plan.source.size == plan.total_in


def test_plan_is_cached_per_length_profile():
    rng = np.random.default_rng(3)
    xs, ks = _batch(rng, 20, 500, 50)
    bcv.cached_plan.cache_clear()
    bcv.conv_packed(xs, ks, "auto")
    xs2 = [x + 1 for x in xs]  # same lengths, new values
    _check(bcv.conv_packed(xs2, ks, "auto"), xs2, ks)
    info = bcv.cached_plan.cache_info()
    assert info.hits == 1 and info.misses == 1


def test_accumulate_f64_and_dtypes():
    rng = np.random.default_rng(4)
    xs, ks = _batch(rng, 10, 300, 40)
    with jax.enable_x64(True):
        res = bcv.conv_packed(xs, ks, "fft", accumulate_f64=True)
        assert all(v.dtype == jnp.float32 for v in res.values)
        _check(res, xs, ks)
    ints = [np.arange(5), np.arange(3)]
    res = bcv.conv_packed(ints, [np.ones(2, np.int32)] * 2, "direct")
    assert np.issubdtype(res.values[0].dtype, np.floating)
    _check(res, ints, [np.ones(2)] * 2)


def test_bad_input_raises_typed_errors():
    with pytest.raises(ShapeError, match="rank-1"):
        bcv.conv_packed([np.ones((2, 2))], [np.ones(2)])
    with pytest.raises(ShapeError, match="kernel 0 has rank"):
        bcv.conv_packed([np.ones(3)], [np.ones((2, 2))])
    with pytest.raises(ShapeError, match="2 kernels for 1 items"):
        bcv.conv_packed([np.ones(3)], [np.ones(2)] * 2)
    with pytest.raises(VSLATypeError, match="floating"):
        bcv.conv_packed([np.ones(3, np.int32)], [np.ones(2, np.int32)], "fft")
    with pytest.raises(ValueError, match="method"):
        bcv.conv_packed([np.ones(3)], [np.ones(2)], "winograd")
    with pytest.raises(ShapeError, match="ragged"):
        bcv.conv_packed([[1.0, [2.0]]], [np.ones(2)])
    assert len(bcv.conv_packed([], [])) == 0


def _packed_fn(plan, dtype):
    """Flat input (signals, kernels) -> flat outputs, differentiable end to end."""
    src = jnp.asarray(plan.source)
    first = jnp.asarray(plan.first)

    def f(flat):
        ext = jnp.concatenate([flat, jnp.zeros(1, dtype)])
        return jnp.concatenate(bcv.conv_blocked_values(ext[src], first, plan.layout))

    return f


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_gradients_match_per_item_reference(method):
    rng = np.random.default_rng(5)
    la, lb = np.array([5, 40, 1, 300, 17]), np.array([3, 9, 4, 20, 60])
    plan = bcv.plan_blocks(la, lb, method, ladder=None)
    flat = jnp.asarray(rng.standard_normal(la.sum() + lb.sum()), jnp.float32)
    sizes = [c.blocks * c.block for c in plan.layout]
    base = np.concatenate([[0], np.cumsum(sizes)])
    cot = jnp.asarray(rng.standard_normal(base[-1]), jnp.float32)
    ours = jax.grad(lambda v: jnp.vdot(cot, _packed_fn(plan, jnp.float32)(v)))(flat)

    def reference(v):  # per-item jnp.convolve, same cotangent per output sample
        total, at = 0.0, np.concatenate([[0], np.cumsum(np.concatenate([la, lb]))])
        for i, (a, b) in enumerate(zip(la, lb)):
            y = jnp.convolve(v[at[i] : at[i] + a], v[at[len(la) + i] : at[len(la) + i] + b])
            o = base[plan.part[i]] + plan.offsets[i]
            total = total + jnp.vdot(cot[o : o + a + b - 1], y)
        return total

    np.testing.assert_allclose(ours, jax.grad(reference)(flat), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_check_grads_f64(method):
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        la, lb = np.array([6, 1, 13]), np.array([4, 3, 9])
        plan = bcv.plan_blocks(la, lb, method, ladder=None)
        flat = jnp.asarray(rng.standard_normal(la.sum() + lb.sum()))
        check_grads(_packed_fn(plan, jnp.float64), (flat,), order=1, modes=("rev",),
                    atol=1e-6, rtol=1e-6)


def test_cost_model_steers_the_method():
    out = np.full(20, 3000)
    cheap_fft = CostModel(1e-5, 1e-9, 1e-5, 1e-13)
    cheap_direct = CostModel(1e-5, 1e-13, 1e-5, 1e-9)
    assert bcv.class_method(out, 200, "auto", cheap_fft)[0] == "fft"
    assert bcv.class_method(out, 200, "auto", cheap_direct)[0] == "direct"


def test_layout_ladder_pads_blocks_and_taps_with_zeros():
    rng = np.random.default_rng(8)
    la = np.exp(rng.uniform(0, np.log(1024), 40)).astype(np.int64)
    lb = np.exp(rng.uniform(0, np.log(128), 40)).astype(np.int64)
    exact = bcv.plan_blocks(la, lb, "direct")
    laddered = bcv.plan_blocks(la, lb, "direct", ladder=bcv.LAYOUT_LADDER)
    for c, e in zip(laddered.layout, exact.layout):
        assert c.blocks == bcv.LAYOUT_LADDER.bucket(e.blocks) >= e.blocks
        assert c.taps == bcv.LAYOUT_LADDER.bucket(e.taps) >= e.taps
    np.testing.assert_array_equal(laddered.offsets, exact.offsets)
    zero = int(la.sum() + lb.sum())
    flat = np.concatenate([rng.standard_normal(zero), [0.0]]).astype(np.float32)
    outs = bcv.conv_blocked_values(jnp.asarray(flat[laddered.source]),
                                   jnp.asarray(laddered.first), laddered.layout)
    ref = bcv.conv_blocked_values(jnp.asarray(flat[exact.source]), jnp.asarray(exact.first),
                                  exact.layout)
    for i in range(40):  # every item's output is the same with or without the ladder
        p, o, n = laddered.part[i], laddered.offsets[i], laddered.lengths[i]
        if p >= 0:
            np.testing.assert_allclose(outs[p][o : o + n], ref[p][o : o + n], atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_aligned_empty(n, dtype):
    from vsla_jax.util import HOST_ALIGN, aligned_empty

    a = aligned_empty(n, dtype)
    assert a.shape == (n,) and a.dtype == dtype and a.flags.c_contiguous
    assert n == 0 or a.ctypes.data % HOST_ALIGN == 0  # an empty view has no data to align
    a[:] = 1  # writable
