"""K adapter (key-block dropping) against a naive per-item NumPy reference."""

from __future__ import annotations

import functools
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from icd_jax.adapters import kv
from icd_jax.adapters.meta import KEYS
from icd_jax.errors import AdapterWarning, ConfigError, ShapeError

LENGTHS = np.array([0, 1, 14, 7], np.int32)  # empty, one token, L == C, partial last block
C, H, D = 14, 2, 8


# -- NumPy reference --------------------------------------------------------------------
def ref_n_drop(nb, drop):
    return 0 if nb == 0 else min(int(np.floor(drop * nb + 0.5)), nb - 1)


def ref_scores(q, k, n):
    """Proxy scores of item keys ``k[:n]`` ``[C, H, D]`` (float64)."""
    qm = q[:n].astype(np.float64).mean(0) if n else np.zeros(q.shape[1:])
    return np.array([np.mean([qm[h] @ k[j, h] for h in range(k.shape[1])])
                     for j in range(n)]) / np.sqrt(k.shape[2])


def ref_blocks(q, k, n, block, drop, permute):
    """``(blocks, scores, dropped ids)`` of one item: blocks are lists of positions."""
    s = ref_scores(q, k, n)
    order = np.argsort(-s, kind="stable") if permute else np.arange(n)
    blocks = [order[i:i + block] for i in range(0, n, block)]
    bs = np.array([s[b].mean() for b in blocks])
    dropped = set(np.argsort(bs, kind="stable")[:ref_n_drop(len(blocks), drop)].tolist())
    return blocks, bs, dropped


def ref_kept(q, k, lengths, block, drop, permute):
    """Sorted kept key positions per item."""
    out = []
    for b, n in enumerate(lengths):
        blocks, _, dropped = ref_blocks(q[b], k[b], int(n), block, drop, permute)
        kept = [t for i, blk in enumerate(blocks) if i not in dropped for t in blk]
        out.append(np.sort(np.array(kept, int)))
    return out


def ref_probs(qb, kb, keys):
    """Softmax ``[Cq, H, len(keys)]`` of every query over ``kb[keys]``."""
    s = np.einsum("qhd,khd->qhk", qb.astype(np.float64), kb[keys].astype(np.float64))
    s = s / np.sqrt(qb.shape[-1])
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_attention(q, k, v, lengths, kept):
    out = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        if n and len(kept[b]):
            out[b, :n] = np.einsum("qhk,khd->qhd", ref_probs(q[b, :n], k[b], kept[b]),
                                   v[b, kept[b]].astype(np.float64))
    return out


def ref_mass(q, k, lengths, kept):
    """Per item ``(kept mass summed over valid queries and heads, number of rows)``."""
    tot, rows = [], []
    for b, n in enumerate(lengths):
        p = ref_probs(q[b, :n], k[b], np.arange(n)) if n else np.zeros((0, 1, 0))
        tot.append(p[..., np.isin(np.arange(n), kept[b])].sum())
        rows.append(n * q.shape[2])
    return np.array(tot), np.array(rows)


def kept_sets(index, kept_lengths):
    return [np.sort(np.asarray(i[:n])) for i, n in zip(index, kept_lengths)]


def data(seed=0, b=4, c=C, h=H, d=D):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, c, h, d)).astype(np.float32) for _ in range(3))


# -- settings helpers -------------------------------------------------------------------
@pytest.mark.parametrize("nb,drop,want", [(0, 0.5, 0), (1, 0.9, 0), (2, 0.25, 1), (4, 0.1, 0),
                                          (5, 0.1, 1), (3, 0.5, 2), (10, 0.25, 3)])
def test_n_drop(nb, drop, want):
    assert kv.n_drop(nb, drop) == ref_n_drop(nb, drop) == want


@pytest.mark.parametrize("cap,block,drop,want", [(14, 4, 0.5, 8), (12, 4, 0.0, 12),
                                                 (10, 4, 0.0, 12), (128, 128, 0.1, 128),
                                                 (24, 4, 0.25, 16), (1, 8, 0.9, 8)])
def test_kept_capacity(cap, block, drop, want):
    brute = block * max(nb - ref_n_drop(nb, drop) for nb in range(math.ceil(cap / block) + 1))
    assert kv.kept_capacity(cap, block, drop) == brute == want


def test_token_scores_match_reference():
    q, k, _ = data(1)
    s = np.asarray(kv.token_scores(q, k, LENGTHS))
    assert s.dtype == np.float32 and s.shape == (4, C)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(s[b, :n], ref_scores(q[b], k[b], n), rtol=1e-5, atol=1e-6)
        assert np.all(s[b, n:] == -np.inf)


