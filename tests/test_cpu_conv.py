"""The C++ ragged convolution kernels (``vsla_jax.conv.cpu``, ``csrc/conv.cc``) against
NumPy per item and the XLA engine: values, lengths, shapes, non-finite input, gradients,
``jit`` with traced lengths, threads, bad lengths and the fallback."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import re
import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import vsla_jax as vs
from vsla_jax import kernels
from vsla_jax.conv import cpu
from vsla_jax.errors import LengthError

pytestmark = pytest.mark.skipif(kernels.target(cpu.FWD) is None,
                                reason="C++ CPU kernels not built")

CAPS = (1, 4, 16, 37)  # few capacities: few compiled programs


def batch(lengths, cap: int, dtype=np.float32, seed: int = 0) -> vs.VarTensor:
    """A ``[len(lengths), cap]`` VarTensor of standard normal values, zero slack."""
    rng = np.random.default_rng(seed)
    data = np.zeros((len(lengths), cap), dtype)
    for i, n in enumerate(lengths):
        data[i, :n] = rng.standard_normal(n)
    return vs.VarTensor(jnp.asarray(data), np.asarray(lengths, np.int32).reshape(-1, 1))


def numpy_conv(a: vs.VarTensor, b: vs.VarTensor) -> list[np.ndarray]:
    out = []
    for x, k in zip(a.to_list(), b.to_list()):
        out.append(np.convolve(x, k) if len(x) and len(k) else np.zeros(0, x.dtype))
    return out


def check_against_numpy(out: vs.VarTensor, a: vs.VarTensor, b: vs.VarTensor, tol: float):
    data, lengths = np.asarray(out.data), np.asarray(out.lengths)[:, 0]
    for i, ref in enumerate(numpy_conv(a, b)):
        assert lengths[i] == len(ref)
        np.testing.assert_allclose(data[i, : len(ref)], ref, rtol=tol, atol=tol)
        assert not data[i, len(ref):].any(), "slack must be zero"


@st.composite
def pairs(draw):
    n = draw(st.integers(1, 5))
    ca, cb = draw(st.sampled_from(CAPS)), draw(st.sampled_from(CAPS))
    ends = lambda c: st.one_of(st.just(0), st.just(1), st.just(c), st.integers(0, c))
    la = draw(st.lists(ends(ca), min_size=n, max_size=n))
    lb = draw(st.lists(ends(cb), min_size=n, max_size=n))
    return la, ca, lb, cb


@settings(max_examples=20, deadline=None)
@given(pairs())
def test_matches_numpy_and_engine_f32(p):
    la, ca, lb, cb = p
    a, b = batch(la, ca, seed=1), batch(lb, cb, seed=2)
    out = cpu.ragged_conv(a, b)
    check_against_numpy(out, a, b, 1e-5)
    ref = vs.conv(a, b, method="direct")
    assert out.data.shape == ref.data.shape and out.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(out.data), np.asarray(ref.data), rtol=1e-5,
                               atol=1e-5)


def test_matches_numpy_f64_long_pairs():
    """Lengths past one tile (512 outputs) and past 8 taps, every tap remainder."""
    with jax.enable_x64(True):
        a = batch([700, 1500, 9, 1, 1500, 0], 1500, np.float64, seed=3)
        b = batch([13, 300, 1500, 1500, 7, 5], 1500, np.float64, seed=4)
        out = cpu.ragged_conv(a, b)
        assert out.dtype == jnp.float64
        check_against_numpy(out, a, b, 1e-12)


def test_both_inner_loops_at_their_boundaries_match_numpy():
    """Pairs on either side of the switch between the checked edges and the zero-padded
    copy (8 taps, 256 samples in the longer input), longer inputs than kernels and the
    reverse, long pairs split across threads, and not: float64 against NumPy."""
    with jax.enable_x64(True):
        la = [255, 256, 257, 256, 7, 8, 9, 257, 100, 256, 3000, 40]
        lb = [8, 8, 8, 7, 256, 255, 257, 9, 63, 256, 64, 3000]
        a, b = batch(la, 3000, np.float64, seed=26), batch(lb, 3000, np.float64, seed=27)
        for threads in (1, 0):
            check_against_numpy(cpu._cpu_call(a, b, max_threads=threads), a, b, 1e-10)


def test_shapes_and_engine_on_natural_call(rng):
    xs = [rng.standard_normal(n).astype(np.float32) for n in (3, 100, 1, 57)]
    ks = [rng.standard_normal(n).astype(np.float32) for n in (5, 2, 9, 1)]
    a, b = vs.stack(xs), vs.stack(ks)
    out, ref = cpu.ragged_conv(a, b), vs.conv(a, b)
    assert out.data.shape == ref.data.shape and out.lengths.shape == ref.lengths.shape
    np.testing.assert_allclose(np.asarray(out.data), np.asarray(ref.data), atol=1e-4)


def test_natural_call_compiles_to_one_custom_call(rng):
    """The kernel returns the output lengths too: no XLA op runs beside the custom call
    (a separate lengths fusion made a second thunk that cost small batches ~60 us)."""
    a, b = batch([5, 0, 16, 3], 16, seed=5), batch([3, 4, 0, 16], 16, seed=6)
    hlo = cpu._cpu_arrays.lower(a.data, a.lengths, b.data, b.lengths).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    ops = re.findall(r"= (?:\([^)]*\)|\S+) ([\w-]+)\(", entry)
    plumbing = ("parameter", "bitcast", "tuple", "get-tuple-element")
    assert [op for op in ops if op not in plumbing] == ["custom-call"], ops


def test_one_kernel_broadcast_over_batch(rng):
    a = batch([5, 0, 16, 3], 16, seed=5)
    k = vs.tensor(rng.standard_normal(3).astype(np.float32))
    out, ref = cpu.ragged_conv(a, k), vs.conv(a, k, method="direct")
    assert out.data.shape == ref.data.shape
    np.testing.assert_allclose(np.asarray(out.data), np.asarray(ref.data), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))


@pytest.mark.parametrize("sizes", [([6, 4, 1], 16, [3, 5, 2], 5),
                                   ([300, 20, 9], 300, [20, 64, 9], 64)])
@pytest.mark.parametrize("where", ["a", "b"])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_like_numpy(where, value, sizes):
    """Only products of two logical values are formed: inf reaches exactly the outputs
    numpy.convolve gives it and never turns other entries into nan (conv_engine.md), on
    short pairs (checked edges) and on pairs of 8+ taps, whose zero-padded copy of the
    longer input is used only when the taps are finite (inf * 0 would be nan)."""
    la, ca, lb, cb = sizes
    a, b = batch(la, ca, seed=6), batch(lb, cb, seed=7)
    x = a if where == "a" else b
    data = np.asarray(x.data).copy()
    data[0, 1] = value
    data[2, 0] = value
    x = vs.VarTensor(jnp.asarray(data), x.lengths)
    a, b = (x, b) if where == "a" else (a, x)
    out = cpu.ragged_conv(a, b)
    ref = vs.conv(a, b, method="direct")
    got = np.asarray(out.data)
    for i, want in enumerate(numpy_conv(a, b)):
        # inf/nan positions (and signs) exactly; finite values up to rounding
        np.testing.assert_allclose(got[i, : len(want)], want, rtol=1e-5, atol=1e-6)
        assert not got[i, len(want):].any()
    np.testing.assert_allclose(got, np.asarray(ref.data), atol=1e-5)


def test_grads_check_grads_f64():
    with jax.enable_x64(True):
        a = batch([5, 0, 12, 1], 12, np.float64, seed=8)
        b = batch([3, 4, 12, 1], 12, np.float64, seed=9)
        la, lb = a.lengths[:, 0], b.lengths[:, 0]
        f = lambda x, y: cpu.conv_arrays(x, y, la, lb)
        check_grads(f, (a.data, b.data), order=1, modes=("rev",))


def test_grads_match_engine_autodiff_and_vanish_in_slack(rng):
    a, b = batch([7, 0, 16, 2], 16, seed=10), batch([3, 4, 1, 4], 4, seed=11)
    w = jnp.asarray(rng.standard_normal((4, 19)).astype(np.float32))

    def loss(fn, x, y):
        out = fn(vs.VarTensor.trusted(x, a.lengths), vs.VarTensor.trusted(y, b.lengths))
        return jnp.sum(out.data * w)

    ours = jax.grad(lambda x, y: loss(cpu.ragged_conv, x, y), (0, 1))(a.data, b.data)
    engine = lambda x, y: vs.conv(x, y, method="direct")
    ref = jax.grad(lambda x, y: loss(engine, x, y), (0, 1))(a.data, b.data)
    for g, r, x in zip(ours, ref, (a, b)):
        m = np.asarray(x.mask())
        np.testing.assert_allclose(np.asarray(g) * m, np.asarray(r) * m, atol=1e-5)
        assert not np.asarray(g)[~m].any(), "gradient in the slack must be zero"


@pytest.mark.parametrize("items, cap", [(64, 8192), (128, 1 << 16)])
def test_large_mostly_padded_outputs_zero_their_slack(items, cap):
    """Outputs of 256 KiB and more are zeroed by handing pages back to the OS when they
    are mostly unmapped (csrc/common.h zero_if_absent); from 32 MiB the untouched slack
    is never written. Repeated calls (fresh, then reused, memory) must still give
    NumPy's values and exactly zero slack, forward and backward."""
    rng = np.random.default_rng(items)
    for call in range(3):
        la = rng.integers(0, 300, items)
        la[rng.integers(items)] = cap
        lb = rng.integers(1, 9, items)
        a, b = batch(la, cap, seed=call), batch(lb, 8, seed=call + 10)
        out = cpu.ragged_conv(a, b)
        check_against_numpy(out, a, b, 1e-4)
        g = rng.standard_normal(out.data.shape).astype(np.float32)
        la32, lb32 = a.lengths[:, 0], b.lengths[:, 0]
        _, vjp = jax.vjp(functools.partial(cpu.conv_arrays, la=la32, lb=lb32), a.data, b.data)
        ga, gb = (np.asarray(t) for t in vjp(jnp.asarray(g)))
        xs, ks = a.to_list(), b.to_list()
        for i in range(items):
            n, m = int(la[i]), int(lb[i])
            gi = g[i, : n + m - 1] if n else g[i, :0]
            ref_a = np.correlate(gi, ks[i], "valid") if n else np.zeros(0)
            ref_b = np.correlate(gi, xs[i], "valid") if n else np.zeros(m)
            np.testing.assert_allclose(ga[i, :n], ref_a, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(gb[i, :m], ref_b, rtol=1e-4, atol=1e-3)
            assert not ga[i, n:].any() and not gb[i, m:].any(), "gradient slack must be zero"


def test_jit_traced_lengths_and_jit_grad():
    a, b = batch([5, 16, 0], 16, seed=12), batch([4, 1, 3], 4, seed=13)
    f = jax.jit(lambda x, y: cpu.ragged_conv(x, y))
    out, ref = f(a, b), cpu.ragged_conv(a, b)
    np.testing.assert_array_equal(np.asarray(out.data), np.asarray(ref.data))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    a2 = batch([1, 2, 3], 16, seed=14)  # new lengths, same program
    check_against_numpy(f(a2, b), a2, b, 1e-5)

    @jax.jit
    def grad(x, y):
        return jax.grad(lambda d: jnp.sum(cpu.ragged_conv(
            vs.VarTensor.trusted(d, x.lengths), y).data ** 2))(x.data)

    g = grad(a, b)
    eager = jax.grad(lambda d: jnp.sum(vs.conv(vs.VarTensor.trusted(d, a.lengths), b,
                                                method="direct").data ** 2))(a.data)
    m = np.asarray(a.mask())
    np.testing.assert_allclose(np.asarray(g) * m, np.asarray(eager) * m, rtol=1e-4,
                               atol=1e-4)


def test_vmap_adds_a_batch_axis():
    a = batch([5, 16, 0, 3], 16, seed=15)
    b = batch([4, 1, 3, 2], 4, seed=16)
    stacked = lambda x: jax.tree.map(lambda v: v.reshape((2, 2) + v.shape[1:]), x)
    out = jax.vmap(lambda x, y: cpu.ragged_conv(x, y).data)(stacked(a), stacked(b))
    ref = cpu.ragged_conv(a, b).data
    np.testing.assert_array_equal(np.asarray(out).reshape(ref.shape), np.asarray(ref))


def test_two_threads_same_jitted_function():
    a, b = batch([300, 2, 37, 0] * 8, 300, seed=17), batch([30, 5, 1, 7] * 8, 37, seed=18)
    f = jax.jit(lambda x, y: cpu.ragged_conv(x, y).data)
    want = np.asarray(f(a, b))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: np.asarray(f(a, b)), range(8)))
    for o in outs:
        np.testing.assert_array_equal(o, want)


