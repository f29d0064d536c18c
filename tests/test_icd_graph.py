"""Co-access graph construction: mock, traces (corrupt lines), activations, options."""

import json
import os

import numpy as np
import pytest
import scipy.sparse as sp

import icd_jax
from icd_jax.errors import ConfigError, GraphError, TraceError, TraceWarning
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
    full = build_w("activations", acts=acts, normalisation="none").csr.toarray()
    top = build_w("activations", acts=acts, topk=2, normalisation="none").csr.toarray()
    assert (top > 0).sum() <= 2 * 2 * d  # each row contributes at most k entries (+ mirror)
    for i in range(d):  # every row keeps its own k heaviest entries
        assert np.all(top[i, np.argsort(-full[i])[:2]] > 0)
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
def test_activations_row_blocks_match_one_block(monkeypatch, hub, topk):
    from icd_jax import graph

    acts = (np.random.default_rng(1).random((300, 40)) < 0.2).astype(np.float32)
    one = graph.from_activations(acts, hub=hub, topk=topk).toarray()
    monkeypatch.setattr(graph, "BLOCK_ELEMENTS", 40 * 7)  # blocks of 7 rows
    blocked = graph.from_activations(acts, hub=hub, topk=topk).toarray()
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
