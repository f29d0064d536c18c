"""Activation-sparse FFN: threshold masking and the union tile skip, against NumPy loops,
their jaxprs inside a (tiny) BERT, the k_cap ladder and the settings' typed errors."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsla_jax as vs
from icd_jax.adapters import ffn, meta
from icd_jax.adapters.ffn_pallas import pallas_union_down
from icd_jax.cost import inverse, tiles_touched
from icd_jax.errors import AdapterWarning, ConfigError, PermutationError, ShapeError
from icd_jax.models import minilm


# -- NumPy reference ----------------------------------------------------------------------
def ref_kept(active, tile, k_cap):
    """Tiles a union skip keeps: the ``k_cap`` most active over all rows (count > 0), ties
    to the lower index; returns (sorted kept tiles, active tile count)."""
    t, n = active.shape
    counts = active.reshape(t, n // tile, tile).sum(axis=(0, 2))
    order = sorted((j for j in range(n // tile) if counts[j] > 0),
                   key=lambda j: (-counts[j], j))
    return sorted(order[:k_cap]), len(order)


def ref_union(f, w2, b2, threshold, tile, k_cap):
    """Masked dense (``|f| > threshold``) over the kept tiles only, in float64."""
    act = np.abs(f) > threshold
    kept, _ = ref_kept(act, tile, k_cap)
    fm = np.where(act, f, 0).astype(np.float64)
    out = np.zeros((f.shape[0], w2.shape[1]))
    for j in kept:
        cols = slice(j * tile, (j + 1) * tile)
        out += fm[:, cols] @ w2[cols].astype(np.float64)
    return out + b2


def ref_counts(active, tile, group):
    t, n = active.shape
    n_g = -(-t // group)
    c = np.zeros((n_g, n // tile), np.int64)
    for g in range(n_g):
        for j in range(n // tile):
            c[g, j] = active[g * group:(g + 1) * group, j * tile:(j + 1) * tile].sum()
    return c


def data(t, n, h, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, n)).astype(dtype), rng.standard_normal((n, h)).astype(dtype),
            rng.standard_normal(h).astype(dtype))


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# -- the union tile skip ------------------------------------------------------------------
@pytest.mark.parametrize("t,tile,k_cap,thr", [
    (1, 8, 8, 1.0),      # one token, everything fits
    (3, 8, 2, 1.0),      # overflow: the two most active tiles
    (5, 4, 16, 1.5),     # k_cap = every tile
    (7, 1, 9, 2.0),      # per-neuron tiles, overflow with ties
    (2, 16, 3, 0.5),
    (0, 8, 4, 1.0),      # no rows: the bias only
])
def test_union_skip_matches_numpy(t, tile, k_cap, thr):
    f, w2, b2 = data(t, 64, 16, seed=t + tile)
    out = ffn.union_skip_down(f, w2, b2, thr, tile=tile, k_cap=k_cap)
    assert out.shape == (t, 16) and out.dtype == jnp.float32
    close(out, ref_union(f, w2, b2, thr, tile, k_cap))
    act = np.abs(f) > thr
    tiles, valid, n_active = ffn.union_tiles(jnp.asarray(act), tile=tile, k_cap=k_cap)
    kept, n_ref = ref_kept(act, tile, k_cap)
    assert tiles.shape == valid.shape == (k_cap,) and tiles.dtype == jnp.int32
    assert np.asarray(tiles)[np.asarray(valid)].tolist() == kept and int(n_active) == n_ref
    assert np.all(np.diff(np.asarray(tiles)) >= 0)       # ascending, padding last
    assert np.all(np.asarray(tiles)[~np.asarray(valid)] == 64 // tile - 1)


@given(t=st.integers(1, 12), n_tiles=st.integers(1, 8), tile=st.sampled_from([1, 2, 4, 8]),
       k_cap=st.integers(1, 10), thr=st.floats(0.0, 2.5), seed=st.integers(0, 2**16))
def test_hypothesis_union_skip_against_reference(t, n_tiles, tile, k_cap, thr, seed):
    f, w2, b2 = data(t, n_tiles * tile, 4, seed=seed)
    close(ffn.union_skip_down(f, w2, b2, thr, tile=tile, k_cap=k_cap),
          ref_union(f, w2, b2, thr, tile, k_cap))


def test_every_active_tile_fitting_equals_the_mask():
    f, w2, b2 = data(2, 96, 12, seed=3)
    thr = 2.2
    k = ffn.k_cap_rung(ffn.union_count(f, thr, 8), 12)
    assert k < 12   # really skips
    mask = ffn.masked_down(f, w2, b2, thr)
    close(mask, np.where(np.abs(f) > thr, f, 0).astype(np.float64) @ w2 + b2)
    close(ffn.union_skip_down(f, w2, b2, thr, tile=8, k_cap=k), np.asarray(mask, np.float64),
          tol=1e-5)


def test_top_tiles_overflow_fills_the_tie_level_from_the_lower_index():
    counts = jnp.asarray([3, 0, 1, 2, 2, 2, 1, 3], jnp.int32)
    for k, kept in [(1, [0]), (2, [0, 7]), (3, [0, 3, 7]), (5, [0, 3, 4, 5, 7]),
                    (6, [0, 2, 3, 4, 5, 7]), (7, [0, 2, 3, 4, 5, 6, 7]),
                    (9, [0, 2, 3, 4, 5, 6, 7])]:
        tiles, valid = ffn.top_tiles(counts, k, 3)
        assert np.asarray(tiles)[np.asarray(valid)].tolist() == kept
        assert int(valid.sum()) == len(kept) and bool(valid[: len(kept)].all())


@pytest.mark.parametrize("t", [1, 6])
def test_bfloat16_follows_f(t):
    f, w2, b2 = data(t, 32, 8)
    f16 = jnp.asarray(f, jnp.bfloat16)
    out = ffn.union_skip_down(f16, w2, b2, 0.7, tile=4, k_cap=3)
    assert out.dtype == jnp.bfloat16
    close(out, ref_union(np.asarray(f16, np.float32), w2, b2, 0.7, 4, 3), tol=0.05)


def test_traced_threshold_under_jit():
    f, w2, b2 = data(5, 32, 8)
    run = jax.jit(lambda f, thr: ffn.skip_down(f, w2, b2, thr, tile=8, k_cap=2))
    out, rec = run(f, 0.8)
    close(out, ref_union(f, w2, b2, 0.8, 8, 2))
    kept, n_active = ref_kept(np.abs(f) > 0.8, 8, 2)
    assert bool(rec["skipped"]) and int(rec["tiles_kept"]) == len(kept)
    assert int(rec["tiles_active"]) == n_active


# -- the capacity ladder ------------------------------------------------------------------
def test_k_cap_rungs_bound_the_compilations():
    n_t, tile = 96, 4
    w2, b2 = data(1, n_t * tile, 8, seed=1)[1:]
    rng = np.random.default_rng(0)
    before = ffn.union_skip_down._cache_size()
    rungs = set()
    for n_active in range(1, n_t + 1):  # a call whose union holds n_active tiles
        f = np.zeros((2, n_t * tile), np.float32)
        on = rng.choice(n_t, n_active, replace=False)
        f[rng.integers(0, 2, n_active), on * tile + rng.integers(0, tile, n_active)] = 1.0
        assert ffn.union_count(f, 0.5, tile) == n_active
        k = ffn.k_cap_rung(n_active, n_t)
        assert n_active <= k <= min(n_t, max(4, 1.25 * n_active))  # <= 25% slack
        rungs.add(k)
        close(ffn.union_skip_down(f, w2, b2, 0.5, tile=tile, k_cap=k),
              ref_union(f, w2, b2, 0.5, tile, k))
    ladder = [r for r in ffn.LADDER.ladder(n_t) if r <= n_t]
    assert rungs == set(ladder) and len(rungs) == 19     # not 96 programs
    assert ffn.union_skip_down._cache_size() - before == len(rungs)
    assert ffn.k_cap_rung(0, 8) == 4 and ffn.k_cap_rung(30, 24) == 24
    assert ffn.k_cap_rung(5, 96, vs.CapacityPolicy.pow2(minimum=1)) == 8


# -- inside a model: jaxprs and the record ------------------------------------------------
def primitives(jaxpr) -> list:
    """Every equation of a jaxpr, sub-jaxprs (jit, cond, custom calls) included."""
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += primitives(sub)
    return out


CFG = minilm.BertConfig(vocab_size=64, hidden=16, layers=2, heads=2, intermediate=64,
                        max_positions=32)
POLICY = minilm.PackPolicy(tokens=vs.CapacityPolicy.pow2(minimum=1),
                           length=vs.CapacityPolicy.pow2(minimum=4))


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer BERT (FFN 64), its params and one packed call of 5 tokens (T=8)."""
    batch = minilm.pack([[1, 5, 9], [2, 7]], POLICY)
    params = minilm.Encoder(CFG).init(jax.random.PRNGKey(0), *batch.arrays())["params"]
    return params, batch