@pytest.mark.parametrize("bad", [17, -1])
def test_bad_concrete_lengths_raise_length_error(bad):
    a = batch([3, 4], 16, seed=19)
    wrong = vs.VarTensor.trusted(a.data, jnp.asarray([[3], [bad]], jnp.int32))
    with pytest.raises(LengthError, match="capacity 16"):
        cpu.ragged_conv(wrong, batch([2, 2], 4))
    with pytest.raises(LengthError, match="lengths of b"):
        cpu.ragged_conv(batch([2, 2], 4), wrong)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getrusage page faults")
def test_a_fresh_large_output_faults_in_only_the_pages_it_writes():
    """From the measured page faults: a 33.5 MB output (over glibc's largest mmap
    threshold, so XLA maps it fresh on every call) whose valid outputs touch ~1 page a
    row is zeroed by handing its pages back, not by writing 8,192 pages. Writing them
    (the previous design) took a fault for each."""
    a, b = batch([100] * 128, 1 << 16, seed=30), batch([8] * 128, 8, seed=31)
    warm = cpu.ragged_conv(a, b)
    jax.block_until_ready(warm.data)
    del warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = cpu.ragged_conv(a, b)
    data = jax.block_until_ready(out.data)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    pages = data.size * data.dtype.itemsize // 4096
    assert faults < pages // 4, f"{faults} page faults for a {pages}-page output"
    host = np.asarray(data)
    assert not host[:, 107:].any(), "slack must be zero"


