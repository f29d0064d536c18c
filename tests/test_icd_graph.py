"""Co-access graph construction: mock, traces (corrupt lines), activations, options."""

import json
import math
import os
import re
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import icd_jax
import icd_jax.cost
from icd_jax.errors import (
    ConfigError,
    DegenerateGraphWarning,
    GraphError,
    TraceError,
    TraceWarning,
)
from icd_jax.graph import build_w, validate


def _is_valid(g):
    w = g.csr
    assert sp.isspmatrix_csr(w) and w.dtype == np.float32
    assert abs(w - w.T).max() <= 1e-6 * max(w.max(), 1)
    assert (w.data >= 0).all() and np.isfinite(w.data).all()
    assert w.diagonal().sum() == 0
    assert g.meta["D"] == w.shape[0] and g.meta["nnz"] == w.nnz and len(g.meta["hash"]) == 64


def test_mock_is_deterministic_and_planted():
    a = build_w("mock", D=400, blocks=4, avg_degree=12, seed=3)
    b = build_w("mock", D=400, blocks=4, avg_degree=12, seed=3)
    c = build_w("mock", D=400, blocks=4, avg_degree=12, seed=4)
    _is_valid(a)
    assert a.meta["hash"] == b.meta["hash"] != c.meta["hash"]
    assert a.planted.shape == (400,) and set(a.planted) == {0, 1, 2, 3}
    # most weight is inside planted blocks
    w = a.csr.tocoo()
    same = a.planted[w.row] == a.planted[w.col]
    assert w.data[same].sum() > 3 * w.data[~same].sum()
    # shuffled: planted labels are not sorted
    assert not np.all(np.diff(a.planted) >= 0)
    unshuffled = build_w("mock", D=400, blocks=4, seed=3, shuffle=False)
    assert np.all(np.diff(unshuffled.planted) >= 0)


def test_trace_jsonl_and_csv(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in [
        {"src": 0, "dst": 1, "w": 2.0}, {"src": 1, "dst": 2}, {"src": 0, "dst": 1, "w": 1.0}]))
    g = build_w("trace", path=str(p), normalisation="none")
    _is_valid(g)
    dense = g.csr.toarray()
    assert dense[0, 1] == dense[1, 0] == 3.0 and dense[1, 2] == 1.0
    q = tmp_path / "t.csv"
    q.write_text("i,j,w\n0,1,2\n1,2,1\n0,1,1\n")
    g2 = build_w("trace", path=str(q), normalisation="none")
    np.testing.assert_array_equal(g2.csr.toarray(), dense)


def test_corrupt_trace_strict_and_lenient(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join([
        json.dumps({"src": 0, "dst": 1, "w": 1.0}),
        "{not json",
        json.dumps({"src": 0, "dst": 9, "w": 1.0}),
        json.dumps({"src": 0, "dst": 1, "w": float("nan")}),
        json.dumps({"src": 1, "dst": 2, "w": -1}),
        json.dumps({"dst": 2}),
        json.dumps({"src": 1, "dst": 2, "w": 0.5}),
    ]))
    with pytest.raises(TraceError) as e:
        build_w("trace", path=str(p), D=3)
    lines = [n for n, _ in e.value.problems]
    assert lines == [2, 3, 4, 5, 6]
    assert "line 2" in str(e.value)
    with pytest.warns(TraceWarning, match="skipped 5 bad lines: line 2"):
        g = build_w("trace", path=str(p), D=3, strict=False, normalisation="none")
    assert g.meta["trace"]["skipped"] == 5 and g.meta["trace"]["events"] == 2
    assert g.csr.toarray()[1, 2] == 0.5
    with pytest.raises(TraceError, match="not found"):
        build_w("trace", path=str(tmp_path / "missing.jsonl"))