def forward(params, batch, sparse, record=False):
    module = minilm.Encoder(CFG, transforms=minilm.Transforms(ffn=sparse))
    if record:
        out, state = module.apply({"params": params}, *batch.arrays(), mutable=[ffn.RECORD])
        return out, state[ffn.RECORD]
    return module.apply({"params": params}, *batch.arrays())


def weight_gathers(params, batch, sparse, tile):
    """Gathers in the forward's jaxpr that read [F // tile, tile * H] (FFN-out rows)."""
    jaxpr = jax.make_jaxpr(lambda p: forward(p, batch, sparse))(params)
    return [e for e in primitives(jaxpr.jaxpr) if e.primitive.name == "gather"
            and e.invars[0].aval.shape == (64 // tile, tile * 16)]


def test_mask_mode_runs_no_top_k_or_sort(tiny):
    params, batch = tiny
    sparse = minilm.FFNSparsity(threshold=0.1, tile=8)
    names = {e.primitive.name for e in primitives(
        jax.make_jaxpr(lambda p: forward(p, batch, sparse))(params).jaxpr)}
    assert not names & {"top_k", "sort", "argsort", "approx_top_k"}
    assert not weight_gathers(params, batch, sparse, 8)
    _, rec = forward(params, batch, sparse, record=True)
    assert [bool(rec[f"layer_{i}"]["output"]["skipped"][0]) for i in range(2)] == [False] * 2


def with_dead_tiles(params, dead=(1, 3, 4, 6), tile=8):
    """``params`` with the FFN neurons of tiles ``dead`` switched off in every layer:
    pre-activation -30, so ``gelu`` gives exactly 0 and those tiles are never active."""
    p = jax.tree.map(np.array, params)
    cols = np.concatenate([np.arange(j * tile, (j + 1) * tile) for j in dead])
    for i in range(CFG.layers):
        p[f"layer_{i}"]["intermediate"]["kernel"][:, cols] = 0.0
        p[f"layer_{i}"]["intermediate"]["bias"][cols] = -30.0
    return p


def test_skip_mode_gathers_weight_tiles_and_equals_the_mask_when_all_fit(tiny):
    params, batch = tiny
    params = with_dead_tiles(params)          # 4 of the 8 tiles can be active
    mask = forward(params, batch, minilm.FFNSparsity(threshold=0.05, tile=8))
    skip = minilm.FFNSparsity(threshold=0.05, tile=8, mode="skip", k_cap=(4, 8))
    assert ffn.skips_tiles(skip, 8, 64, 0) and not ffn.skips_tiles(skip, 8, 64, 1)
    gathers = weight_gathers(params, batch, skip, 8)
    assert [g.outvars[0].aval.shape for g in gathers] == [(4, 8 * 16)]   # layer 0 only
    names = {e.primitive.name for e in primitives(
        jax.make_jaxpr(lambda p: forward(p, batch, skip))(params).jaxpr)}
    assert not names & {"top_k", "sort"}
    out, rec = forward(params, batch, skip, record=True)
    r0, r1 = rec["layer_0"]["output"], rec["layer_1"]["output"]
    assert bool(r0["skipped"][0]) and not bool(r1["skipped"][0])
    assert int(r0["tiles_kept"][0]) == int(r0["tiles_active"][0]) == 4
    np.testing.assert_allclose(out, mask, atol=1e-5)
    over = minilm.FFNSparsity(threshold=0.05, tile=8, mode="skip", k_cap=3)  # overflow
    out3, rec3 = forward(params, batch, over, record=True)
    assert int(rec3["layer_0"]["output"]["tiles_kept"][0]) == 3
    assert np.abs(np.asarray(out3) - np.asarray(mask)).max() > 1e-3
    np.testing.assert_allclose(forward(params, batch, minilm.FFNSparsity(
        threshold=0.0, tile=8, mode="skip", k_cap=4)), forward(params, batch, None),
        atol=1e-5)   # threshold 0: the dead tiles add exactly 0 to the dense product


def test_skip_mode_masks_calls_above_max_rows(tiny):
    params, batch = tiny   # T = 8 rows
    skip = minilm.FFNSparsity(threshold=0.3, tile=8, mode="skip", k_cap=2, max_rows=4)
    assert not ffn.skips_tiles(skip, 8, 64) and ffn.skips_tiles(skip, 4, 64)
    assert not weight_gathers(params, batch, skip, 8)
    _, rec = forward(params, batch, skip, record=True)
    assert not bool(rec["layer_0"]["output"]["skipped"][0])
    np.testing.assert_allclose(forward(params, batch, skip), forward(
        params, batch, minilm.FFNSparsity(threshold=0.3, tile=8)), atol=1e-6)


def test_pallas_interpret_backend_equals_xla(tiny):
    params, batch = tiny
    kw = dict(threshold=0.2, tile=16, mode="skip", k_cap=2)
    xla = forward(params, batch, minilm.FFNSparsity(**kw))
    pal = forward(params, batch, minilm.FFNSparsity(**kw, backend="pallas-interpret"))
    np.testing.assert_allclose(pal, xla, atol=1e-5)


@pytest.mark.parametrize("t", [1, 5])
def test_pallas_union_down_interpret_matches_gather(t):
    f, w2, b2 = data(t, 64, 8, seed=t)
    act = jnp.abs(jnp.asarray(f)) > 1.0
    tiles, valid, _ = ffn.union_tiles(act, tile=16, k_cap=3)
    out = pallas_union_down(jnp.asarray(f), jnp.asarray(w2), jnp.asarray(b2), act, tiles,
                            valid, tile=16, interpret=True)
    assert out.shape == (t, 8) and out.dtype == jnp.float32
    close(out, ref_union(f, w2, b2, 1.0, 16, 3))


# -- settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,word", [
    (dict(), "threshold"),
    (dict(threshold=None), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(threshold=-0.1), "threshold"),
    (dict(threshold="x"), "threshold"),
    (dict(threshold=()), "empty"),
    (dict(threshold=(0.1, None)), r"threshold\[1\]"),
    (dict(threshold=0.1, mode="top_k"), "mode"),
    (dict(threshold=0.1, tile=0), "tile"),
    (dict(threshold=0.1, mode="skip"), "needs k_cap"),
    (dict(threshold=0.1, k_cap=4), "mode='skip' only"),
    (dict(threshold=0.1, mode="skip", k_cap=0), "k_cap"),
    (dict(threshold=0.1, mode="skip", k_cap=(4, 2.5)), r"k_cap\[1\]"),
    (dict(threshold=0.1, max_rows=0), "max_rows"),
    (dict(threshold=0.1, backend="cuda"), "backend"),
])
def test_bad_settings_raise_config_error(kw, word):
    with pytest.raises(ConfigError, match=word):
        minilm.FFNSparsity(**kw)


