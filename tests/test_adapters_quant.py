"""Q adapters against NumPy references: scales, int8 matmul, int4 packing, fp8, RPTQ."""

import warnings

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given

from icd_jax.adapters import meta as meta_lib
from icd_jax.adapters import quant
from icd_jax.errors import AdapterWarning, ConfigError, ShapeError
from tests.jaxprs import dot_dtypes


def np_quant(w, qmax, g):
    """Independent reference: symmetric absmax per (group of g rows, column)."""
    rows, cols = w.shape
    g = rows if g is None else g
    out = np.empty_like(w, dtype=np.float64)
    scales = np.empty((rows // g, cols))
    for i in range(rows // g):
        blk = w[i * g:(i + 1) * g].astype(np.float64)
        for j in range(cols):
            a = np.abs(blk[:, j]).max()
            s = a / qmax if a > 0 else 1.0
            scales[i, j] = s
            out[i * g:(i + 1) * g, j] = np.clip(np.round(blk[:, j] / s), -qmax, qmax) * s
    return out, scales


@pytest.mark.parametrize("dtype,g", [("int8", None), ("int8", 8), ("int4", 8), ("int4", None)])
def test_group_scales_are_per_group(rng, dtype, g):
    w = rng.standard_normal((32, 6)).astype(np.float32)
    w[3, 2] = 40.0  # an outlier changes only its own group's scale
    q = quant.quantize(w, dtype, g)
    ref, scales = np_quant(w, quant.QMAX[dtype], g)
    np.testing.assert_allclose(np.asarray(q.scale), scales, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, rtol=1e-5, atol=1e-6)
    assert q.scale.shape == ((1 if g is None else 32 // g), 6)


def test_int4_packs_two_per_byte(rng):
    v = jnp.asarray(rng.integers(-8, 8, (10, 3)), jnp.int8)
    p = quant.pack_int4(v)
    assert p.dtype == jnp.uint8 and p.shape == (5, 3)
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(p)), np.asarray(v))
    q = quant.quantize(rng.standard_normal((64, 16)), "int4", 16)
    assert q.nbytes == 64 * 16 // 2 + 4 * 16 * 4


def test_int8_matmul_is_int32_and_matches_dequantised_product(rng):
    x = rng.standard_normal((7, 48)).astype(np.float32)
    w = rng.standard_normal((48, 5)).astype(np.float32)
    q = quant.quantize(w, "int8", act="dynamic")
    xq, sx = quant.quantize_rows(jnp.asarray(x))
    acc = quant.int8_dot(xq, q.q)
    assert acc.dtype == jnp.int32
    hlo = jax.jit(quant.int8_dot).lower(xq, q.q).as_text()
    assert "i8" in hlo and "i32" in hlo
    # the int8 product equals the product of the dequantised operands within rounding
    deq = (np.asarray(xq, np.float64) * np.asarray(sx)) @ np.asarray(q.dequantize(), np.float64)
    got = np.asarray(quant.matmul(jnp.asarray(x), q))
    np.testing.assert_allclose(got, deq, rtol=1e-5, atol=1e-4)
    assert meta_lib.rel_error(x @ w, got) < 0.02


def test_static_activation_scale_clips(rng):
    x = rng.standard_normal((4, 16)).astype(np.float32)
    w = rng.standard_normal((16, 3)).astype(np.float32)
    s = 0.5 / 127
    q = quant.quantize(w, "int8", act="static", act_scale=s)
    xq = np.clip(np.round(x / s), -127, 127) * s
    ref = xq @ np.asarray(q.dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(quant.matmul(jnp.asarray(x), q)), ref, rtol=1e-5,
                               atol=1e-5)


def test_fp8_round_trips_through_ml_dtypes(rng):
    w = rng.standard_normal((16, 4)).astype(np.float32)
    q = quant.quantize(w, "fp8")
    assert q.q.dtype == jnp.float8_e4m3fn
    scale = np.abs(w).max(axis=0, keepdims=True) / 448.0
    ref = (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, rtol=1e-6)
    assert q.nbytes == 16 * 4 + 4 * 4


def test_range_order_lowers_group_error_with_outlier_channels(rng):
    x = rng.standard_normal((256, 64))
    x[:, rng.choice(64, 6, replace=False)] *= 30  # outlier channels scattered
    base = quant.act_group_error(x, 16)
    sorted_err = quant.act_group_error(x, 16, order=quant.range_order(np.abs(x).max(0)))
    assert sorted_err < 0.8 * base


@given(rows=st.sampled_from([8, 16, 32]), cols=st.integers(1, 5), g=st.sampled_from([2, 4, 8]),
       dtype=st.sampled_from(["int8", "int4"]), seed=st.integers(0, 100))
def test_quantize_law_error_bounded_by_half_step(rows, cols, g, dtype, seed):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    q = quant.quantize(w, dtype, g)
    step = np.repeat(np.asarray(q.scale), g, axis=0)
    assert (np.abs(np.asarray(q.dequantize()) - w) <= 0.5 * step + 1e-6).all()


def test_apply_quant_meta_and_errors(rng):
    w = rng.standard_normal((32, 8)).astype(np.float32)
    out, m = quant.apply_quant(w, "int4", group_size=8)
    assert isinstance(out, quant.Quantized)
    assert set(meta_lib.KEYS) <= set(m)
    assert m["ok"] is True and isinstance(m["error"]["rel_fro"], float)
    assert m["delta_layout"]["repermute"] is True and isinstance(m["delta_layout"]["reason"], str)
    assert m["bytes"] < m["bytes_f32"] and isinstance(m["expected_quality"], str)
    with pytest.raises(ShapeError, match="2-D"):
        quant.apply_quant(w[0])
    with pytest.raises(ShapeError, match="NaN"):
        quant.apply_quant(np.full((4, 4), np.nan))
    with pytest.raises(ConfigError, match="groups of 5"):
        quant.apply_quant(w, "int8", group_size=5)
    with pytest.raises(ConfigError, match="dtype"):
        quant.apply_quant(w, "int3")
    with pytest.raises(ConfigError, match="method"):
        quant.apply_quant(w, method="gptq")


def test_apply_quant_falls_back_to_a_no_op(rng, monkeypatch):
    w = rng.standard_normal((8, 4)).astype(np.float32)

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(quant, "quantize", boom)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, m = quant.apply_quant(w)
    assert any(issubclass(r.category, AdapterWarning) for r in rec)
    assert m["ok"] is False and "kaput" in m["warning"]
    np.testing.assert_array_equal(out, w)
    with pytest.raises(RuntimeError):
        quant.apply_quant(w, strict=True)


def test_smoothquant_factors_keep_the_product_and_shrink_outliers(rng):
    x = rng.standard_normal((32, 16)).astype(np.float32)
    x[:, 3] *= 50  # an activation outlier channel
    w = rng.standard_normal((16, 8)).astype(np.float32)
    s = quant.smooth_factors(np.abs(x).max(0), np.abs(w).max(1), 0.5)
    ref = np.sqrt(np.abs(x).max(0)) / np.sqrt(np.abs(w).max(1))
    np.testing.assert_allclose(s, ref, rtol=1e-5)
    plain = quant.quantize(w, "int8", act="dynamic")
    smooth = quant.quantize(w, "int8", act="dynamic", smooth=s)
    np.testing.assert_allclose(np.asarray(smooth.dequantize()), w, atol=0.05)
    e_plain = meta_lib.rel_error(x @ w, np.asarray(quant.matmul(jnp.asarray(x), plain)))
    e_smooth = meta_lib.rel_error(x @ w, np.asarray(quant.matmul(jnp.asarray(x), smooth)))
    assert e_smooth < e_plain
    fused = quant.concat_out([smooth, smooth])
    np.testing.assert_allclose(np.asarray(quant.matmul(jnp.asarray(x), fused))[:, :8],
                               np.asarray(quant.matmul(jnp.asarray(x), smooth)), rtol=1e-6)
    with pytest.raises(ShapeError, match="smooth"):
        quant.quantize(w, "int8", smooth=s[:3])


# -- real int8 arithmetic: every int8 mode runs int8 x int8 -> int32, checked on the jaxpr --
def np_round(x, s):
    return np.clip(np.round(x / s), -127, 127)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("g", [None, 8])
def test_int8_modes_match_a_numpy_reference_and_run_int8_dots(rng, dtype, act, g):
    x = rng.standard_normal((13, 32)).astype(np.float32)
    w = rng.standard_normal((32, 6)).astype(np.float32)
    if act == "static":
        a = np.abs(x).max(0) * 1.5
        sc = np.float32(a.max() / 127) if g is None else (a.reshape(-1, g).max(1) / 127)
    else:
        sc = None
    k = quant.quantize(w, dtype, g, act=act, act_scale=sc)
    vals = np.asarray(quant.int_values(k), np.float64)
    sw = np.asarray(k.scale, np.float64)
    gg = 32 if g is None else g
    ref = np.zeros((13, 6))
    for i in range(32 // gg):
        xs = x[:, i * gg:(i + 1) * gg].astype(np.float64)
        if act == "dynamic":
            amax = np.abs(x if g is None else xs).max(1, keepdims=True)
            sx = np.where(amax > 0, amax / 127, 1.0)
        else:
            sx = np.float64(np.asarray(sc).reshape(-1)[0 if g is None else i])
        ref += (np_round(xs, sx) @ vals[i * gg:(i + 1) * gg]) * sx * sw[0 if g is None else i]
    got = np.asarray(quant.matmul(jnp.asarray(x), k))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert quant.compute(k) == ("int8" if g is None else "int8-grouped")
    dots = dot_dtypes(lambda x, k: quant.matmul(x, k), jnp.asarray(x), k)
    assert dots and all(d == ("int8", "int8") for d in dots)
    assert len(dots) == 32 // gg


def test_weight_only_and_fp8_say_so_and_plain_arrays_are_float(rng):
    w = rng.standard_normal((16, 4)).astype(np.float32)
    assert quant.compute(quant.quantize(w, "int8")) == "float32-weight-only"
    assert quant.compute(quant.quantize(w, "fp8", act="dynamic")) == "float32-weight-only"
    assert quant.compute(w) == "float32"
    dots = dot_dtypes(lambda x, k: quant.matmul(x, k), jnp.ones((3, 16)), quant.quantize(w))
    assert dots == [("float32", "float32")]


@pytest.mark.parametrize("g", [None])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_static_scales_fold_into_the_weights(rng, g, alpha):
    """Static per-tensor int8 with tree.quantize: x / d rounded at 1/127, W' = diag(d) W
    per output channel; one int8 dot, equal to the NumPy arithmetic of that scheme."""
    from icd_jax.adapters import tree

    x = rng.standard_normal((20, 16)).astype(np.float32) * rng.uniform(0.1, 5, 16)
    w = rng.standard_normal((16, 5)).astype(np.float32)
    absmax = {"l/kernel": np.abs(x).max(0)}
    qp, meta = tree.quantize({"l": {"kernel": w}}, ["l/kernel"], "int8", g, act="static",
                             act_absmax=absmax, smooth_alpha=alpha)
    k = qp["l"]["kernel"]
    assert quant.compute(k) == "int8" and k.group_size is None
    assert meta["compute"] == {"int8": 1} and meta["int8_kernels"] == ["l/kernel"]
    d = np.asarray(k.smooth, np.float64)
    if alpha is None:  # d = absmax of the channel's group (of all channels for None)
        gg = 16 if g is None else g
        np.testing.assert_allclose(d, np.repeat(absmax["l/kernel"].reshape(-1, gg).max(1), gg),
                                   rtol=1e-6)
    w2 = d[:, None] * w
    sw = np.where(np.abs(w2).max(0) > 0, np.abs(w2).max(0) / 127, 1)
    ref = (np_round(x / d, 1 / 127) @ np_round(w2, sw)) / 127 * sw
    np.testing.assert_allclose(np.asarray(quant.matmul(jnp.asarray(x), k)), ref, rtol=2e-5,
                               atol=2e-5)
    assert dot_dtypes(lambda x, k: quant.matmul(x, k), jnp.asarray(x), k) == [("int8", "int8")]
    # inside the calibrated range the product stays close to float
    assert meta_lib.rel_error(x @ w, ref) < 0.05


def test_static_groups_run_grouped_int8(rng):
    from icd_jax.adapters import tree

    x = rng.standard_normal((20, 16)).astype(np.float32) * rng.uniform(0.1, 5, 16)
    w = rng.standard_normal((16, 5)).astype(np.float32)
    qp, meta = tree.quantize({"l": {"kernel": w}}, ["l/kernel"], "int8", 4, act="static",
                             act_absmax={"l/kernel": np.abs(x).max(0)})
    k = qp["l"]["kernel"]
    assert quant.compute(k) == "int8-grouped" and meta["compute"] == {"int8-grouped": 1}
    np.testing.assert_allclose(np.asarray(k.act_scale),
                               np.abs(x).max(0).reshape(4, 4).max(1) / 127, rtol=1e-6)
    assert dot_dtypes(lambda x, k: quant.matmul(x, k), jnp.asarray(x), k) == [
        ("int8", "int8")] * 4
    assert meta_lib.rel_error(x @ w, np.asarray(quant.matmul(jnp.asarray(x), k))) < 0.02


def test_take_rows_keeps_int8(rng):
    w = rng.standard_normal((16, 4)).astype(np.float32)
    k = quant.quantize(w, "int8", act="dynamic", smooth=np.linspace(1, 2, 16))
    rows = jnp.array([3, 0, 9])
    sub = quant.take_rows(k, rows)
    assert sub.q.dtype == jnp.int8 and sub.q.shape == (3, 4) and sub.smooth.shape == (3,)
    x = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    full = jnp.zeros((5, 16)).at[:, rows].set(x)
    np.testing.assert_allclose(quant.matmul(x, sub), quant.matmul(full, k), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ConfigError, match="per-channel"):
        quant.take_rows(quant.quantize(w, "int8", 4, act="dynamic"), rows)