def test_activations_hub_correction():
    rng = np.random.default_rng(0)
    t, d = 2000, 12
    acts = np.zeros((t, d), np.float32)
    acts[:, 0] = 1.0  # always-active hub channel
    group = rng.random(t) < 0.3
    acts[group, 1:4] = 1.0  # channels 1-3 fire together
    acts[:, 4:] = (rng.random((t, d - 4)) < 0.3).astype(np.float32)
    raw = build_w("activations", acts=acts, hub="none", normalisation="none").csr.toarray()
    assert raw[0, 5] > raw[1, 5]  # the hub dominates raw co-activation counts
    for hub in ("sym", "pmi"):
        w = build_w("activations", acts=acts, hub=hub, normalisation="none").csr.toarray()
        assert w[1, 2] > 1.5 * max(w[0, 1], w[0, 5], 1e-9), hub  # co-firing beats the hub
    corr = build_w("activations", acts=acts, mode="correlation", normalisation="none")
    assert corr.csr.toarray()[1, 2] == pytest.approx(1.0, abs=1e-4)
    for hub in ("sym", "pmi"):
        full = build_w("activations", acts=acts, hub=hub, topk=None,
                       normalisation="none").csr.toarray()
        top = build_w("activations", acts=acts, hub=hub, topk=2,
                      normalisation="none").csr.toarray()
        assert (top > 0).sum() <= 2 * 2 * d  # each row contributes <= k entries (+ mirror)
        for i in range(d):  # every row keeps its own k heaviest (positive) entries
            heaviest = np.argsort(-full[i])[:2]
            assert np.all(top[i, heaviest][full[i, heaviest] > 0] > 0)
        assert np.all((top == 0) | np.isclose(top, full))


def test_normalisation_and_nnz_cap():
    g = build_w("mock", D=300, blocks=3, avg_degree=10, seed=0, normalisation="sym")
    raw = build_w("mock", D=300, blocks=3, avg_degree=10, seed=0).csr.astype(np.float64)
    deg = np.asarray(raw.sum(1)).ravel()
    expected = raw.toarray() / np.sqrt(np.outer(deg, deg))
    np.testing.assert_allclose(g.csr.toarray(), expected, rtol=1e-5, atol=1e-7)
    row = build_w("mock", D=300, blocks=3, avg_degree=10, seed=0, normalisation="row")
    _is_valid(row)
    capped = build_w("mock", D=300, blocks=3, avg_degree=10, seed=0, nnz_cap=500)
    _is_valid(capped)
    assert capped.csr.nnz <= 500
    kept = capped.csr.data.min()
    dropped = sp.csr_matrix(raw - raw.multiply(capped.csr > 0)).data
    assert dropped.size == 0 or dropped.max() <= kept + 1e-6  # the heaviest edges stay


def test_bad_config_and_bad_w():
    with pytest.raises(ConfigError, match="unknown"):
        build_w("mock", D=10, colour="red")
    with pytest.raises(ConfigError, match="source"):
        build_w("csv")
    with pytest.raises(ConfigError, match="normalisation"):
        build_w("mock", D=10, blocks=2, normalisation="l2")
    bad = sp.csr_matrix(np.array([[0, np.nan], [np.nan, 0]]))
    with pytest.raises(GraphError, match="NaN"):
        validate(bad)
    with pytest.raises(GraphError, match="symmetric"):
        validate(sp.csr_matrix(np.array([[0, 1.0], [0, 0]])))
    with pytest.raises(GraphError, match="negative"):
        validate(sp.csr_matrix(np.array([[0, -1.0], [-1.0, 0]])))
    with pytest.raises(GraphError, match="NaN"):
        build_w("activations", acts=np.array([[np.nan, 1.0]]))
    assert icd_jax.build_w is build_w


@pytest.mark.parametrize("hub", ["sym", "pmi", "none"])
@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("top_frac", [None, 0.2])
def test_activations_row_blocks_match_one_block(hub, topk, top_frac):
    from icd_jax import graph

    acts = (np.random.default_rng(1).random((300, 40)) < 0.2).astype(np.float32)
    one = graph.from_activations(acts, hub=hub, topk=topk, top_frac=top_frac).toarray()
    blocked = graph.from_activations(acts, hub=hub, topk=topk, top_frac=top_frac,
                                     block_elements=40 * 7).toarray()  # blocks of 7 rows
    np.testing.assert_allclose(blocked, one, rtol=1e-6)
    assert np.allclose(one, one.T)