def test_lengths_changed_through_the_pytree_are_checked_again():
    """Built tensors carry ``lengths_checked`` and skip the host check; ``jax.tree.map``
    rebuilds without it, so lengths it pushed past the capacity still raise
    ``LengthError`` before the kernel runs."""
    a, b = vs.stack([np.ones(3, np.float32), np.ones(5, np.float32)]), batch([2, 2], 4)
    assert a.lengths_checked and b.lengths_checked
    moved = jax.tree.map(lambda x: x * 100 if x.dtype == jnp.int32 else x, a)
    assert not moved.lengths_checked
    with pytest.raises(LengthError, match="lengths of a"):
        vs.conv(moved, b)


@pytest.mark.parametrize("bad", [17, -1])
def test_bad_traced_lengths_kernel_error(bad):
    a, b = batch([3, 4], 16, seed=20), batch([2, 2], 4)
    f = jax.jit(lambda x, la: cpu.ragged_conv(vs.VarTensor.trusted(x, la), b).data)
    with pytest.raises(Exception, match=r"vsla conv kernel: la\[1\] = .* outside"):
        jax.block_until_ready(f(a.data, jnp.asarray([[3], [bad]], jnp.int32)))
    g = jax.jit(jax.grad(lambda x, la: jnp.sum(cpu.ragged_conv(
        vs.VarTensor.trusted(x, la), b).data)))
    with pytest.raises(Exception, match="vsla conv kernel"):
        jax.block_until_ready(g(a.data, jnp.asarray([[3], [bad]], jnp.int32)))