# -- selection and attention ------------------------------------------------------------
@pytest.mark.parametrize("permute", [False, True])
def test_attention_over_exactly_the_kept_set(permute):
    q, k, v = data(2)
    drop = 0.5  # drops [0, 0, 2, 1] of the [0, 1, 4, 2] blocks
    index, kl = kv.select(q, k, LENGTHS, block=4, drop=drop, permute_tokens=permute)
    want_kept = ref_kept(q, k, LENGTHS, 4, drop, permute)
    for got, want in zip(kept_sets(index, kl), want_kept):
        np.testing.assert_array_equal(got, want)
    out = kv.kv_drop_attention(q, k, v, jnp.asarray(LENGTHS), block=4, drop=drop,
                               permute_tokens=permute)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, ref_attention(q, k, v, LENGTHS, want_kept), atol=2e-5)


@pytest.mark.parametrize("permute", [False, True])
def test_drop_counts_prefix_and_highest_scores(permute):
    q, k, _ = data(3)
    block, drop = 4, 0.5
    index, kl = map(np.asarray, kv.select(q, k, LENGTHS, block=block, drop=drop,
                                          permute_tokens=permute))
    assert index.dtype == kl.dtype == np.int32
    assert index.shape == (4, kv.kept_capacity(C, block, drop))
    for b, n in enumerate(LENGTHS):
        assert np.all(index[b, :kl[b]] < n) and np.all(index[b, kl[b]:] == C)  # prefix
        assert len(set(index[b, :kl[b]].tolist())) == kl[b]
        blocks, bs, _ = ref_blocks(q[b], k[b], int(n), block, drop, permute)
        chunks = [set(index[b, i:i + block].tolist()) - {C} for i in range(0, kl[b], block)]
        kept_ids = [next(j for j, blk in enumerate(blocks) if set(blk.tolist()) == ch)
                    for ch in chunks]  # each kept chunk is one whole block, in block order
        assert kept_ids == sorted(kept_ids)
        assert len(blocks) - len(kept_ids) == kv.n_drop(len(blocks), drop)
        dropped = [j for j in range(len(blocks)) if j not in kept_ids]
        if dropped:
            assert bs[kept_ids].min() >= bs[dropped].max() - 1e-6


def test_drop_zero_with_permutation_is_full_attention():
    q, k, v = data(4)
    index, kl = kv.select(q, k, LENGTHS, block=4, drop=0.0, permute_tokens=True)
    np.testing.assert_array_equal(kl, LENGTHS)
    out = kv.kv_drop_attention(q, k, v, jnp.asarray(LENGTHS), block=4, drop=0.0)
    full = kv.attend(q, k, v, LENGTHS, LENGTHS)
    np.testing.assert_allclose(out, full, atol=1e-5)
    full_keys = [np.arange(n) for n in LENGTHS]
    np.testing.assert_allclose(out, ref_attention(q, k, v, LENGTHS, full_keys), atol=2e-5)
    assert float(kv.mass_kept(q, k, LENGTHS, index, kl)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("drop", [0.0, 0.25, 0.6])
def test_mass_kept_matches_reference(permute, drop):
    q, k, _ = data(5)
    index, kl = kv.select(q, k, LENGTHS, block=3, drop=drop, permute_tokens=permute)
    tot, rows = ref_mass(q, k, LENGTHS, kept_sets(index, kl))
    got = float(kv.mass_kept(q, k, LENGTHS, index, kl))
    assert 0.0 <= got <= 1.0 + 1e-6
    assert got == pytest.approx(tot.sum() / rows.sum(), abs=1e-5)
    per = np.asarray(kv.mass_kept_per_item(q, k, LENGTHS, index, kl))
    want = np.where(rows > 0, tot / np.maximum(rows, 1), 1.0)
    np.testing.assert_allclose(per, want, atol=1e-5)
    if drop == 0.0:
        np.testing.assert_allclose(per, 1.0, atol=1e-6)


@pytest.mark.parametrize("drop", [0.25, 0.5])
def test_permutation_keeps_more_mass_on_scattered_heavy_keys(drop):
    rng = np.random.default_rng(6)
    u = np.zeros(D, np.float32)
    u[0] = 1.0
    q = (2 * u + 0.1 * rng.standard_normal((1, 24, 1, D))).astype(np.float32)
    k = (0.3 * rng.standard_normal((1, 24, 1, D))).astype(np.float32)
    k[0, 1::4, 0] += 6 * u  # one heavy key in every block of the natural order
    lengths = np.array([24], np.int32)
    mass = {}
    for permute in (False, True):
        index, kl = kv.select(q, k, lengths, block=4, drop=drop, permute_tokens=permute)
        mass[permute] = float(kv.mass_kept(q, k, lengths, index, kl))
    assert mass[True] > 0.9 and mass[True] > mass[False] + 0.2, mass


# -- jit and properties -----------------------------------------------------------------
def test_jit_with_traced_lengths_traces_once():
    q, k, v = data(7)
    traces = []

    @jax.jit
    def run(lengths):
        traces.append(1)
        out = kv.kv_drop_attention(q, k, v, lengths, block=4, drop=0.5)
        return out, kv.select(q, k, lengths, block=4, drop=0.5, permute_tokens=True)

    for lengths in (LENGTHS, np.array([14, 3, 9, 0], np.int32)):
        out, (index, kl) = run(jnp.asarray(lengths))
        want = ref_kept(q, k, lengths, 4, 0.5, True)
        for got, w in zip(kept_sets(index, kl), want):
            np.testing.assert_array_equal(got, w)
        np.testing.assert_allclose(out, ref_attention(q, k, v, lengths, want), atol=2e-5)
    assert len(traces) == 1


@st.composite
def cases(draw):
    c = draw(st.integers(1, 24))
    lengths = np.array(draw(st.lists(st.sampled_from([0, c, *range(c + 1)]),
                                     min_size=3, max_size=3)), np.int32)
    block = draw(st.integers(1, 8))
    drop = draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9]))
    return c, lengths, block, drop, draw(st.booleans()), draw(st.integers(0, 2**16))