@pytest.mark.parametrize("kind", ["pathlib", "str", "pathlike"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_trace_path_accepts_any_pathlike(tmp_path, kind, suffix):
    p = tmp_path / f"t{suffix}"
    p.write_text("0,1,2\n1,2,1\n" if suffix == ".csv" else
                 '{"src": 0, "dst": 1, "w": 2}\n{"src": 1, "dst": 2, "w": 1}\n')

    class Custom:
        def __fspath__(self):
            return str(p)

    arg = {"pathlib": p, "str": str(p), "pathlike": Custom()}[kind]
    g = build_w("trace", path=arg, normalisation="none")
    assert g.csr.toarray()[0, 1] == 2.0 and g.csr.toarray()[1, 2] == 1.0
    assert g.meta["trace"]["path"] == os.path.abspath(p)
    with pytest.raises(ConfigError, match="path"):
        build_w("trace", path=123)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("bad", ["1e40", "-1e40", "inf", "nan", "3.5e38"])
def test_trace_overflowing_weight_names_its_line(tmp_path, fmt, bad):
    """Weights that are finite in float64 but not in W's float32 are bad lines too."""
    lines = [(0, 1, "1.0"), (1, 2, bad), (2, 3, "0.5")]
    p = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        p.write_text("".join(f"{i},{j},{w}\n" for i, j, w in lines))
    else:  # JSON numbers (json reads NaN/Infinity too)
        lit = {"inf": "Infinity", "nan": "NaN"}.get(bad, bad)
        p.write_text("".join(f'{{"src": {i}, "dst": {j}, "w": {lit if w == bad else w}}}\n'
                             for i, j, w in lines))
    with pytest.raises(TraceError, match="line 2") as e:
        build_w("trace", path=p)
    assert [n for n, _ in e.value.problems] == [2]
    with pytest.warns(TraceWarning, match="line 2"):
        g = build_w("trace", path=p, strict=False, normalisation="none")
    dense = g.csr.toarray()
    assert dense[0, 1] == 1.0 and dense[1, 2] == 0.0 and dense[2, 3] == 0.5
    assert g.meta["trace"]["skipped"] == 1


def test_trace_accumulated_overflow_names_lines(tmp_path):
    """Two weights that each fit float32 but whose sum (one edge) does not."""
    p = tmp_path / "t.csv"
    p.write_text("0,1,3e38\n1,2,1\n1,0,3e38\n")
    with pytest.raises(TraceError, match=r"lines 1, 3"):
        build_w("trace", path=p)
    with pytest.warns(TraceWarning, match=r"lines 1, 3"):
        g = build_w("trace", path=p, strict=False, normalisation="none")
    assert g.csr.toarray()[0, 1] == 0 and g.csr.toarray()[1, 2] == 1.0


def test_lenient_trace_warns_for_every_kind_of_bad_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("0,1,1\nx,y\n0,1,-2\n")
    with pytest.warns(TraceWarning, match=r"2 bad lines.*line 2.*line 3"):
        g = build_w("trace", path=p, strict=False)
    assert g.meta["trace"]["skipped"] == 2


# -- dense activations: activity rule, defaults, degenerate graphs ----------------------
def gelu_groups(tokens, groups, size, noise, spread=0.0, bias=-0.5, seed=0):
    """Dense GELU activations whose channel groups share a latent factor (shuffled)."""
    from scipy.special import erf

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(groups), size)
    pre = (rng.standard_normal((tokens, groups))[:, labels] * rng.uniform(0.5, 1.5, labels.size)
           + noise * rng.standard_normal((tokens, labels.size)) + bias)
    acts = 0.5 * pre * (1 + erf(pre / np.sqrt(2))) * np.exp(spread * rng.standard_normal(
        labels.size))
    perm = rng.permutation(labels.size)
    return acts[:, perm].astype(np.float32), labels[perm]


def purity(labels, pi, k):
    """Reference block purity: plain loops over the k contiguous position blocks."""
    from collections import Counter

    n = len(pi)
    shares = []
    for b in range(k):
        block = [labels[pi[p]] for p in range(n) if p * k // n == b]
        if block:
            shares.append(Counter(block).most_common(1)[0][1] / len(block))
    return float(np.mean(shares))


@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 10_000),
       st.sampled_from([None, 0.01, 0.3, 0.5, 1.0]), st.sampled_from([0.0, 0.5]))
def test_activity_matches_per_token_reference(tokens, d, seed, top_frac, tau):
    from icd_jax.graph import activity

    # small integers: many ties at the per-token cut-off, and exact zeros
    a = np.random.default_rng(seed).integers(-2, 3, (tokens, d)).astype(np.float32)
    got = activity(a, tau=tau, top_frac=top_frac)
    for t in range(tokens):
        mag = sorted(np.abs(a[t]).tolist(), reverse=True)
        k = d if top_frac is None else max(1, math.ceil(top_frac * d))
        for c in range(d):
            assert got[t, c] == (abs(a[t, c]) > tau and abs(a[t, c]) >= mag[k - 1])