def test_per_layer_settings_and_skips_tiles():
    s = minilm.FFNSparsity(threshold=[0.1, 0.2], tile=16, mode="skip", k_cap=(8, 96))
    assert s.threshold == (0.1, 0.2) and s.at(1) == (0.2, 96) and hash(s)
    assert ffn.skips_tiles(s, 32, 1536, 0) and not ffn.skips_tiles(s, 32, 1536, 1)
    assert ffn.skips_tiles(s, 32, 1536) and not ffn.skips_tiles(s, 33, 1536)
    assert not ffn.skips_tiles(minilm.FFNSparsity(threshold=0.1), 1, 1536)
    with pytest.raises(ConfigError, match="tile=16 does not divide"):
        ffn.skips_tiles(s, 1, 1000)
    with pytest.raises(ConfigError, match="no layer 2"):
        s.at(2)
    with pytest.raises(ConfigError, match="layer is unknown"):
        s.at(None)
    assert ffn.layer_of(("layer_3", "output")) == 3 and ffn.layer_of(("head",)) is None


def test_calibrate_thresholds_keeps_the_share():
    acts = [np.random.default_rng(i).standard_normal((50, 64)) for i in range(3)]
    thr = ffn.calibrate_thresholds(acts, 0.1)
    assert len(thr) == 3
    for a, t in zip(acts, thr):
        assert (np.abs(a) > t).mean() == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ConfigError, match="keep"):
        ffn.calibrate_thresholds(acts, 0.0)
    with pytest.raises(ShapeError, match=r"acts\[0\]"):
        ffn.calibrate_thresholds([np.zeros(4)], 0.5)