def test_kernel_rejects_mismatched_dims():
    x = jnp.zeros((2, 8), jnp.float32)
    with pytest.raises(Exception, match="must be \\[\\*batch, capacity\\]"):
        jax.block_until_ready(cpu.forward_call(x, jnp.zeros((3, 4), jnp.float32),
                                            jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32),
                                            max_threads=0))


@pytest.mark.parametrize("g_cap,w_cap,lo,lw,match", [
    (10, 4, [7, 7], [4, 4], "g \\[2, 10\\] must be \\[\\*batch, 11\\]"),  # not Cy + Cw - 1
    (11, 4, [9, 1], [4, 4], "lo\\[0\\] = 9 is outside \\[0, capacity 8\\]"),
    (11, 4, [8, 1], [4, -1], "lw\\[1\\] = -1 is outside"),
])
def test_correlation_kernel_rejects_bad_shapes_and_lengths(g_cap, w_cap, lo, lw, match):
    g, w = jnp.ones((2, g_cap), jnp.float32), jnp.ones((2, w_cap), jnp.float32)
    lo, lw = jnp.asarray(lo, jnp.int32), jnp.asarray(lw, jnp.int32)
    y = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    assert kernels.registered(cpu.CORR)  # whichever test runs first in this worker
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(jax.ffi.ffi_call(cpu.CORR, y)(g, w, lo, lw,
                                                             max_threads=np.int64(0)))


