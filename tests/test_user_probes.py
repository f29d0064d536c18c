"""Plain calls a new user writes first, and what they get wrong: each case was a bug
found by probing the public API (a crash, a silent wrong answer or a misleading error)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsla_jax as vs
from vsla_jax.errors import LengthError, ModelMismatchError, VSLATypeError

BACKENDS = ("xla", "bucketed", "tiled", "pallas", "cpu")


# -- stack --------------------------------------------------------------------------------
def test_stack_of_unbatched_vartensors_keeps_every_item():
    xs = [np.arange(3, dtype=np.float32) + 1, np.arange(5, dtype=np.float32) - 7]
    batch = vs.stack(xs)
    for items, want in ((list(batch), xs), ([batch[1], batch[0]], xs[::-1]),
                        ([vs.tensor([1.0, 2.0])], [np.array([1.0, 2.0])])):
        out = vs.stack(items)
        assert out.batch_shape == (len(want),)
        for got, ref in zip(out.to_list(), want):
            np.testing.assert_array_equal(got, ref)


def test_stack_refuses_a_model_other_than_its_items():
    items = [vs.tensor([1.0, 2.0], model="B")]
    assert vs.stack(items).model == "B"
    with pytest.raises(ModelMismatchError, match="model='A'"):
        vs.stack(items, model="A")


# -- conv broadcasting --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", "direct", "fft"])
@pytest.mark.parametrize("features", [(), (2,)])
def test_conv_broadcasts_one_item_against_many(method, features):
    rng = np.random.default_rng(0)
    one = [rng.standard_normal((40, *features)).astype(np.float32)]
    many = [rng.standard_normal((n, *features)).astype(np.float32) for n in (1, 5, 30, 2)]
    a, k = vs.stack(one, rank=1), vs.stack(many, rank=1)

    def ref(x, y):
        if not features:
            return np.convolve(x, y)
        return np.stack([np.convolve(x[:, c], y[:, c]) for c in range(features[0])], -1)

    for x, y, xs, ys in ((a, k, one * 4, many), (k, a, many, one * 4)):
        out = vs.conv(x, y, method=method)
        assert out.batch_shape == (4,)
        for got, p, q in zip(out.to_list(), xs, ys):
            np.testing.assert_allclose(got, ref(p, q), rtol=1e-4, atol=1e-4)


# -- lengths dtype ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8, jnp.int16])
def test_vartensor_casts_narrow_integer_lengths_to_int32(dtype):
    a = vs.VarTensor(jnp.ones(30), jnp.array([20], dtype), model="B")
    assert a.lengths.dtype == jnp.int32
    assert int(vs.kron(a, a).lengths[0]) == 400  # uint8 wrapped to 144, int8 to -112
    data = jnp.zeros(300).at[:10].set(1.0)
    x = vs.VarTensor(data, jnp.array([10], dtype))
    assert float(vs.sum(x)) == 10.0


def test_vartensor_rejects_wide_or_float_jax_lengths():
    with pytest.raises(VSLATypeError, match="integers"):
        vs.VarTensor(jnp.ones(4), jnp.array([2.0]))
    with jax.enable_x64(True):
        with pytest.raises(LengthError, match="int32"):
            vs.VarTensor(jnp.ones(4), jnp.array([2**40], jnp.int64))


# -- scale and the typed errors of the jitted ops ------------------------------------------
def test_scale_promotes_like_jax():
    x = vs.tensor(np.array([1, 2, 3]), dtype=np.int32)
    np.testing.assert_allclose((x * 0.5).to_numpy(), [0.5, 1.0, 1.5])
    np.testing.assert_allclose((vs.tensor([1.0, 2.0]) * 1j).to_numpy(), [1j, 2j])
    assert vs.scale(vs.tensor([1.0, 2.0]), 2.5).dtype == jnp.float32
    for bad in ("x", True, None):
        with pytest.raises(VSLATypeError, match="scale: s must be a number"):
            vs.scale(x, bad)


@pytest.mark.parametrize("call, message", [
    (lambda a: a + np.ones(3), "add: b must be a VarTensor, got ndarray"),
    (lambda a: a - 1, "sub: b must be a VarTensor, got int"),
    (lambda a: 1 + a, "add: a must be a VarTensor, got int"),
    (lambda a: 2.0 - a, "sub: a must be a VarTensor, got float"),
    (lambda a: vs.add(a, "x"), "add: b must be a VarTensor, got str"),
    (lambda a: vs.kron(a, [1.0]), "kron: b must be a VarTensor, got list"),
    (lambda a: vs.sum(np.ones(3)), "sum: x must be a VarTensor, got ndarray"),
    (lambda a: vs.mean([1.0]), "mean: x must be a VarTensor, got list"),
])
def test_ops_name_what_the_user_passed(call, message):
    with pytest.raises(VSLATypeError, match=message):
        call(vs.tensor([1.0, 2.0, 3.0]))


def test_ops_still_check_under_jit():
    a = vs.tensor([1.0, 2.0])
    f = jax.jit(lambda d: vs.add(a, d))
    with pytest.raises(VSLATypeError, match="add: b must be a VarTensor, got a traced"):
        f(jnp.ones(2))


# -- attention: non-finite values ------------------------------------------------------------
def _batch(rng, lengths, h=2, d=4, cap=8):
    data = np.zeros((len(lengths), cap, h, d), np.float32)
    for i, n in enumerate(lengths):
        data[i, :n] = rng.uniform(0.5, 1.5, (n, h, d))
    return data, np.asarray(lengths)[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_slack_with_nan_or_inf_never_reaches_results(backend):
    rng = np.random.default_rng(1)
    data, lens = _batch(rng, [3, 8, 1, 5])
    clean = vs.VarTensor(jnp.asarray(data), lens)
    want = vs.attention(clean, clean, clean, backend="xla").to_padded()
    mask = np.arange(8)[None, :, None, None] < lens[:, :, None, None]
    for junk in (np.nan, np.inf, -np.inf):
        x = vs.VarTensor(jnp.asarray(np.where(mask, data, junk)), lens)
        got = vs.attention(x, x, x, backend=backend).to_padded()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_inside_an_item_is_nan_on_every_backend(backend):
    q = np.ones((3, 1, 2), np.float32)
    q[1, 0, 0] = np.nan
    x = vs.stack([q, np.ones((2, 1, 2), np.float32)], rank=1)
    got = vs.attention(x, x, x, backend=backend).to_list()
    assert np.isnan(got[0]).any()  # numpy's softmax attention is NaN there too
    np.testing.assert_allclose(got[1], np.ones((2, 1, 2)))  # the other item is untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gradients_ignore_an_infinite_cotangent_in_the_slack(backend):
    # e.g. the cotangent of sum(log(o.data)) is inf on the zero slack of o
    rng = np.random.default_rng(2)
    data, lens = _batch(rng, [3, 7, 0, 8])
    lens_j = jnp.asarray(lens)

    def f(d):
        t = vs.VarTensor(d, lens_j)
        return vs.attention(t, t, t, backend=backend).data

    out, vjp = jax.vjp(f, jnp.asarray(data))
    mask = np.arange(8)[None, :, None, None] < lens[:, :, None, None]
    g = rng.standard_normal(out.shape).astype(np.float32)
    (want,) = vjp(jnp.asarray(np.where(mask, g, 0)))
    (got,) = vjp(jnp.asarray(np.where(mask, g, np.inf)))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- attention: dtypes ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pallas_attention_runs_under_x64(dtype):
    with jax.enable_x64(True):
        x = vs.stack([np.random.default_rng(3).standard_normal((5, 2, 8)).astype(dtype)],
                     rank=1)
        got = vs.attention(x, x, x, backend="pallas").to_padded()
        want = vs.attention(x, x, x, backend="xla").to_padded()
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_xla_attention_scores_half_precision_in_float32():
    # every real score (-62,500) lies below float16's masking value (-45,852): scored in
    # float16, the padded keys would outrank the real ones
    q = np.array([[[250.0]], [[250.0]]], np.float16)
    k = np.array([[[-250.0]], [[-225.0]]], np.float16)
    v = np.array([[[1.0]], [[3.0]]], np.float16)
    Q, K, V = (vs.stack([t], rank=1) for t in (q, k, v))
    for backend in ("xla", "bucketed", "cpu"):
        got = vs.attention(Q, K, V, backend=backend, scale=1.0).to_list()[0]
        np.testing.assert_allclose(np.asarray(got, np.float32).ravel(), [3.0, 3.0])


# -- indexing, padding, construction -----------------------------------------------------------
def test_batch_index_of_a_wrong_type_is_a_typed_error():
    b = vs.stack([np.ones(3, np.float32), np.ones(5, np.float32)])
    for index in ("a", 1.0, np.array([0.0]), np.array([], np.float32)):
        with pytest.raises(VSLATypeError, match="batch index"):
            b[index]
    assert b[[]].batch_shape == (0,)
    assert b[np.array([True, False])].batch_shape == (1,)
    with pytest.raises(IndexError, match="index 7 is out of range"):
        b[np.array(7)]


@pytest.mark.parametrize("multiple", [0, -1, 2.5, True])
def test_pad_batch_needs_a_positive_integer(multiple):
    with pytest.raises(vs.ShapeError, match="multiple must be a positive integer"):
        vs.pad_batch(vs.stack([np.ones(3, np.float32)]), multiple)


def test_vartensor_of_a_string_is_a_typed_error():
    with pytest.raises(VSLATypeError, match="data must be an array"):
        vs.VarTensor("abc", [1])
    with pytest.raises(VSLATypeError, match="lengths must be an array"):
        vs.VarTensor(np.ones(3), "x")


def test_vartensor_equality_is_identity():
    a, b = vs.tensor([1.0]), vs.tensor([1.0])
    assert a == a and a != b and a in [a] and a not in [b] and len({a, b}) == 2


# -- second probe: plans, dtypes, empty capacities, lengths known under jit ----------------
@pytest.mark.parametrize("plan", ["padded", "bucketed", "blocked", "auto"])
def test_conv_of_a_batch_with_a_one_item_batch(plan):
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(n).astype(np.float32) for n in (1, 1000, 3, 0, 64, 65)]
    k = rng.standard_normal(300).astype(np.float32)
    policy = vs.ConvPolicy(plan=plan, cpu_kernels=False)
    for method in ("direct", "fft"):
        out = vs.conv(vs.stack(xs), vs.stack([k]), method=method, policy=policy)
        swapped = vs.conv(vs.stack([k]), vs.stack(xs), method=method, policy=policy)
        for y in (out, swapped):
            for got, x in zip(y.to_list(), xs):
                want = np.convolve(x, k) if x.size else np.zeros(0)
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_conv_gradient_through_a_shared_one_item_kernel():
    rng = np.random.default_rng(5)
    x = vs.stack([rng.standard_normal(n).astype(np.float32) for n in (3, 20, 5)])
    k = vs.stack([rng.standard_normal(4).astype(np.float32)])
    grads = []
    for plan in ("padded", "bucketed", "blocked"):
        policy = vs.ConvPolicy(plan=plan, cpu_kernels=False)
        f = lambda d, p=policy: jnp.sum(vs.conv(x, vs.VarTensor(d, k.lengths), policy=p).data)
        grads.append(np.asarray(jax.grad(f)(k.data)))
    for g in grads[1:]:
        np.testing.assert_allclose(g, grads[0], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_conv_of_half_floats_through_fft(dtype):
    a = np.linspace(-1, 1, 300).astype(dtype)
    b = np.linspace(1, -1, 150).astype(dtype)
    want = np.convolve(a.astype(np.float64), b.astype(np.float64))
    for method in ("auto", "fft"):
        out = vs.conv(vs.tensor(a), vs.tensor(b), method=method)
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out.to_numpy(), np.float64), want, atol=0.5)
    (packed,) = vs.conv_packed([a], [b[:2]]).to_list()  # bfloat16 is a float here too
    assert packed.dtype == dtype
    np.testing.assert_allclose(np.asarray(packed, np.float64),
                               np.convolve(a.astype(np.float64), b[:2].astype(np.float64)),
                               atol=0.05)


def test_conv_and_attention_with_a_zero_capacity_operand():
    empty = vs.from_padded(np.zeros((2, 0), np.float32), np.zeros((2, 1), np.int32))
    x = vs.stack([np.ones(3, np.float32), np.ones(2, np.float32)])
    for a, b in ((empty, x), (x, empty)):
        for method in ("auto", "direct", "fft"):
            out = vs.conv(a, b, method=method)
            assert out.capacity == (x.capacity[0] - 1,)
            assert [o.size for o in out.to_list()] == [0, 0]
    zq = vs.from_padded(np.zeros((2, 0, 2, 4), np.float32), np.zeros((2, 1), np.int32),
                        rank=1)
    kq = vs.stack([np.ones((3, 2, 4), np.float32)] * 2, rank=1)
    for backend in BACKENDS:
        assert vs.attention(zq, kq, kq, backend=backend).data.shape == (2, 0, 2, 4)
        out = vs.attention(kq, zq, zq, backend=backend)
        assert out.data.shape == kq.data.shape and not np.asarray(out.data).any()


def test_numpy_lengths_stay_known_inside_jit():
    a = vs.stack([np.ones(n, np.float32) for n in (3, 40, 7)])
    k = vs.stack([np.ones(2, np.float32)] * 3)
    lengths = np.asarray(a.lengths)
    policy = vs.ConvPolicy(plan="bucketed", cpu_kernels=False)
    want = np.asarray(vs.conv(a, k, policy=policy).data)

    def f(d):
        x = vs.VarTensor(d, lengths)
        assert x.host_lengths is not None and x.lengths_checked
        assert vs.from_padded(d, lengths).host_lengths is not None
        np.testing.assert_array_equal(x.host_lengths, lengths)
        return vs.conv(x, k, policy=policy).data, x.to_padded()

    for _ in range(2):  # the plan cache must not keep the first trace's tracers
        out, padded = jax.jit(f)(a.data)
        np.testing.assert_allclose(out, want)
        assert padded.shape == (3, 40)
    out = jax.jit(lambda d: vs.conv(vs.VarTensor(d, a.lengths), k, policy=policy).data)(
        a.data)  # the same plan key, closed over as a JAX array
    np.testing.assert_allclose(out, want)


def test_hessian_through_pallas_attention_falls_back_to_xla():
    q0 = jnp.asarray(np.random.default_rng(6).standard_normal((3, 1, 2)), jnp.float32)

    def f(backend):
        def loss(q):
            x = vs.stack([q], rank=1)
            return jnp.sum(vs.attention(x, x, x, backend=backend).data ** 2)
        return loss

    np.testing.assert_allclose(jax.hessian(f("pallas"))(q0), jax.hessian(f("xla"))(q0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", range(1, 9))
def test_octave_ladder_has_every_power_of_two_and_its_ratio(steps):
    minimum = 16
    policy = vs.CapacityPolicy.octave(steps, minimum)
    assert all(policy.bucket(1 << k) == 1 << k for k in range(4, 13))
    worst = max(policy.bucket(n) / n for n in range(minimum, 5000))
    assert worst <= 1 + 1 / steps + 1e-12


def test_bucketize_checks_its_rank():
    with pytest.raises(vs.ShapeError, match="rank must be an integer in"):
        vs.bucketize([np.ones(3)], rank=2)
    with pytest.raises(vs.ShapeError, match="a scalar item has none"):
        vs.bucketize([1.0, 2.0])


# -- third probe (2026-12-07) ---------------------------------------------------------------
def test_heterogeneity_profile_names_bad_lengths():
    with pytest.raises(LengthError, match="negative lengths"):
        vs.heterogeneity_profile([3, -1])
    with pytest.raises(LengthError, match="negative kernel lengths"):
        vs.heterogeneity_profile([3, 4], [2, -2])
    with pytest.raises(vs.ShapeError, match="3 kernel lengths for 2 lengths"):
        vs.heterogeneity_profile([3, 4], [1, 2, 3])
    assert vs.heterogeneity_profile([3, 4], 5).n == 2


def test_items_of_a_batch_keep_host_lengths_also_under_jit():
    batch = vs.stack([np.ones((3, 2, 4), np.float32), np.ones((5, 2, 4), np.float32)])
    for item, n in zip(batch, (3, 5)):
        assert item.host_lengths.tolist() == [n, 2, 4]
    assert batch[[1, 0]].host_lengths[:, 0].tolist() == [5, 3]

    def inside(x):  # a stacked (rank-3) item needs concrete lengths to find its heads
        t = vs.tensor(x)
        assert t.host_lengths.tolist() == [5, 2, 4]
        return vs.attention(t, t, t).data.sum()

    jax.jit(jax.grad(inside))(jnp.ones((5, 2, 4)))


def test_vartensor_over_shape_specs_is_abstract_for_eval_shape():
    spec = vs.VarTensor(jax.ShapeDtypeStruct((3, 8), jnp.float32),
                        jax.ShapeDtypeStruct((3, 1), jnp.int32))
    assert spec.host_lengths is None and not spec.lengths_checked
    fn = lambda a: vs.conv(a, vs.tensor([1.0, 2.0]))
    out = jax.eval_shape(fn, spec)
    real = fn(vs.VarTensor(np.ones((3, 8), np.float32), [[1], [8], [0]]))
    assert out.data.shape == real.data.shape and out.lengths.shape == (3, 1)


def test_exported_functions_of_vartensors_serialize_and_run():
    q = vs.stack([np.ones((n, 2, 4), np.float32) for n in (3, 5)], rank=1)
    fn = jax.jit(lambda x: vs.attention(x, x, x, backend="xla") + x)
    exp = jax.export.export(fn)(q)
    back = jax.export.deserialize(exp.serialize())
    got = back.call(q)
    assert isinstance(got, vs.VarTensor)
    np.testing.assert_allclose(got.data, fn(q).data, rtol=1e-6)


def test_ambient_ops_export_with_a_symbolic_batch():
    (b,) = jax.export.symbolic_shape("b")
    d = jax.ShapeDtypeStruct((b, 8), jnp.float32)
    n = jax.ShapeDtypeStruct((b, 1), jnp.int32)
    exp = jax.export.export(jax.jit(lambda d, n: (vs.VarTensor(d, n) * 2.0
                                                  + vs.VarTensor(d, n)).data))(d, n)
    x = vs.stack([np.arange(3.0, dtype=np.float32), np.ones(8, np.float32)])
    np.testing.assert_allclose(exp.call(x.data, x.lengths), 3 * x.data)


def test_shard_batch_takes_the_only_axis_of_a_mesh_or_names_the_axes():
    x = vs.stack([np.ones(n, np.float32) for n in (1, 2)])
    out = vs.shard_batch(x, vs.batch_mesh(axis="data"))
    assert out.data.sharding.spec[0] == "data"
    with pytest.raises(vs.ShapeError, match=r"no axis 'rows' \(its axes: \('data',\)\)"):
        vs.shard_batch(x, vs.batch_mesh(axis="data"), axis="rows")


def test_pallas_attention_in_float64_is_float64_accurate():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        q = vs.stack([rng.standard_normal((n, 2, 4)) for n in (5, 2)], rank=1)
        assert q.dtype == jnp.float64
        got = vs.attention(q, q, q, backend="pallas", causal=True).data
        want = vs.attention(q, q, q, backend="xla", causal=True).data
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("features", [(), (2,)])
def test_fft_conv_of_large_finite_items_stays_finite(features):
    # |x| ~ 1e36 with a long kernel: the exact result (|y| ~ 1e35) fits float32, but
    # unscaled spectra overflowed and the XLA engine's FFT returned NaN everywhere
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3000, *features)) * 1e36).astype(np.float32)
    k = (rng.standard_normal((2000, *features)) * 1e-3).astype(np.float32)
    policy = vs.ConvPolicy(cpu_kernels=False, calibrate=False)
    got = vs.conv(vs.stack([x], rank=1), vs.stack([k], rank=1), method="fft",
                  policy=policy).to_list()[0]
    x64, k64 = x.astype(np.float64), k.astype(np.float64)
    want = np.stack([np.convolve(x64[:, c], k64[:, c]) for c in range(x.shape[1])], 1) if (
        features) else np.convolve(x64, k64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# -- fourth probe: the rest of the public surface ------------------------------------------
@pytest.mark.parametrize("values, dtype, want", [
    (np.ones(200), np.int8, 1.0), (np.ones(256), np.uint8, 1.0),
    (np.array([True, True, False]), bool, 2 / 3)])
def test_mean_counts_in_float_whatever_the_data_dtype(values, dtype, want):
    got = vs.mean(vs.tensor(values.astype(dtype), dtype=dtype))
    assert float(got) == pytest.approx(want) and jnp.issubdtype(got.dtype, jnp.floating)


@pytest.mark.parametrize("values, dtype", [([100, 100], np.int8), ([50000], np.int32)])
def test_norm_of_integer_data_does_not_wrap(values, dtype):
    got = vs.norm(vs.tensor(np.array(values, dtype), dtype=dtype))
    assert float(got) == pytest.approx(np.linalg.norm(np.array(values, np.float64)))


def test_from_padded_with_rank_reads_lengths_ending_in_the_rank():
    data = np.arange(20.0, dtype=np.float32).reshape(4, 1, 5)
    lengths = [[1], [0], [1], [1]]
    x = vs.from_padded(data, lengths, rank=1)
    assert x.batch_shape == (4,) and x.capacity == (1,) and x.features == (5,)
    np.testing.assert_array_equal(x.to_padded(), vs.from_padded(data, lengths).to_padded())
    # a plain [B] vector with rank=1 is still B rank-1 items
    assert vs.from_padded(np.ones((3, 4)), [1, 2, 4], rank=1).batch_shape == (3,)


def test_to_padded_masks_a_slack_that_is_not_zero():
    x = vs.VarTensor(np.ones((2, 4), np.float32), [[2], [3]])
    want = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.float32)
    np.testing.assert_array_equal(x.to_padded(4), want)
    np.testing.assert_array_equal(jax.jit(lambda t: t.to_padded(4))(x), want)
    np.testing.assert_array_equal(x.to_padded(), want[:, :3])
    shifted = jax.tree.map(lambda a: a + 1 if a.dtype == jnp.float32 else a, x)
    np.testing.assert_array_equal(shifted.to_padded(4), 2 * want)


def test_numpy_on_the_left_defers_to_the_vartensor():
    a = vs.stack([np.ones(2, np.float32), np.ones(3, np.float32)])
    s = np.array([2.0, 3.0])
    for got in ((s * a).to_list(), (np.float64(2) * a).to_list()):
        assert all(isinstance(g, np.ndarray) for g in got)
    np.testing.assert_array_equal((s * a).to_list()[1], [3, 3, 3])
    with pytest.raises(VSLATypeError, match="got ndarray"):
        np.ones(2) + vs.tensor([1.0, 2.0])
    with pytest.raises(VSLATypeError, match="is not an array: use .to_numpy"):
        np.asarray(a)


def test_bool_tensors_have_no_negation_or_difference():
    b = vs.tensor(np.array([True, False]), dtype=bool)
    for f in (lambda: -b, lambda: b - b, lambda: vs.neg(b)):
        with pytest.raises(VSLATypeError, match="bool tensors have no negation"):
            f()
    i = vs.tensor(np.array([3, 4]), dtype=np.int32)
    np.testing.assert_array_equal((i - b).to_numpy(), [2, 4])  # promoted: defined


@pytest.mark.parametrize("call, error, needle", [
    (lambda: vs.stack([[1.0, 2.0]], "B"), VSLATypeError, "policy must be a vs.CapacityPolicy"),
    (lambda: vs.bucketize([[1.0]], "B"), VSLATypeError, "policy must be a vs.CapacityPolicy"),
    (lambda: vs.stack([[1.0]], dtype=str), VSLATypeError, "dtype must be numeric"),
    (lambda: vs.stack([[1.0]], dtype="foo"), VSLATypeError, "is not a NumPy/JAX dtype"),
    (lambda: vs.bucketize([[1.0]], dtype=object), VSLATypeError, "dtype must be numeric"),
    (lambda: vs.CapacityPolicy.octave(0), vs.PolicyError, "needs steps >= 1"),
    (lambda: vs.CapacityPolicy(growth=float("inf")), vs.PolicyError, "finite number > 1"),
    (lambda: vs.CapacityPolicy(growth=None), vs.PolicyError, "finite number > 1"),
    (lambda: vs.CapacityPolicy(minimum=2.5), VSLATypeError, "minimum must be an integer"),
    (lambda: vs.CapacityPolicy().bucket(8.7), LengthError, "must be an integer"),
    (lambda: vs.window(vs.stack([[1.0]]), True), vs.ShapeError, "positive integer"),
    (lambda: vs.window(vs.stack([[1.0]]), 2, partial="pad"), vs.ShapeError, "partial"),
    (lambda: vs.pyramid(vs.stack([[1.0]]), 0, 2), vs.ShapeError, "levels"),
    (lambda: vs.pad_batch([[1.0]], 2), VSLATypeError, "takes a VarTensor batch"),
    (lambda: vs.tensor([1.0, 2.0], rank=2), vs.ShapeError, "rank=2 needs items with at"),
    (lambda: vs.stack(5), VSLATypeError, "stack takes a sequence of items"),
    (lambda: vs.tensor([1.0, 2.0]) * np.ones(2), vs.ShapeError,
     "expected a scalar: the tensor is one item (to multiply by another ragged item, wrap"),
    (lambda: vs.bucketize([[1.0]], count_policy="x"), VSLATypeError,
     "bucketize count_policy: policy must be a vs.CapacityPolicy or None, got str"),
    (lambda: vs.LayoutBudget("3"), VSLATypeError, "max_layouts must be an integer"),
    (lambda: vs.LayoutBudget(-1), vs.PolicyError, "max_layouts must be >= 0"),
    (lambda: jax.jit(lambda x: len(vs.tensor(x).to_list()))(jnp.ones(3)), VSLATypeError,
     "use to_padded(capacity) inside it"),
])
def test_bad_arguments_get_typed_errors(call, error, needle):
    with pytest.raises(error, match=None) as e:
        call()
    assert needle in str(e.value), str(e.value)


def test_tensor_of_a_model_b_tensor_keeps_its_model():
    xb = vs.tensor([1.0, 2.0], model="B")
    assert vs.tensor(xb).model == "B" and vs.tensor([1.0]).model == "A"


def test_scale_by_an_int_past_jax_int_range_is_a_typed_error():
    x = vs.tensor(np.array([1, 2, 3], np.int32))
    with pytest.raises(VSLATypeError, match="does not fit in int"):
        vs.scale(x, 2**70)
    np.testing.assert_array_equal(vs.scale(x, 3).to_numpy(), [3, 6, 9])  # in range: as before
    np.testing.assert_allclose(vs.scale(x, 2.0**40).to_numpy(), np.array([1, 2, 3]) * 2.0**40)


@pytest.mark.parametrize("backend", ["auto", "xla", "bucketed", "tiled"])
def test_attention_with_empty_query_key_heads_averages_the_values(backend):
    """Head size 0 for q and k: every score is 0, so each query averages the values it
    may see (the default scale 1/sqrt(0) raised ZeroDivisionError)."""
    rng = np.random.default_rng(0)
    vals = [rng.standard_normal((n, 2, 5)).astype(np.float32) for n in (4, 1)]
    q = vs.stack([np.zeros((n, 2, 0), np.float32) for n in (3, 2)], rank=1)
    k = vs.stack([np.zeros((n, 2, 0), np.float32) for n in (4, 1)], rank=1)
    v = vs.stack(vals, rank=1)
    for got, x in zip(vs.attention(q, k, v, backend=backend).to_list(), vals):
        np.testing.assert_allclose(got, np.broadcast_to(x.mean(0), got.shape), atol=1e-6)
    causal = vs.attention(q, k, v, backend=backend, causal=True).to_list()[0]
    want = np.cumsum(vals[0], 0)[:3] / np.arange(1, 4)[:, None, None]
    np.testing.assert_allclose(causal, want, atol=1e-6)