# -- counts (accounting helpers) ----------------------------------------------------------
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


# -- the adapter --------------------------------------------------------------------------
def planted(t=3, n=64, h=16, block=8, seed=0):
    """Neurons co-active in blocks of ``block`` (exactly zero elsewhere), columns scattered."""
    rng = np.random.default_rng(seed)
    f_lat = np.zeros((t, n), np.float32)
    for r in range(t):
        b = rng.integers(0, 2)   # every row uses blocks 0 or 1, and block 5
        for blk in (b, 5):
            f_lat[r, blk * block:(blk + 1) * block] = rng.uniform(0.5, 2.0, block)
    w_lat = rng.standard_normal((n, h)).astype(np.float32)
    scatter = rng.permutation(n)        # observed column c holds latent neuron scatter[c]
    b2 = rng.standard_normal(h).astype(np.float32)
    return f_lat[:, scatter], w_lat[scatter], b2, inverse(scatter)


def test_coactivation_permutation_keeps_fewer_tiles_and_preserves_output():
    f, w2, b2, perm = planted()
    kw = dict(threshold=0.1, tile=8, mode="skip")
    out_id, m_id = ffn.apply_ffn_sparsity(f, w2, b2, **kw)
    out_p, m_p = ffn.apply_ffn_sparsity(f, w2, b2, perm=perm, **kw)
    assert m_p["executed"] == "skip" and m_p["tiles_skipped"] is True
    assert m_p["tiles_active"] <= 3 and m_p["overflow"] == 0 and m_p["tile_frac"] <= 3 / 8
    # scattered, the union covers every tile: nothing to skip, so the mask ran
    assert m_id["executed"] == "mask" and "all 8 tiles" in m_id["fallback"]
    dense = f.astype(np.float64) @ w2 + b2
    close(out_p, dense)
    close(out_id, dense)
    assert m_p["error"]["rel_fro"] < 1e-5
    assert m_p["settings"]["perm"] is True and m_p["delta_layout"]["repermute"] is True