def test_correlation_kernel_matches_numpy():
    """y[p] = sum_{j < lw} g[p + j] w[j] for p < lo, zero after (what the transposes use)."""
    rng = np.random.default_rng(5)
    lo, lw = np.array([8, 0, 3, 1, 5]), np.array([4, 2, 0, 1, 3])
    g = rng.standard_normal((5, 11)).astype(np.float32)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    (y,) = cpu.corr_call(jnp.asarray(g), jnp.asarray(w), jnp.asarray(lo, jnp.int32),
                          jnp.asarray(lw, jnp.int32), max_threads=0)
    want = np.zeros((5, 8), np.float32)
    for i in range(5):
        if lo[i] and lw[i]:
            want[i, :lo[i]] = np.correlate(g[i, :lo[i] + lw[i] - 1], w[i, :lw[i]], "valid")
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)


def test_fallback_and_unsupported_return_none(monkeypatch):
    a, b = batch([3, 4], 16), batch([2, 2], 4)
    rank2 = vs.stack([np.ones((2, 3), np.float32)])
    assert cpu.ragged_conv(rank2, rank2) is None
    half = vs.VarTensor(a.data.astype(jnp.bfloat16), a.lengths)
    assert cpu.ragged_conv(half, b.__class__(b.data.astype(jnp.bfloat16), b.lengths)) is None
    feat = vs.VarTensor(jnp.zeros((2, 16, 3)), a.lengths)
    assert cpu.ragged_conv(feat, vs.VarTensor(jnp.zeros((2, 4, 3)), b.lengths)) is None
    monkeypatch.setattr(kernels, "target", lambda *args: None)
    assert cpu.ragged_conv(a, b) is None


def test_threads_agree_with_one_thread():
    """Pieces of big items split across threads give the single-thread result."""
    a = batch([4000, 3000, 5, 2000] * 4, 4000, seed=21)
    b = batch([300, 1, 200, 64] * 4, 300, seed=22)
    one = cpu._cpu_call(a, b, max_threads=1)
    many = cpu._cpu_call(a, b)
    np.testing.assert_allclose(np.asarray(one.data), np.asarray(many.data), rtol=1e-5,
                               atol=1e-5)
    check_against_numpy(many, a, b, 1e-3)