@given(cases())
def test_kept_set_property(case):
    c, lengths, block, drop, permute, seed = case
    q, k, _ = data(seed, b=len(lengths), c=c, h=2, d=4)
    fn = functools.partial(kv.select, block=block, drop=drop, permute_tokens=permute)
    index, kl = jax.jit(fn)(q, k, jnp.asarray(lengths))
    assert index.shape == (len(lengths), kv.kept_capacity(c, block, drop))
    want = ref_kept(q, k, lengths, block, drop, permute)
    for got, w, i, n in zip(kept_sets(index, kl), want, np.asarray(index), np.asarray(kl)):
        np.testing.assert_array_equal(got, w)
        assert np.all(i[n:] == c)


# -- adapter ----------------------------------------------------------------------------
def check_meta(meta):
    assert set(KEYS) <= set(meta)
    assert isinstance(meta["transform"], str) and isinstance(meta["settings"], dict)
    assert isinstance(meta["ok"], bool) and isinstance(meta["expected_quality"], str)
    assert isinstance(meta["delta_layout"]["repermute"], bool)
    assert isinstance(meta["delta_layout"]["reason"], str) and meta["delta_layout"]["reason"]
    assert all(isinstance(x, float) for x in meta["error"].values())
    assert meta["warning"] is None or isinstance(meta["warning"], str)
    json.dumps(meta)


@pytest.mark.parametrize("as_jax", [False, True])
def test_apply_kvcache(as_jax):
    q, k, v = data(8)
    wrap = jnp.asarray if as_jax else np.asarray
    (kk, vk, kl), meta = kv.apply_kvcache((wrap(k), wrap(v), wrap(LENGTHS)), block=4,
                                          drop=0.5, queries=wrap(q))
    check_meta(meta)
    assert meta["ok"] and meta["transform"] == "kv" and meta["delta_layout"]["repermute"]
    assert meta["settings"] == dict(block=4, drop=0.5, permute_tokens=True)
    assert set(meta["error"]) >= {"rel_fro", "mass_dropped", "blocks_dropped_frac",
                                  "tokens_dropped_frac"}
    kept = ref_kept(q, k, LENGTHS, 4, 0.5, True)
    np.testing.assert_array_equal(kl, [len(x) for x in kept])
    assert kk.shape == vk.shape == (4, kv.kept_capacity(C, 4, 0.5), H, D)
    for b, ids in enumerate(kept):  # kept keys in kept-block order: compare as sets of rows
        np.testing.assert_array_equal(np.sort(kk[b, :len(ids), 0, 0]), np.sort(k[b, ids, 0, 0]))
        np.testing.assert_array_equal(kk[b, len(ids):], 0)
        np.testing.assert_array_equal(np.sort(vk[b, :len(ids), 1, 2]), np.sort(v[b, ids, 1, 2]))
    full = ref_attention(q, k, v, LENGTHS, [np.arange(n) for n in LENGTHS])
    approx = ref_attention(q, k, v, LENGTHS, kept)
    err = meta["error"]
    assert err["rel_fro"] == pytest.approx(
        np.linalg.norm(full - approx) / np.linalg.norm(full), rel=1e-4)
    tot, rows = ref_mass(q, k, LENGTHS, kept)
    assert err["mass_dropped"] == pytest.approx(1 - tot.sum() / rows.sum(), abs=1e-5)
    nb = [math.ceil(n / 4) for n in LENGTHS]
    assert err["blocks_dropped_frac"] == pytest.approx(
        sum(ref_n_drop(n, 0.5) for n in nb) / sum(nb))
    assert err["tokens_dropped_frac"] == pytest.approx(
        1 - sum(map(len, kept)) / LENGTHS.sum())


