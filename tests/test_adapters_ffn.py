"""Activation-sparse FFN down projection (XLA and Pallas-interpret) against a NumPy loop."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from icd_jax.adapters import ffn, meta
from icd_jax.adapters.ffn_pallas import pallas_sparse_down
from icd_jax.cost import inverse, tiles_touched
from icd_jax.errors import AdapterWarning, ConfigError, PermutationError, ShapeError


# -- NumPy reference ----------------------------------------------------------------------
def ref_mask(f, threshold=None, top_k=None):
    mag = np.abs(f)
    if threshold is not None:
        return mag > threshold
    out = np.zeros(f.shape, bool)
    for r in range(f.shape[0]):
        out[r, np.argsort(-mag[r], kind="stable")[:top_k]] = True
    return out


def ref_counts(active, tile, group):
    t, n = active.shape
    n_g = -(-t // group)
    c = np.zeros((n_g, n // tile), np.int64)
    for g in range(n_g):
        for j in range(n // tile):
            c[g, j] = active[g * group:(g + 1) * group, j * tile:(j + 1) * tile].sum()
    return c


def ref_sparse_down(f, w2, b2, active, tile, group, k_cap):
    """Naive loop over groups and tiles: returns (out float64, overflow, kept tiles)."""
    f, w2 = f.astype(np.float64), w2.astype(np.float64)
    counts = ref_counts(active, tile, group)
    out = np.zeros((f.shape[0], w2.shape[1]))
    overflow, kept = 0, []
    for g in range(counts.shape[0]):
        rows = slice(g * group, (g + 1) * group)
        act = [j for j in sorted(range(counts.shape[1]), key=lambda j: (-counts[g, j], j))
               if counts[g, j] > 0]
        keep = act[:k_cap]
        overflow += len(act) - len(keep)
        kept.append(sorted(keep))
        for j in keep:
            cols = slice(j * tile, (j + 1) * tile)
            out[rows] += f[rows, cols] @ w2[cols]
    return out + b2, overflow, kept


def data(t, n, h, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, n)).astype(dtype), rng.standard_normal((n, h)).astype(dtype),
            rng.standard_normal(h).astype(dtype))


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# -- XLA path -----------------------------------------------------------------------------
@pytest.mark.parametrize("t,group,tile,k_cap,sel", [
    (12, 1, 8, 8, dict(threshold=1.0)),     # k_cap = all tiles
    (13, 4, 8, 3, dict(threshold=1.0)),     # T not a multiple of group, overflow
    (13, 4, 8, 16, dict(threshold=1.0)),    # k_cap larger than the tile count
    (10, 3, 16, 2, dict(top_k=5)),
    (9, 1, 4, 4, dict(top_k=3)),
    (2, 2, 4, 3, dict(threshold=1.0)),      # G * k_cap < F // tile: the gather formulation
    (5, 4, 2, 4, dict(top_k=3)),            # gather, T not a multiple of group
    (1, 1, 8, 7, dict(threshold=0.5)),      # gather, single token
])
def test_sparse_down_matches_numpy_loop(t, group, tile, k_cap, sel):
    f, w2, b2 = data(t, 64, 16, seed=t + group)
    act = ref_mask(f, **sel)
    np.testing.assert_array_equal(np.asarray(ffn.active_mask(jnp.asarray(f), **sel)), act)
    out = ffn.sparse_down(f, w2, b2, jnp.asarray(act), tile=tile, group=group, k_cap=k_cap)
    ref, overflow, kept = ref_sparse_down(f, w2, b2, act, tile, group, k_cap)
    assert out.shape == (t, 16) and out.dtype == jnp.float32
    close(out, ref)
    tiles, valid, ovf = ffn.plan_tiles(jnp.asarray(act), tile=tile, group=group, k_cap=k_cap)
    assert tiles.shape == valid.shape == (-(-t // group), k_cap) and tiles.dtype == jnp.int32
    assert int(ovf) == overflow
    assert [sorted(np.asarray(tr)[np.asarray(v)].tolist()) for tr, v in zip(tiles, valid)] == kept
    assert np.all(np.asarray(tiles)[~np.asarray(valid)] == 0)


def test_overflow_keeps_the_most_active_tiles():
    act = np.zeros((2, 16), bool)  # tile 4: tiles 0..3, group of both tokens
    act[0, [0, 4, 5, 8, 9, 10, 12]] = True
    act[1, [13, 14]] = True          # counts: tile0 1, tile1 2, tile2 3, tile3 3
    tiles, valid, ovf = ffn.plan_tiles(jnp.asarray(act), tile=4, group=2, k_cap=2)
    assert np.asarray(tiles).tolist() == [[2, 3]] and bool(valid.all()) and int(ovf) == 2
    f, w2, b2 = data(2, 16, 8)
    out = ffn.sparse_down(f, w2, b2, jnp.asarray(act), tile=4, group=2, k_cap=2)
    close(out, f[:, 8:] @ w2[8:] + b2)


@pytest.mark.parametrize("t", [1, 11])  # t=1: "none" runs the gather formulation
def test_all_active_is_dense_and_none_active_is_bias(t):
    f, w2, b2 = data(t, 32, 8)
    k_cap = 4 if t > 1 else 3
    full = ffn.sparse_down(f, w2, b2, jnp.ones(f.shape, bool), tile=8, group=3, k_cap=4)
    close(full, f.astype(np.float64) @ w2 + b2)
    none = ffn.sparse_down(f, w2, b2, jnp.zeros(f.shape, bool), tile=8, group=3, k_cap=k_cap)
    close(none, np.broadcast_to(b2, (t, 8)))


@pytest.mark.parametrize("t", [1, 6])
def test_bfloat16_follows_f(t):
    f, w2, b2 = data(t, 32, 8)
    f16 = jnp.asarray(f, jnp.bfloat16)
    act = ref_mask(np.asarray(f16, np.float32), threshold=0.7)
    out = ffn.sparse_down(f16, w2, b2, jnp.asarray(act), tile=4, group=2, k_cap=3)
    assert out.dtype == jnp.bfloat16
    ref = ref_sparse_down(np.asarray(f16, np.float32), w2, b2, act, 4, 2, 3)[0]
    close(out, ref, tol=0.05)


def test_under_jit_with_traced_inputs():
    f, w2, b2 = data(10, 32, 8)

    @jax.jit
    def run(f, w2, b2):
        act = ffn.active_mask(f, threshold=0.8)
        return ffn.sparse_down(f, w2, b2, act, tile=8, group=2, k_cap=2)

    ref, _, _ = ref_sparse_down(f, w2, b2, ref_mask(f, threshold=0.8), 8, 2, 2)
    close(run(f, w2, b2), ref)


@given(t=st.integers(1, 24), n_tiles=st.integers(1, 6), tile=st.sampled_from([1, 2, 4, 8]),
       group=st.integers(1, 5), k_cap=st.integers(1, 7), thr=st.floats(0.0, 2.5),
       seed=st.integers(0, 2**16))
def test_hypothesis_against_reference(t, n_tiles, tile, group, k_cap, thr, seed):
    f, w2, b2 = data(t, n_tiles * tile, 4, seed=seed)
    act = ref_mask(f, threshold=thr)
    out = ffn.sparse_down(f, w2, b2, jnp.asarray(act), tile=tile, group=group, k_cap=k_cap)
    ref, overflow, _ = ref_sparse_down(f, w2, b2, act, tile, group, k_cap)
    close(out, ref)
    assert int(ffn.plan_tiles(jnp.asarray(act), tile=tile, group=group, k_cap=k_cap)[2]) == (
        overflow)


# -- counts -------------------------------------------------------------------------------
@pytest.mark.parametrize("t,group,tile", [(7, 1, 4), (7, 3, 4), (8, 8, 16), (5, 2, 1)])
def test_tile_counts_and_tiles_per_group(t, group, tile):
    act = np.random.default_rng(t).random((t, 32)) < 0.15
    counts = ffn.tile_counts(jnp.asarray(act), tile, group)
    assert counts.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(counts), ref_counts(act, tile, group))
    per = ffn.tiles_per_group(jnp.asarray(act), tile, group)
    np.testing.assert_array_equal(np.asarray(per), (ref_counts(act, tile, group) > 0).sum(1))
    if group == 1:  # cost.tiles_touched: mean active tiles per token under an order
        assert float(np.asarray(per).mean()) == pytest.approx(
            tiles_touched(act, np.arange(32), tile))


def test_choose_k_cap_buckets_the_observed_maximum():
    act = np.zeros((4, 64), bool)
    act[0, [0, 8, 16]] = True   # 3 tiles of 8 -> bucket 4
    assert ffn.choose_k_cap(act, 8, 1) == 4
    assert ffn.choose_k_cap(np.zeros((4, 64), bool), 8, 1) == 1
    assert ffn.choose_k_cap(np.ones((4, 48), bool), 8, 1) == 6   # capped at F // tile


# -- permutation --------------------------------------------------------------------------
def planted(t=40, n=64, h=16, block=8, seed=0):
    """Neurons co-active in blocks of ``block`` (exactly zero elsewhere), columns scattered."""
    rng = np.random.default_rng(seed)
    f_lat = np.zeros((t, n), np.float32)
    for r in range(t):
        for b in rng.choice(n // block, size=2, replace=False):
            f_lat[r, b * block:(b + 1) * block] = rng.uniform(0.5, 2.0, block)
    w_lat = rng.standard_normal((n, h)).astype(np.float32)
    scatter = rng.permutation(n)        # observed column c holds latent neuron scatter[c]
    b2 = rng.standard_normal(h).astype(np.float32)
    return f_lat[:, scatter], w_lat[scatter], b2, inverse(scatter)


def test_coactivation_permutation_lowers_tiles_and_preserves_output():
    f, w2, b2, perm = planted()
    kw = dict(threshold=0.1, tile=8, group=1, k_cap=8)
    out_id, m_id = ffn.apply_ffn_sparsity(f, w2, b2, **kw)
    out_p, m_p = ffn.apply_ffn_sparsity(f, w2, b2, perm=perm, **kw)
    assert m_p["tiles_per_token"] == pytest.approx(2.0)
    assert m_id["tiles_per_token"] > 4.0 and m_p["tile_frac"] < m_id["tile_frac"]
    assert m_p["tiles_per_token"] == pytest.approx(tiles_touched(f > 0.1, perm, 8))
    assert m_id["tiles_per_token"] == pytest.approx(tiles_touched(f > 0.1, np.arange(64), 8))
    dense = f.astype(np.float64) @ w2 + b2
    close(out_p, dense)
    close(out_id, dense)
    assert m_p["error"]["rel_fro"] < 1e-5 and m_p["overflow"] == 0
    assert m_p["settings"]["perm"] is True and m_p["delta_layout"]["repermute"] is True


# -- Pallas (interpret) -------------------------------------------------------------------
@pytest.mark.parametrize("t,group,k_cap", [(5, 1, 2), (7, 4, 3)])
def test_pallas_interpret_matches_xla_and_numpy(t, group, k_cap):
    f, w2, b2 = data(t, 32, 8, seed=t)
    act = ref_mask(f, threshold=1.0)
    tiles, valid, _ = ffn.plan_tiles(jnp.asarray(act), tile=8, group=group, k_cap=k_cap)
    out = pallas_sparse_down(jnp.asarray(f), jnp.asarray(w2), jnp.asarray(b2), tiles, valid,
                             tile=8, group=group, interpret=True)
    xla = ffn.sparse_down(f, w2, b2, jnp.asarray(act), tile=8, group=group, k_cap=k_cap)
    assert out.shape == (t, 8) and out.dtype == jnp.float32
    close(out, np.asarray(xla, np.float64), tol=1e-5)
    close(out, ref_sparse_down(f, w2, b2, act, 8, group, k_cap)[0])


def test_pallas_interpret_skips_invalid_slots_anywhere():
    f, w2, b2 = data(2, 16, 8)
    tiles = jnp.asarray([[3, 1, 2]], jnp.int32)
    valid = jnp.asarray([[False, True, True]])   # an invalid slot first, unpadded F, H
    out = pallas_sparse_down(jnp.asarray(f), jnp.asarray(w2[:, :6]), jnp.asarray(b2[:6]),
                             tiles, valid, tile=4, group=2, interpret=True)
    close(out, f[:, 4:12].astype(np.float64) @ w2[4:12, :6] + b2[:6])


# -- adapter contract ---------------------------------------------------------------------
def test_meta_has_every_key_with_documented_types():
    f, w2, b2 = data(9, 32, 8)
    out, m = ffn.apply_ffn_sparsity(f, w2, b2, top_k=4, tile=8, group=2)
    assert set(meta.KEYS) <= set(m)
    assert m["transform"] == "ffn_sparsity" and isinstance(m["settings"], dict)
    assert m["ok"] is True and m["warning"] is None
    assert isinstance(m["delta_layout"]["repermute"], bool)
    assert isinstance(m["delta_layout"]["reason"], str) and m["delta_layout"]["reason"]
    assert all(isinstance(v, float) for v in m["error"].values()) and "rel_fro" in m["error"]
    assert isinstance(m["expected_quality"], str) and m["expected_quality"]
    assert isinstance(m["overflow"], int) and isinstance(m["k_cap"], int)
    assert 0.0 < m["tile_frac"] <= 1.0 and m["tiles_per_group"] >= m["tiles_per_token"]
    json.dumps(m)
    k_cap = ffn.choose_k_cap(ref_mask(f, top_k=4), 8, 2)
    assert m["k_cap"] == k_cap and m["overflow"] == 0
    ref = ref_sparse_down(f, w2, b2, ref_mask(f, top_k=4), 8, 2, k_cap)[0]
    close(out, ref)
    assert m["error"]["rel_fro"] == pytest.approx(meta.rel_error(f @ w2 + b2, ref), abs=1e-5)


def test_zero_tokens():
    f, w2, b2 = data(0, 32, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, m = ffn.apply_ffn_sparsity(f, w2, b2, threshold=0.5, tile=8, group=2)
    assert out.shape == (0, 8) and m["ok"] and m["tile_frac"] == 0.0


@pytest.mark.parametrize("args,kw,err,word", [
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(), ConfigError, "exactly one"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, top_k=2),
     ConfigError, "exactly one"),
    ((np.ones(32), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1), ShapeError, "f"),
    ((np.ones((4, 32)), np.ones((16, 8)), np.ones(8)), dict(threshold=0.1), ShapeError,
     "chain"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(7)), dict(threshold=0.1), ShapeError, "b2"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, tile=5),
     ConfigError, "tile=5"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, group=0),
     ConfigError, "group"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, k_cap=1.5),
     ConfigError, "k_cap"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(top_k=33), ConfigError, "top_k"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(top_k=0), ConfigError, "top_k"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=np.nan), ConfigError,
     "threshold"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold="x"), ConfigError,
     "threshold"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, perm=np.zeros(32,
     int)), PermutationError, "permutation"),
])
def test_bad_inputs_raise_typed_errors(args, kw, err, word):
    with pytest.raises(err, match=word):
        ffn.apply_ffn_sparsity(*args, **kw)


def test_failure_falls_back_to_the_dense_product(monkeypatch):
    f, w2, b2 = data(6, 32, 8)

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(ffn, "sparse_down", boom)
    with pytest.warns(AdapterWarning, match="kernel exploded"):
        out, m = ffn.apply_ffn_sparsity(f, w2, b2, threshold=0.5, tile=8)
    assert m["ok"] is False and "kernel exploded" in m["warning"]
    assert set(meta.KEYS) <= set(m)
    close(out, f.astype(np.float64) @ w2 + b2)
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("error")
        ffn.apply_ffn_sparsity(f, w2, b2, threshold=0.5, tile=8, strict=True)