def test_many_small_items_pulled_in_chunks_agree_with_one_thread():
    """Hundreds of small items next to a few long ones: the threads pull the small
    pieces in chunks (several items per pull); forward and both correlations equal the
    single-thread result and NumPy."""
    rng = np.random.default_rng(23)
    la = np.concatenate([rng.integers(0, 300, 700), [4000, 3500, 3999]])
    lb = np.concatenate([rng.integers(0, 40, 700), [64, 1, 40]])
    a, b = batch(la, 4000, seed=24), batch(lb, 64, seed=25)
    one = cpu._cpu_call(a, b, max_threads=1)
    many = cpu._cpu_call(a, b)
    np.testing.assert_array_equal(np.asarray(one.data), np.asarray(many.data))
    check_against_numpy(many, a, b, 1e-3)
    g = jnp.asarray(rng.standard_normal(many.data.shape), jnp.float32)
    for lo, lw, w, cap in ((a.lengths[:, 0], b.lengths[:, 0], b.data, 4000),
                           (b.lengths[:, 0], a.lengths[:, 0], a.data, 64)):
        y1, y2 = (cpu.corr_call(g[:, : cap + w.shape[1] - 1], w, lo, lw, max_threads=t)[0]
                  for t in (1, 0))
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_every_autodiff_mode_through_the_natural_call():
    """vs.conv routes to the kernel primitives on CPU in every autodiff mode, and each
    agrees with the XLA engine."""
    with jax.enable_x64(True):
        a = batch([5, 0, 9, 1], 9, np.float64, seed=10)
        b = batch([3, 4, 2, 1], 4, np.float64, seed=11)

        def f(x, y):
            return vs.conv(vs.VarTensor(x, a.lengths), vs.VarTensor(y, b.lengths)).data

        check_grads(f, (a.data, b.data), order=2, modes=("fwd", "rev"))
        loss = lambda x: jnp.sum(jnp.sin(f(x, b.data)))
        ref = lambda x: jnp.sum(jnp.sin(vs.conv(vs.VarTensor(x, a.lengths), b, method="direct",
                                                policy=vs.ConvPolicy(cpu_kernels=False)).data))
        np.testing.assert_allclose(jax.jit(jax.hessian(loss))(a.data), jax.hessian(ref)(a.data),
                                   rtol=1e-10, atol=1e-12)
        t = jnp.ones_like(a.data)
        np.testing.assert_allclose(jax.jvp(loss, (a.data,), (t,))[1],
                                   jax.jvp(ref, (a.data,), (t,))[1], rtol=1e-10)
        # reverse mode runs the correlation kernel: its custom call is in the jitted grad
        hlo = jax.jit(jax.grad(loss)).lower(a.data).as_text()
        assert "vsla_conv_corr" in hlo


def _kernel_calls(fn, *args) -> tuple[int, int]:
    """(forward, correlation) custom calls in the lowered ``jit(fn)``; the XLA engine's
    paths show up as neither."""
    hlo = jax.jit(fn).lower(*args).as_text()
    return hlo.count("@vsla_conv_fwd("), hlo.count("@vsla_conv_corr(")