def test_apply_kvcache_drop_zero_and_key_queries():
    q, k, v = data(9)
    (_, _, kl), meta = kv.apply_kvcache((k, v, LENGTHS), block=4, drop=0.0)
    np.testing.assert_array_equal(kl, LENGTHS)
    assert meta["error"]["rel_fro"] < 1e-5 and meta["error"]["mass_dropped"] < 1e-5
    assert meta["error"]["blocks_dropped_frac"] == meta["error"]["tokens_dropped_frac"] == 0
    _, m_none = kv.apply_kvcache((k, v, LENGTHS), block=3, drop=0.5, permute_tokens=False)
    _, m_keys = kv.apply_kvcache((k, v, LENGTHS), block=3, drop=0.5, queries=k,
                                 permute_tokens=False)
    assert m_none["error"] == m_keys["error"]


def test_fallback_returns_cache_unchanged(monkeypatch):
    q, k, v = data(10)
    cache = (k, v, LENGTHS)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(kv, "select", boom)
    with pytest.warns(AdapterWarning, match="boom"):
        out, meta = kv.apply_kvcache(cache, block=4, drop=0.5, queries=q)
    assert out is cache and meta["ok"] is False and "boom" in meta["warning"]
    check_meta(meta)
    with pytest.raises(RuntimeError, match="boom"):
        kv.apply_kvcache(cache, block=4, drop=0.5, strict=True)


def test_success_emits_no_warning():
    q, k, v = data(11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)
        kv.apply_kvcache((k, v, LENGTHS), block=4, drop=0.25, queries=q)


def bad_caches():
    q, k, v = data(12)
    return [
        ((k, v), None, "cache must be a tuple"),
        ((k[0], v, LENGTHS), None, "k must have rank 4"),
        ((k, v[:, :, :1], LENGTHS), None, "v shape"),
        ((k, v, LENGTHS[:, None]), None, "lengths must have rank 1"),
        ((k, v, LENGTHS.astype(np.float32)), None, "lengths must be integers"),
        ((k, v, np.array([0, 1, 15, 7])), None, "lengths must lie in"),
        ((k, v, np.array([0, -1, 3, 7])), None, "lengths must lie in"),
        ((k, v, LENGTHS[:3]), None, "do not match"),
        ((k, v, LENGTHS), q[..., :4], "do not match"),
        ((k, v, LENGTHS), q[:, :5], "lengths must lie in"),
        ((k.astype(np.int32), v, LENGTHS), None, "k must be floating"),
    ]


@pytest.mark.parametrize("i", range(len(bad_caches())))
def test_bad_inputs_raise_shape_error(i):
    cache, queries, msg = bad_caches()[i]
    with pytest.raises(ShapeError, match=msg):
        kv.apply_kvcache(cache, block=4, drop=0.5, queries=queries)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(block=0), "block"), (dict(block=2.0), "block"), (dict(block=True), "block"),
    (dict(drop=1.0), "drop"), (dict(drop=-0.1), "drop"), (dict(drop=float("nan")), "drop"),
    (dict(drop="0.1"), "drop"), (dict(permute_tokens="yes"), "permute_tokens")])
def test_bad_settings_raise_config_error(kwargs, msg):
    _, k, v = data(13)
    with pytest.raises(ConfigError, match=msg):
        kv.apply_kvcache((k, v, LENGTHS), **kwargs)
    if "permute_tokens" not in kwargs:
        settings = dict(block=4, drop=0.5) | kwargs
        with pytest.raises(ConfigError, match=msg):
            kv.kept_capacity(C, **settings)
