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