def test_transformations_of_a_jitted_conv_stay_on_the_kernels():
    """jvp / jacfwd / hessian of an already jitted function (which a custom_vjp cannot
    take: JAX refuses forward mode after tracing), grad of one operand, vmap of grad,
    grad of vmap and third-order mixed derivatives: all on the kernels, all equal to the
    XLA engine."""
    with jax.enable_x64(True):
        a = batch([5, 0, 9, 1], 9, np.float64, seed=12)
        b = batch([3, 4, 2, 1], 4, np.float64, seed=13)
        xla = vs.ConvPolicy(cpu_kernels=False)

        def loss(x, y, **kwargs):
            out = vs.conv(vs.VarTensor(x, a.lengths), vs.VarTensor(y, b.lengths), **kwargs)
            return jnp.sum(jnp.sin(out.data))

        ref = functools.partial(loss, method="direct", policy=xla)
        jloss = jax.jit(loss)
        args, t = (a.data, b.data), (jnp.ones_like(a.data), jnp.cos(b.data))
        close = functools.partial(np.testing.assert_allclose, rtol=1e-9, atol=1e-12)
        close(jax.jvp(jloss, args, t)[1], jax.jvp(ref, args, t)[1])
        close(jax.jacfwd(jloss)(*args), jax.jacfwd(ref)(*args))
        for i in (0, 1):
            close(jax.hessian(jloss, argnums=i)(*args), jax.hessian(ref, argnums=i)(*args))
        def third(f):  # reverse over reverse over reverse, mixing the operands
            g2 = lambda x, y: jnp.sum(jax.grad(f, argnums=1)(x, y) ** 2)
            return jax.grad(lambda x, y: jnp.sum(jax.grad(g2)(x, y) ** 2), argnums=(0, 1))

        for got, want in zip(third(jloss)(*args), third(ref)(*args)):
            close(got, want)
        check_grads(loss, args, order=3, modes=("fwd", "rev"))
        xs = jnp.stack([a.data, 2 * a.data, -a.data])
        close(jax.vmap(jax.grad(jloss), (0, None))(xs, b.data),
              jax.vmap(jax.grad(ref), (0, None))(xs, b.data))
        close(jax.grad(lambda x: jax.vmap(loss, (0, None))(x, b.data).sum())(xs),
              jax.grad(lambda x: jax.vmap(ref, (0, None))(x, b.data).sum())(xs))
        assert _kernel_calls(jax.grad(ref), *args) == (0, 0)  # the reference is XLA's
        # one correlation per operand that has a gradient; forward mode runs the forward
        assert _kernel_calls(jax.grad(loss, argnums=1), *args) == (1, 1)
        assert _kernel_calls(jax.grad(loss, argnums=(0, 1)), *args) == (1, 2)
        assert _kernel_calls(lambda x, y: jax.jvp(loss, (x, y), t), *args) == (3, 0)
        fwd, corr = _kernel_calls(jax.hessian(loss), *args)
        assert fwd >= 1 and corr >= 1


def test_jvp_of_the_single_item_front_door():
    x = np.arange(5.0, dtype=np.float32)
    k = vs.tensor(np.array([1.0, -2.0, 3.0], np.float32))
    f = lambda x: jnp.sum(vs.conv(vs.tensor(x), k).data ** 2)
    primal, tangent = jax.jvp(f, (x,), (np.ones(5, np.float32),))
    want = np.convolve(x, [1.0, -2.0, 3.0])
    assert float(primal) == pytest.approx(float(np.sum(want**2)))
    assert float(tangent) == pytest.approx(float(2 * np.sum(want * np.convolve(np.ones(5),
                                                                            [1, -2, 3]))))


def test_jax_export_lowers_the_kernels_to_portable_xla():
    """jax.export of the natural call (and of its gradient) carries no custom call, and
    the deserialised program gives the kernels' results, inf and nan included."""
    from jax import export

    a = batch([5, 0, 9, 1], 9, seed=14)
    b = batch([3, 4, 2, 1], 4, seed=15)
    data = np.asarray(a.data).copy()
    data[0, 1], data[2, 3] = np.inf, np.nan
    data[2, 8] = -np.inf
    a = vs.VarTensor(jnp.asarray(data), a.lengths)

    def f(x, y):
        out = vs.conv(vs.VarTensor(x, a.lengths), vs.VarTensor(y, b.lengths))
        return out.data, out.lengths

    grad = jax.grad(lambda x, y: jnp.sum(jnp.tanh(f(x, y)[0])), argnums=(0, 1))
    for fn in (f, grad):
        exported = export.export(jax.jit(fn))(a.data, b.data)
        assert "stablehlo.custom_call" not in exported.mlir_module()
        restored = export.deserialize(exported.serialize())
        assert _kernel_calls(fn, a.data, b.data) != (0, 0)  # the kernels, outside export
        for got, want in zip(restored.call(a.data, b.data), jax.jit(fn)(a.data, b.data)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6,
                                       atol=1e-6, equal_nan=True)