def test_meta_says_what_executed():
    f, w2, b2 = data(9, 32, 8)
    out, m = ffn.apply_ffn_sparsity(f, w2, b2, threshold=1.0, tile=8)
    assert set(meta.KEYS) <= set(m) and m["transform"] == "ffn_sparsity" and m["ok"]
    assert m["executed"] == "mask" and m["tiles_skipped"] is False and m["fallback"] is None
    assert "tiles_kept" not in m and "k_cap" not in m   # no tile figures for a mask
    close(out, np.where(np.abs(f) > 1.0, f, 0).astype(np.float64) @ w2 + b2)
    json.dumps(m)
    out, m = ffn.apply_ffn_sparsity(f, w2, b2, threshold=1.0, tile=8, mode="skip", k_cap=2)
    assert m["executed"] == "skip" and m["k_cap"] == 2 and isinstance(m["overflow"], int)
    kept, n_active = ref_kept(np.abs(f) > 1.0, 8, 2)
    assert m["tiles_kept"] == len(kept) and m["overflow"] == n_active - len(kept)
    assert m["tile_frac"] == pytest.approx(len(kept) / 4)
    close(out, ref_union(f, w2, b2, 1.0, 8, 2))
    json.dumps(m)
    out, m = ffn.apply_ffn_sparsity(f, w2, b2, threshold=1.0, tile=8, mode="skip",
                                    max_rows=4)
    assert m["executed"] == "mask" and "max_rows" in m["fallback"]
    assert m["tiles_skipped"] is False and "tiles_kept" not in m
    close(out, np.where(np.abs(f) > 1.0, f, 0).astype(np.float64) @ w2 + b2)
    _, m = ffn.apply_ffn_sparsity(f, w2, b2, threshold=0.0, tile=8, mode="skip")
    assert m["executed"] == "mask" and "all 4 tiles" in m["fallback"]


def test_zero_tokens():
    f, w2, b2 = data(0, 32, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, m = ffn.apply_ffn_sparsity(f, w2, b2, threshold=0.5, tile=8, mode="skip",
                                        k_cap=1)
    assert out.shape == (0, 8) and m["ok"] and m["executed"] == "skip"
    assert m["tiles_kept"] == 0


@pytest.mark.parametrize("args,kw,err,word", [
    ((np.ones(32), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1), ShapeError, "f"),
    ((np.ones((4, 32)), np.ones((16, 8)), np.ones(8)), dict(threshold=0.1), ShapeError,
     "chain"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(7)), dict(threshold=0.1), ShapeError, "b2"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, tile=5),
     ConfigError, "tile=5"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, mode="skip",
     k_cap=1.5), ConfigError, "k_cap"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, k_cap=2),
     ConfigError, "skip"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, mode="dense"),
     ConfigError, "mode"),
    ((np.ones((4, 32)), np.ones((32, 8)), np.ones(8)), dict(threshold=0.1, max_rows=0),
     ConfigError, "max_rows"),
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

    monkeypatch.setattr(ffn, "skip_down", boom)
    with pytest.warns(AdapterWarning, match="kernel exploded"):
        out, m = ffn.apply_ffn_sparsity(f, w2, b2, threshold=0.5, tile=8, mode="skip",
                                        k_cap=1)
    assert m["ok"] is False and "kernel exploded" in m["warning"]
    assert set(meta.KEYS) <= set(m)
    close(out, f.astype(np.float64) @ w2 + b2)
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("error")
        ffn.apply_ffn_sparsity(f, w2, b2, threshold=0.5, tile=8, mode="skip", k_cap=1,
                               strict=True)