@pytest.mark.parametrize("cfg", [
    dict(groups=4, size=32, noise=2.0),
    dict(groups=8, size=16, noise=1.5, spread=0.5),
    dict(groups=4, size=32, noise=1.5, bias=-2.0),
])
def test_default_activation_graph_recovers_planted_groups(cfg):
    """Defaults on dense GELU activations: groups come out contiguous (old defaults,
    tau=0 without a per-token top fraction, gave a uniform graph and purity ~1/groups)."""
    acts, labels = gelu_groups(1024, seed=1, **cfg)
    assert (acts != 0).mean() > 0.99  # dense
    k = cfg["groups"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default graph is not degenerate
        g = build_w("activations", acts=acts)
    pi, _ = icd_jax.fit_permutation(g, time_budget_s=None, refine_steps=500,
                                    cfg=icd_jax.CostConfig(k_blocks=k))
    assert purity(labels, pi, k) >= 0.9
    assert icd_jax.cost.block_purity(labels, pi, k) == pytest.approx(purity(labels, pi, k))
    assert g.meta["activations"]["top_frac"] is not None  # effective settings recorded


@pytest.mark.parametrize("opts, match", [
    (dict(tau=0.0, top_frac=None), "active on 100.0% of tokens.*top_frac"),
    (dict(tau=0.0, top_frac=None, hub="pmi"), "active on 100.0% of tokens.*top_frac"),
    (dict(tau=0.0, top_frac=None, hub="none"), "active on 100.0%"),
])
def test_saturated_activations_warn(opts, match):
    acts, _ = gelu_groups(256, 4, 8, 1.0)
    acts[acts == 0] = 1e-3  # every entry non-zero: every channel active on every token
    with pytest.warns(DegenerateGraphWarning, match=match):
        g = build_w("activations", acts=acts, **opts)
    assert g.meta["degenerate"]


def test_degenerate_graphs_warn_and_informative_ones_do_not(tmp_path):
    from icd_jax.graph import degeneracy

    d = 6
    uniform = tmp_path / "uniform.csv"  # every pair once with weight 1: no locality
    uniform.write_text("".join(f"{i},{j},1\n" for i in range(d) for j in range(i + 1, d)))
    with pytest.warns(DegenerateGraphWarning, match="near-uniform.*100.0% of channel pairs"):
        build_w("trace", path=uniform)
    loops = tmp_path / "loops.csv"  # only self loops: no edges at all
    loops.write_text("0,0,1\n1,1,2\n2,2,1\n")
    with pytest.warns(DegenerateGraphWarning, match="no edges"):
        build_w("trace", path=loops)
    with pytest.warns(DegenerateGraphWarning, match="no edges"):
        build_w("activations", acts=np.zeros((10, 5)))
    rng = np.random.default_rng(0)
    a = np.triu(rng.random((d, d)) + 0.1, 1)
    assert degeneracy(sp.csr_matrix(a + a.T)) is None  # complete, but weights vary
    ring = sp.csr_matrix(np.roll(np.eye(d), 1, 1) + np.roll(np.eye(d), -1, 1))
    assert degeneracy(ring) is None  # uniform weights, but sparse: a real structure
    assert degeneracy(sp.csr_matrix((1, 1))) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_w("mock", D=200, blocks=4, seed=0)
        build_w("activations", acts=gelu_groups(256, 4, 8, 1.0)[0])


def test_bad_activation_options():
    acts = np.ones((4, 4))
    for opts, match in [(dict(top_frac=0.0), "top_frac=0.0"), (dict(top_frac=1.5), "top_frac"),
                        (dict(tau=-1.0), "tau=-1.0"), (dict(topk=0), "topk=0"),
                        (dict(block_elements=0), "block_elements")]:
        with pytest.raises(ConfigError, match=re.escape(match)):
            build_w("activations", acts=acts, **opts)


@given(st.integers(0, 5), st.integers(0, 8), st.integers(0, 1000),
       st.sampled_from(["coactivation", "correlation"]))
def test_activations_any_small_shape_gives_a_valid_graph(tokens, d, seed, mode):
    a = np.random.default_rng(seed).integers(-1, 3, (tokens, d)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from empty means either
        warnings.simplefilter("ignore", DegenerateGraphWarning)
        g = build_w("activations", acts=a, mode=mode, standardise=seed % 2 == 0)
    w = g.csr.toarray()
    assert w.shape == (d, d) and g.meta["D"] == d and g.meta["nnz"] == g.csr.nnz
    assert np.allclose(w, w.T) and (w >= 0).all() and np.isfinite(w).all()
    assert not np.diag(w).any()
