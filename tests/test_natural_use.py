"""The calls a new user writes first: constructors on tracers, batches as Python
sequences, and clear errors for the bad inputs found by trying the library."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import vsla_jax as vs
from vsla_jax.attention import BACKENDS


def test_batch_len_iteration_and_index_errors():
    xs = [np.arange(n, dtype=np.float32) for n in (2, 5, 1, 4)]
    batch = vs.stack(xs)
    assert len(batch) == 4
    items = list(batch)  # terminates: out-of-range indices raise IndexError
    assert len(items) == 4
    for item, x in zip(items, xs):
        np.testing.assert_array_equal(item.to_numpy(), x)
    windows = [w for w in vs.window(xs, 3)]  # the natural loop over windows ends
    assert len(windows) == 2 and windows[1].lengths.tolist() == [1, 4]
    one = vs.stack([np.ones(3, np.float32)])
    with pytest.raises(IndexError, match="out of range"):
        one[5]
    with pytest.raises(IndexError):
        one[-2]
    np.testing.assert_array_equal(batch[-1].to_numpy(), xs[-1])
    with pytest.raises(IndexError):
        batch[np.array([0, 9])]
    with pytest.raises(TypeError, match="unbatched"):
        len(vs.tensor([1.0, 2.0]))
    nested = vs.stack([np.ones((2, 3)), np.ones((1, 1))])
    assert [item.lengths.tolist() for item in nested] == [[2, 3], [1, 1]]


def test_constructors_on_tracers_under_jit_grad_and_vmap():
    x = jnp.arange(1.0, 4.0)
    eager = vs.tensor(x)
    traced = jax.jit(lambda x: vs.tensor(x))(x)
    chex.assert_trees_all_equal(traced, eager)  # same capacity, data and lengths
    # grad through stack of traced items, with a dense feature axis
    g = jax.grad(lambda a: vs.sum(vs.stack([a, 2 * a[:1]], rank=1)).sum())(jnp.ones((3, 2)))
    np.testing.assert_array_equal(g, [[3.0, 3.0], [1.0, 1.0], [1.0, 1.0]])
    # vmap: every example is one item of its static shape
    norms = jax.vmap(lambda row: vs.norm(vs.tensor(row)))(jnp.ones((5, 4)))
    np.testing.assert_allclose(norms, np.full(5, 2.0))
    # from_padded on traced data and lengths
    d = jnp.ones((2, 4))
    y = jax.jit(lambda d, n: vs.from_padded(d, n, rank=1).data)(d, jnp.array([1, 3]))
    np.testing.assert_array_equal(y, [[1, 0, 0, 0], [1, 1, 1, 0]])
    # stacking VarTensors with traced data keeps their lengths
    a = vs.stack([np.ones(2, np.float32), np.ones(5, np.float32)])
    s = jax.jit(lambda d: vs.stack([vs.VarTensor(d, a.lengths)[0], vs.tensor(d[1])]).lengths)(
        a.data)
    assert s.tolist() == [[2], [a.capacity[0]]]


def test_scalars_and_bad_ranks_raise_typed_errors():
    with pytest.raises(vs.ShapeError, match="scalar"):
        vs.tensor(3.0)
    with pytest.raises(vs.ShapeError, match="scalar"):
        vs.stack([1.0, 2.0])
    with pytest.raises(vs.ShapeError, match="rank must be a positive integer"):
        vs.tensor([1.0, 2.0], rank=-1)
    with pytest.raises(vs.ShapeError, match="rank must be a positive integer"):
        vs.stack([[1.0]], rank=0)
    with pytest.raises(vs.ShapeError, match="rank=2 needs items with at least 2 axes"):
        vs.tensor([1.0, 2.0], rank=2)
    x = vs.stack([[1.0, 2.0], [3.0]])
    with pytest.raises(vs.VSLATypeError, match="width"):
        x.to_padded(2.5)
    with pytest.raises(vs.LengthError, match="non-negative"):
        x.to_padded(-1)


def test_direct_vartensor_construction_validates_concrete_lengths():
    data = np.zeros((2, 8), np.float32)
    with pytest.raises(vs.LengthError, match="exceed capacity"):
        vs.VarTensor(data, [[9], [3]])
    with pytest.raises(vs.LengthError, match="negative"):
        vs.VarTensor(data, [[1], [-3]])
    with pytest.raises(vs.ShapeError, match="batch shape"):
        vs.VarTensor(data, [[1], [2], [3]])
    with pytest.raises(vs.VSLATypeError, match="integers"):
        vs.VarTensor(data, [[1.5], [2.0]])
    ok = vs.VarTensor(data, [[8], [0]])
    assert ok.lengths.dtype == jnp.int32 and [t.shape for t in ok.to_list()] == [(8,), (0,)]
    # traced lengths are trusted, and JAX's own unflattening never re-validates
    jax.jit(lambda d, n: vs.VarTensor(d, n).data)(jnp.asarray(data), jnp.array([[1], [2]]))
    leaves, tree = jax.tree_util.tree_flatten(ok)
    assert jax.tree_util.tree_unflatten(tree, leaves).model == "A"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ok)[0]]
    assert paths == [".data", ".lengths"]


def test_from_padded_needs_rank_when_ambiguous():
    with pytest.raises(vs.ShapeError, match="ambiguous"):
        vs.from_padded(np.ones((2, 4)), [1, 2])
    batch = vs.from_padded(np.ones((2, 4)), [1, 2], rank=1)
    assert batch.batch_shape == (2,) and batch.lengths.tolist() == [[1], [2]]
    one = vs.from_padded(np.ones((3, 4)), [1, 2])
    assert one.batch_shape == () and one.rank == 2  # data.shape[0] != 2: not a batch
    single = vs.from_padded(np.ones((1, 4)), [3], rank=1)
    assert single.batch_shape == (1,)


def test_operands_must_be_vartensors_and_say_how():
    t = vs.tensor([1.0, 2.0])
    with pytest.raises(vs.VSLATypeError, match=r"vs.stack"):
        vs.add(t, np.ones(2))
    with pytest.raises(vs.VSLATypeError, match="Scalars are not VSLA operands"):
        t - 1
    np.testing.assert_array_equal((t * 2).to_numpy(), [2.0, 4.0])  # scale stays


# -- to_padded under jit, grad and vmap -------------------------------------------------
def test_to_padded_under_jit_grad_and_vmap_matches_eager_and_numpy():
    x = jnp.arange(1.0, 4.0)
    k = jnp.array([1.0, 2.0])
    want = np.pad(np.asarray(x), (0, 4))
    eager = vs.tensor(x).to_padded(7)
    np.testing.assert_array_equal(eager, want)
    np.testing.assert_array_equal(jax.jit(lambda x: vs.tensor(x).to_padded(7))(x), want)
    conv = lambda x: vs.conv(vs.tensor(x), vs.tensor(k)).to_padded(7)
    want_conv = np.pad(np.convolve(np.asarray(x), np.asarray(k)), (0, 3))
    np.testing.assert_allclose(jax.jit(conv)(x), want_conv)
    np.testing.assert_allclose(conv(x), want_conv)
    loss = lambda x: conv(x).sum()
    g_jit = jax.jit(jax.grad(loss))(x)
    np.testing.assert_allclose(g_jit, jax.grad(loss)(x))
    np.testing.assert_allclose(g_jit, np.full(3, float(k.sum())))  # d sum(x * k) / dx
    rows = jnp.arange(12.0).reshape(3, 4)
    got = jax.vmap(lambda r: vs.tensor(r).to_padded(6))(rows)
    np.testing.assert_array_equal(got, np.pad(np.asarray(rows), ((0, 0), (0, 2))))


def test_to_padded_with_traced_lengths_masks_and_keeps_eager_errors():
    data = jnp.ones((2, 4))
    n = jnp.array([[1], [3]])
    # traced lengths: entries at or past each length are zero (masked), widths are static
    f = jax.jit(lambda d, n: vs.VarTensor(d, n).to_padded(3))
    np.testing.assert_array_equal(f(data, n), [[1, 0, 0], [1, 1, 1]])
    g = jax.jit(lambda d, n: vs.from_padded(d, n, rank=1).to_padded((6,)))
    np.testing.assert_array_equal(g(data, n), vs.from_padded(data, n, rank=1).to_padded(6))
    with pytest.raises(vs.ShapeError, match="width"):
        jax.jit(lambda d, n: vs.VarTensor(d, n).to_padded())(data, n)
    x = vs.stack([[1.0, 2.0], [3.0]])  # concrete lengths: eager checks as before
    with pytest.raises(vs.LengthError, match="crop length 2"):
        x.to_padded(1)
    np.testing.assert_array_equal(x.to_padded(), [[1, 2], [3, 0]])


# -- attention with a value head size different from the query/key one -----------------
def _np_attention_dv(q, k, v, causal, scale):
    """NumPy loop reference: q [n, H, D], k [m, Hkv, D], v [m, Hkv, Dv] -> [n, H, Dv]."""
    n, h, _ = q.shape
    m, hk, dv = v.shape
    out = np.zeros((n, h, dv))
    kk, vv = np.repeat(k, h // hk, axis=1), np.repeat(v, h // hk, axis=1)
    for hh in range(h):
        for i in range(n):
            allowed = np.array([j <= i or not causal for j in range(m)], bool)
            if not allowed.any():
                continue
            s = np.where(allowed, kk[:, hh] @ q[i, hh] * scale, -np.inf)
            p = np.exp(s - s.max())
            out[i, hh] = (p / p.sum()) @ vv[:, hh]
    return out


def _qkv_dv(lq, lk, h=4, hk=2, d=4, dv=8, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda lens, heads, size: vs.stack(
        [rng.standard_normal((n, heads, size)).astype(np.float32) for n in lens], rank=1)
    return mk(lq, h, d), mk(lk, hk, d), mk(lk, hk, dv)


KNOWN_BACKENDS = ("xla", "bucketed", "tiled", "pallas")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_every_backend_supports_a_value_head_size_unlike_d(backend, causal):
    q, k, v = _qkv_dv([0, 3, 9, 17], [5, 0, 9, 12])
    ref = vs.attention(q, k, v, causal=causal, backend="xla")
    assert ref.features == (4, 8)
    try:
        out = vs.attention(q, k, v, causal=causal, backend=backend)
    except vs.ShapeError as e:  # a backend that cannot must say so, naming the sizes
        assert backend not in KNOWN_BACKENDS, e
        assert "4" in str(e) and "8" in str(e)
        return
    assert out.features == (4, 8) and out.capacity == q.capacity
    np.testing.assert_allclose(np.asarray(out.data), np.asarray(ref.data), atol=2e-5)
    for o, qi, ki, vi in zip(out.to_list(), q.to_list(), k.to_list(), v.to_list()):
        np.testing.assert_allclose(o, _np_attention_dv(qi, ki, vi, causal, 0.5), atol=2e-5)


@pytest.mark.parametrize("backend", ["bucketed", "tiled"])
def test_value_head_size_unlike_d_under_jit_with_traced_lengths(backend):
    q, k, v = _qkv_dv([2, 11], [7, 3], seed=1)
    f = jax.jit(lambda q, k, v: vs.attention(q, k, v, causal=True, backend=backend).data)
    np.testing.assert_allclose(np.asarray(f(q, k, v)),
                               np.asarray(vs.attention(q, k, v, causal=True,
                                                       backend="xla").data), atol=2e-5)


@pytest.mark.parametrize("backend", ["bucketed", "tiled", "pallas"])
def test_value_head_size_unlike_d_gradients_match_xla_and_finite_differences(backend):
    q, k, v = _qkv_dv([5, 0, 12], [7, 3, 12], h=2, hk=1, d=4, dv=6, seed=2)

    def loss(backend):
        def f(qd, kd, vd):
            o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                             vs.VarTensor(vd, v.lengths), causal=True, backend=backend)
            return jnp.sum(jnp.sin(o.data))
        return f

    args = (q.data, k.data, v.data)
    gx = jax.grad(loss("xla"), argnums=(0, 1, 2))(*args)
    gb = jax.grad(loss(backend), argnums=(0, 1, 2))(*args)
    for a, b in zip(gx, gb):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    if backend == "tiled":
        with jax.enable_x64(True):
            a64 = tuple(jnp.asarray(np.asarray(a), jnp.float64) for a in args)
            check_grads(loss(backend), a64, order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


# -- lengths that int32 cannot hold -----------------------------------------------------
@pytest.mark.parametrize("big", [2**32 + 5, 2**40, 2**31, -(2**31) - 1])
def test_lengths_that_do_not_fit_int32_raise_instead_of_wrapping(big):
    data = np.zeros((2, 8), np.float32)
    with pytest.raises(vs.LengthError, match=str(big)):
        vs.VarTensor(data, [[big], [1]])
    with pytest.raises(vs.LengthError, match=str(big)):
        vs.VarTensor(data, np.array([[1], [big]], np.int64))
    with pytest.raises(vs.LengthError, match=str(big)):
        vs.from_padded(data, np.array([1, big], np.int64), rank=1)
    with pytest.raises(vs.LengthError, match=str(big)):
        vs.from_dlpack(data, np.array([[big], [0]], np.int64))
    if big > 0:
        with pytest.raises(vs.LengthError, match=str(big)):
            vs.VarTensor(data, np.array([[big], [1]], np.uint64))
    ok = vs.VarTensor(data, np.array([[8], [0]], np.int64))
    assert ok.lengths.dtype == jnp.int32 and ok.lengths.tolist() == [[8], [0]]


# -- fancy indexing of a batch ----------------------------------------------------------
def test_fancy_batch_index_out_of_range_raises_like_numpy():
    xs = [np.arange(n, dtype=np.float32) for n in (3, 1, 2)]
    batch = vs.stack(xs)
    lengths = np.asarray(batch.lengths)
    for bad in ([0, 5], [0, -4], np.array([5, 0]), jnp.array([0, 3])):
        with pytest.raises(IndexError):
            lengths[np.asarray(bad)]  # NumPy agrees these are out of range
        with pytest.raises(IndexError, match=r"index (5|-4|3) .*of size 3"):
            batch[bad]
    for good in ([0, 2], [-1, 0], np.array([2, -3]), jnp.array([1, 1]), [True, False, True]):
        np.testing.assert_array_equal(batch[good].lengths, lengths[np.asarray(good)])
        np.testing.assert_array_equal(batch[good].data, np.asarray(batch.data)[np.asarray(good)])
    assert batch[[]].batch_shape == (0,)  # NumPy: a[[]] is empty too
    grid = vs.VarTensor(np.zeros((2, 3, 4), np.float32), np.ones((2, 3, 1), np.int32))
    with pytest.raises(IndexError, match="batch axis 1 of size 3"):
        grid[0, [1, 3]]
    assert grid[1, [0, -1]].batch_shape == (2,)


# -- causal and scale -------------------------------------------------------------------
def test_attention_causal_must_be_a_bool():
    q, k, v = _qkv_dv([3, 5], [3, 5], d=4, dv=4)
    for bad in ("no", 1, None, "False"):
        with pytest.raises(vs.VSLATypeError, match=r"causal.*" + repr(bad).replace(
                "(", r"\(")):
            vs.attention(q, k, v, causal=bad)
    for flag in (True, False):
        np.testing.assert_array_equal(
            np.asarray(vs.attention(q, k, v, causal=np.bool_(flag), backend="xla").data),
            np.asarray(vs.attention(q, k, v, causal=flag, backend="xla").data))


def test_attention_scale_must_be_a_positive_finite_number():
    q, k, v = _qkv_dv([3, 5], [3, 5], d=4, dv=4)
    for bad in ("x", [0.5], True, object()):
        with pytest.raises(vs.VSLATypeError, match="scale must be a positive finite number"):
            vs.attention(q, k, v, scale=bad)
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be a positive finite number") as e:
            vs.attention(q, k, v, scale=bad)
        assert isinstance(e.value, vs.VSLAError)
    ref = np.asarray(vs.attention(q, k, v, scale=0.5, backend="xla").data)
    for ok in (np.float32(0.5), 0.5, jnp.asarray(0.5)):
        np.testing.assert_allclose(
            np.asarray(vs.attention(q, k, v, scale=ok, backend="xla").data), ref)
    default = vs.attention(q, k, v, backend="xla")  # None: 1 / sqrt(D) = 0.5 for D = 4
    np.testing.assert_allclose(np.asarray(default.data), ref)


# -- dtypes and the empty stack ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_half_precision_tensors_are_accepted(dtype):
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, -1.0])
    for make in (np.asarray, jnp.asarray):
        x = vs.tensor(make(a.astype(dtype)))
        assert x.dtype == dtype
        got = vs.conv(x, vs.tensor(make(b.astype(dtype)))).to_numpy()
        np.testing.assert_allclose(np.asarray(got, np.float32), np.convolve(a, b))
    batch = vs.stack([a.astype(dtype), b.astype(dtype)])
    assert batch.dtype == dtype and batch.lengths.tolist() == [[3], [2]]
    with pytest.raises(vs.VSLATypeError, match=r"<U1.*|bfloat16"):
        vs.tensor(np.array(["a", "b"]))


def test_empty_stack_is_an_empty_batch_and_attention_says_why_it_needs_features():
    empty = vs.stack([], rank=1)  # documented: a batch of zero items
    assert empty.batch_shape == (0,) and empty.to_list() == []
    with pytest.raises(vs.ShapeError, match="empty batch"):
        vs.attention(empty, empty, empty)
    e = vs.from_padded(np.zeros((0, 4, 2, 4), np.float32), np.zeros((0, 1), int), rank=1)
    for backend in KNOWN_BACKENDS:
        out = vs.attention(e, e, e, backend=backend)
        assert out.batch_shape == (0,) and out.features == (2, 4)