def test_jax_export_with_a_symbolic_batch():
    from jax import export

    a, b = batch([5, 0, 9, 1], 9, seed=16), batch([3, 4, 2, 1], 4, seed=17)
    f = lambda x, lx, y, ly: vs.conv(vs.VarTensor(x, lx), vs.VarTensor(y, ly)).data
    (n,) = export.symbolic_shape("n")
    specs = [jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype)
             for x in (a.data, a.lengths, b.data, b.lengths)]
    exported = export.export(jax.jit(f))(*specs)
    assert "custom_call @vsla_" not in exported.mlir_module()  # JAX adds shape assertions
    for m in (4, 2):
        got = exported.call(a.data[:m], a.lengths[:m], b.data[:m], b.lengths[:m])
        np.testing.assert_allclose(np.asarray(got), np.asarray(vs.conv(a, b).data[:m]),
                                   rtol=1e-6, atol=1e-6)


OPERAND_KINDS = ("f32", "f64", "bf16", "int32", "complex64", "model B", "rank 2",
                 "features", "trusted", "two items", "one item")


def operand(kind: str, seed: int) -> vs.VarTensor:
    """A small batch of 3 rank-1 items, or one variant the common-call path must decline."""
    x = batch([3, 0, 7], 8, seed=seed)
    if kind in ("f64", "bf16", "int32", "complex64"):
        dtype = {"f64": jnp.float64, "bf16": jnp.bfloat16, "int32": jnp.int32,
                 "complex64": jnp.complex64}[kind]
        return vs.VarTensor(x.data.astype(dtype), x.lengths)
    if kind == "model B":
        return vs.VarTensor(x.data, x.lengths, "B")
    if kind == "rank 2":
        return vs.stack([np.ones((2, 3), np.float32), np.ones((1, 4), np.float32)])
    if kind == "features":
        return vs.VarTensor(jnp.ones((3, 8, 2)), x.lengths)
    if kind == "trusted":  # lengths never checked: the full path checks them
        return vs.VarTensor.trusted(x.data, x.lengths)
    if kind == "one item":  # unbatched: broadcasts against any batch
        return vs.tensor(np.arange(1.0, 5.0, dtype=np.float32))
    if kind == "two items":  # does not broadcast against 3 items
        return batch([1, 2], 8, seed=seed)
    return x


@pytest.mark.parametrize("kind_a, kind_b", list(itertools.product(OPERAND_KINDS, repeat=2)))
def test_the_common_call_path_agrees_with_the_full_path(kind_a, kind_b):
    """``cpu.concrete_conv`` (what ``vs.conv(a, b)`` tries first) either declines (None)
    or returns exactly what the full path returns (``policy`` given: the full path
    runs); where the full path raises, it declines and ``vs.conv`` raises the same."""
    with jax.enable_x64(True):
        a, b = operand(kind_a, 40), operand(kind_b, 41)
        try:
            full = vs.conv(a, b, policy=vs.ConvPolicy())
        except vs.VSLAError as e:
            assert cpu.concrete_conv(a, b) is None
            with pytest.raises(type(e)):
                vs.conv(a, b)
            return
        fast = cpu.concrete_conv(a, b)
        common = {"f32", "f64", "model B", "two items", "one item"}  # float, rank 1
        assert (fast is not None) == ({kind_a, kind_b} <= common), (kind_a, kind_b)
        for out in ([fast] if fast is not None else []) + [vs.conv(a, b)]:
            assert out.dtype == full.dtype and out.model == full.model
            assert out.data.shape == full.data.shape
            np.testing.assert_array_equal(np.asarray(out.data), np.asarray(full.data))
            np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(full.lengths))


def test_the_common_call_path_declines_traced_operands():
    """Under ``jit`` the operands are tracers: the full path runs (and still binds the
    kernel), and the result equals the eager one."""
    a, b = batch([3, 0, 7], 8, seed=42), batch([2, 5, 1], 8, seed=43)
    seen = []

    def f(da, db):
        x, y = vs.VarTensor(da, a.lengths), vs.VarTensor(db, b.lengths)
        seen.append(cpu.concrete_conv(x, y))
        return vs.conv(x, y).data

    np.testing.assert_array_equal(np.asarray(jax.jit(f)(a.data, b.data)),
                                  np.asarray(vs.conv(a, b).data))
    assert seen == [None]
