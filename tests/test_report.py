"""The run report (icd_jax.runtime.report): report.html, report.csv and compare.html."""

from __future__ import annotations

import base64
import csv
import html.parser
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from icd_jax.errors import ArtifactError
from icd_jax.runtime import artifacts, figures, gates, report
from tests.run_fixture import make_run_dir

PNG = b"\x89PNG\r\n\x1a\n"
DATA_PNG = "data:image/png;base64,"


class _Collect(html.parser.HTMLParser):
    """Tags with their attributes, and the visible text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Collect:
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    p = _Collect()
    p.feed(doc)
    p.close()
    p.raw = doc
    p.plain = " ".join(" ".join(p.text).split())
    return p


def _images(p: _Collect) -> list[dict]:
    imgs = [a for t, a in p.tags if t == "img"]
    for a in imgs:
        src = a.get("src", "")
        assert src.startswith(DATA_PNG), src[:60]
        assert base64.b64decode(src[len(DATA_PNG):], validate=True).startswith(PNG)
        assert a.get("alt", "").strip(), "every figure needs alt text"
    return imgs


def _self_contained(p: _Collect) -> None:
    for tag, attrs in p.tags:
        assert tag not in ("script", "link", "iframe"), tag
        for k in ("src", "href"):
            v = attrs.get(k)
            if v is not None:
                assert not v.lower().startswith(("http:", "https:", "//")), (tag, v)
    assert "http://" not in p.raw.replace("http://www.w3.org", "")
    assert "https://" not in p.raw
    assert "@import" not in p.raw and "url(" not in p.raw


@pytest.fixture(scope="module")
def iterative(tmp_path_factory):
    d = make_run_dir(tmp_path_factory.mktemp("it") / "run")
    return d, report.build(d)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    d = make_run_dir(tmp_path_factory.mktemp("lin") / "run", mode="linear")
    return d, report.build(d)


def test_build_writes_both_files_and_returns_paths(iterative):
    d, out = iterative
    assert set(out) == {"html", "csv", "figures", "problems", "elapsed_s"}
    assert out["html"] == os.path.join(d, "report.html") and os.path.isfile(out["html"])
    assert out["csv"] == os.path.join(d, "report.csv") and os.path.isfile(out["csv"])
    assert 0 <= out["elapsed_s"] < 30
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]  # atomic writes cleaned up


def test_iterative_html_parses_and_embeds_every_figure(iterative):
    _, out = iterative
    assert out["figures"] == ["w_heatmaps", "latency", "quality", "tiles", "cost"]
    p = _parse(out["html"])
    assert len(_images(p)) == len(out["figures"])
    ids = {a.get("id") for t, a in p.tags if t == "figure"}
    assert ids == {f"fig-{n}" for n in out["figures"]}
    _self_contained(p)


def test_linear_html_has_fewer_figures_and_no_crash(linear):
    _, out = linear
    assert out["figures"] == ["w_heatmaps", "latency", "tiles", "cost"]  # quality missing
    p = _parse(out["html"])
    assert len(_images(p)) == 4
    _self_contained(p)
    assert "not measured: quality not measured" in p.plain
    assert "wall-clock only: no device timer on this host" in p.plain  # degraded latency
    heat = [a for t, a in p.tags if t == "img"][0]["alt"]
    assert "perm_after" not in heat and "perm_before" in heat


def test_header_shows_model_mode_and_verdict(iterative):
    d, out = iterative
    m = artifacts.read_json(os.path.join(d, "metrics.json"))
    p = _parse(out["html"])
    assert any(t == "h1" for t, _ in p.tags)
    assert "minilm" in p.plain and "iterative" in p.plain
    assert m["verdict"]["summary"] in p.plain


def _rows(p: _Collect, first_cell: str) -> list[str]:
    """The plain text of the table rows whose first cell is ``first_cell``."""
    out, row, cur = [], None, None

    class Rows(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            nonlocal row, cur
            if tag == "tr":
                row = []
            elif tag in ("td", "th") and row is not None:
                cur = []

        def handle_endtag(self, tag):
            nonlocal row, cur
            if tag in ("td", "th") and row is not None and cur is not None:
                row.append(" ".join("".join(cur).split()))
                cur = None
            elif tag == "tr" and row is not None:
                if row and row[0] == first_cell:
                    out.append(row)
                row = None

        def handle_data(self, data):
            if cur is not None:
                cur.append(data)

    Rows().feed(p.raw)
    return out


def test_gates_table_statuses_and_reasons(iterative):
    d, out = iterative
    m = artifacts.read_json(os.path.join(d, "metrics.json"))
    p = _parse(out["html"])
    for name, g in m["gates"].items():
        rows = _rows(p, name)
        assert rows, name
        row = rows[0]
        assert g["status"] in row
        sense = gates.SENSE[name]
        assert row[1].startswith(sense + " ") and row[1].endswith(g["unit"])
        assert float(row[1].split()[1]) == g["target"]
        if g["status"] == "not measured":
            assert g["reason"] in row
            assert "met" not in row
    assert {g["status"] for g in m["gates"].values()} == {"met", "not met", "not measured"}


def test_not_measured_section_lists_null_metrics_with_reasons(iterative):
    d, out = iterative
    m = artifacts.read_json(os.path.join(d, "metrics.json"))
    p = _parse(out["html"])
    assert "Not measured on this host" in p.plain
    l2 = _rows(p, "l2_hit_pct (hardware L2 hit rate)")
    ept = _rows(p, "ept_j_per_tok (energy per token)")
    assert l2 and l2[0][1] == m["l2_hit_pct_reason"]
    assert ept and ept[0][1] == m["ept_reason"]
    assert "simulated" in p.plain.lower()


def test_gate_without_value_is_never_shown_as_met(tmp_path):
    d = make_run_dir(tmp_path / "run")
    path = os.path.join(d, "metrics.json")
    m = artifacts.read_json(path)
    m["gates"]["ept"] = {"target": "<= -15", "value": None, "unit": "%", "status": "met",
                         "reason": None}
    del m["gates"]["l2_hit"]
    artifacts.write_json(path, m)
    p = _parse(report.build(d)["html"])
    ept, l2 = _rows(p, "ept")[0], _rows(p, "l2_hit")[0]
    assert "not measured" in ept and "met" not in ept
    assert "not measured" in l2 and m["l2_hit_pct_reason"] in l2


def test_summary_marks_active_arm_and_simulated_label(iterative):
    d, out = iterative
    p = _parse(out["html"])
    assert "L2 hit % (simulated)" in p.plain
    assert sum(1 for t, a in p.tags if t == "tr" and a.get("class") == "active") == 1
    after = _rows(p, "after")[0]
    assert "active" in after


def test_csv_columns_and_values_match_metrics(iterative):
    d, out = iterative
    m = artifacts.read_json(os.path.join(d, "metrics.json"))
    with open(out["csv"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert tuple(reader.fieldnames) == report.CSV_COLUMNS
    assert report.CSV_COLUMNS == (
        "arm", "latency_mean_ms", "latency_p50_ms", "latency_p95_ms", "ci95_lo_ms",
        "ci95_hi_ms", "tokens_per_s", "quality_metric", "quality_value", "drop_pp",
        "tiles_per_token", "lines_per_token", "l2_hit_pct_sim", "active")
    assert [r["arm"] for r in rows] == m["arms"]
    for r in rows:
        arm = r["arm"]
        lat = m["latency"][arm]
        assert float(r["latency_mean_ms"]) == lat["mean_ms"]
        assert float(r["latency_p50_ms"]) == lat["p50_ms"]
        assert float(r["latency_p95_ms"]) == lat["p95_ms"]
        assert [float(r["ci95_lo_ms"]), float(r["ci95_hi_ms"])] == lat["ci95_ms"]
        assert float(r["tokens_per_s"]) == lat["tokens_per_s"]
        assert r["quality_metric"] == m["quality"]["metric"]
        assert float(r["quality_value"]) == m["quality"][arm]["value"]
        assert float(r["drop_pp"]) == m["quality"][arm]["drop_pp"]
        assert float(r["tiles_per_token"]) == m["tiles_per_token"][arm]
        assert float(r["lines_per_token"]) == m["lines_per_token"][arm]
        assert float(r["l2_hit_pct_sim"]) == m["l2_hit_pct_sim"][arm]
        assert r["active"] == ("true" if arm == m["active"] else "false")


def test_csv_rows_leave_missing_values_empty(linear, tmp_path):
    d, out = linear
    m = artifacts.read_json(os.path.join(d, "metrics.json"))
    rows = report.csv_rows(m)
    assert [r["arm"] for r in rows] == ["dense", "identity", "before"]
    for r in rows:
        assert list(r) == list(report.CSV_COLUMNS)
        assert r["quality_metric"] == r["quality_value"] == r["drop_pp"] == ""
        assert r["latency_mean_ms"] != ""
    d2 = make_run_dir(tmp_path / "nolat", missing_latency=True)
    rows = report.csv_rows(artifacts.read_json(os.path.join(d2, "metrics.json")))
    assert all(r["latency_mean_ms"] == r["ci95_lo_ms"] == r["tokens_per_s"] == ""
               for r in rows)
    assert report.csv_rows({}) == []


def test_missing_latency_report(tmp_path):
    d = make_run_dir(tmp_path / "run", missing_latency=True)
    out = report.build(d)
    assert "latency" not in out["figures"]
    p = _parse(out["html"])
    assert len(_images(p)) == len(out["figures"])
    assert "the timer failed on this host" in p.plain
    assert "not measured" in _rows(p, "latency")[0]


def test_missing_or_corrupt_metrics_raise_artifact_error(tmp_path):
    d = make_run_dir(tmp_path / "run")
    path = os.path.join(d, "metrics.json")
    os.unlink(path)
    with pytest.raises(ArtifactError, match="metrics.json"):
        report.build(d)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ArtifactError, match="metrics.json"):
        report.build(d)
    assert not os.path.exists(os.path.join(d, "report.html"))


def test_orders_of_the_wrong_length_are_a_listed_problem(tmp_path):
    # a probe: icd report exited 0 on a perm_active.json shorter than the run's axes
    d = make_run_dir(tmp_path / "run")
    path = os.path.join(d, "perm_active.json")
    artifacts.save_perms(path, {"ffn_0": np.arange(32), "residual": np.arange(7)},
                         {"arm": "after"})
    out = report.build(d)
    assert out["problems"] == [f"{path}: perms['ffn_0'] has 32 entries, but W.npz's graph "
                               "'ffn_0' has 64 channels"]
    assert "perm_active.meta" not in _parse(out["html"]).plain  # not shown as the run's
    res = subprocess.run([sys.executable, "-m", "icd_jax.cli", "report", d],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "perm_active.json: perms['ffn_0']" in res.stderr


def test_corrupt_optional_artefact_is_listed_not_fatal(tmp_path):
    d = make_run_dir(tmp_path / "run")
    with open(os.path.join(d, "W_after.npz"), "wb") as f:
        f.write(b"garbage")
    out = report.build(d)
    p = _parse(out["html"])
    assert "Artefact problems" in p.plain and "W_after.npz" in p.plain
    assert "w_heatmaps" in out["figures"]
    assert len(out["problems"]) == 1 and "W_after.npz" in out["problems"][0]
    # the command line writes the report too, then says what it could not read (exit 2)
    os.unlink(out["html"])
    res = subprocess.run([sys.executable, "-m", "icd_jax.cli", "report", d],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and os.path.exists(out["html"])
    assert "unreadable artefact" in res.stderr and "W_after.npz" in res.stderr


def test_rollback_notice(tmp_path):
    d = make_run_dir(tmp_path / "run", rollback=True)
    m = artifacts.read_json(os.path.join(d, "metrics.json"))
    p = _parse(report.build(d)["html"])
    assert any(t == "div" and a.get("id") == "rollback" for t, a in p.tags)
    assert f"rolled back from arm {m['rollback']['from']} to {m['rollback']['to']}" in p.plain
    assert m["rollback"]["reason"] in p.plain
    assert "ROLLBACK" in p.plain  # in the stage timeline


def test_no_rollback_notice_without_rollback(iterative):
    p = _parse(iterative[1]["html"])
    assert not any(a.get("id") == "rollback" for _, a in p.tags)


def test_timeline_lists_every_event(iterative):
    d, out = iterative
    p = _parse(out["html"])
    for ev in artifacts.read_events(os.path.join(d, "events.jsonl")):
        row = _rows(p, ev["stage"])[0]
        assert f"{ev['t_end'] - ev['t_start']:.3f}" in row and "ok" in row


def test_prepost_table_compares_dense_and_active(iterative):
    d, out = iterative
    m = artifacts.read_json(os.path.join(d, "metrics.json"))
    p = _parse(out["html"])
    assert f"dense vs active ({m['active']})" in p.plain
    row = _rows(p, "latency mean (ms)")[0]
    dense, act = m["latency"]["dense"]["mean_ms"], m["latency"][m["active"]]["mean_ms"]
    assert f"{100 * (act / dense - 1):+.2f} %" in row


def test_linear_vs_iterative_table_only_with_both_arms(iterative, linear):
    d, out = iterative
    m = artifacts.read_json(os.path.join(d, "metrics.json"))
    p = _parse(out["html"])
    assert "Linear vs iterative" in p.plain
    lin, it = m["latency"]["before"]["mean_ms"], m["latency"]["after"]["mean_ms"]
    rows = [r for r in _rows(p, "latency mean (ms)") if abs(float(r[1]) - lin) < 1e-2]
    assert len(rows) == 1 and abs(float(rows[0][2]) - it) < 1e-2
    assert abs(float(rows[0][4].rstrip(" %")) - 100 * (it / lin - 1)) < 1e-2
    assert "Linear vs iterative" not in _parse(linear[1]["html"]).plain


def test_text_is_escaped(tmp_path):
    d = make_run_dir(tmp_path / "run")
    path = os.path.join(d, "metrics.json")
    m = artifacts.read_json(path)
    m["run"]["model"] = "<script>alert(1)</script>"
    m["warnings"] = ["a & b <i>"]
    artifacts.write_json(path, m)
    p = _parse(report.build(d)["html"])
    assert not any(t in ("script", "i") for t, _ in p.tags)
    assert "&lt;script&gt;" in p.raw and "a &amp; b &lt;i&gt;" in p.raw


def test_blocksum_downsamples_and_reorders():
    rng = np.random.default_rng(0)
    dense = rng.random((600, 600)) * (rng.random((600, 600)) < 0.05)
    w = sp.csr_matrix(dense)
    perm = rng.permutation(600)
    g = figures.blocksum(w, perm, 256)
    assert g.shape == (256, 256)
    assert np.isclose(g.sum(), dense.sum())
    small = sp.csr_matrix(dense[:64, :64])
    p64 = rng.permutation(64)
    np.testing.assert_allclose(figures.blocksum(small, p64, 256),
                               dense[:64, :64][np.ix_(p64, p64)])


def test_big_graphs_are_downsampled_fast(tmp_path):
    d = make_run_dir(tmp_path / "run")
    rng = np.random.default_rng(1)
    n, nnz = 3000, 100_000
    r, c = rng.integers(0, n, nnz), rng.integers(0, n, nnz)
    w = sp.coo_matrix((rng.random(nnz), (r, c)), shape=(n, n)).tocsr()
    artifacts.save_graphs(os.path.join(d, "W.npz"), {"ffn_0": w + w.T})
    artifacts.save_perms(os.path.join(d, "perm_before.json"), {"ffn_0": rng.permutation(n)})
    out = report.build(d)
    assert out["elapsed_s"] < 30 and "w_heatmaps" in out["figures"]


def _compare_blob():
    rng = np.random.default_rng(3)
    a = rng.normal(10.0, 0.3, 30)
    b = a - rng.normal(1.2, 0.2, 30)
    d = b - a
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    return {
        "arms": {"linear": {"mean_ms": float(a.mean()), "ci95_ms": [9.8, 10.2],
                            "p95_ms": float(np.percentile(a, 95)), "tokens_per_s": 204.0,
                            "quality": 0.91},
                 "iterative": {"mean_ms": float(b.mean()), "ci95_ms": [8.6, 9.0],
                               "p95_ms": float(np.percentile(b, 95)), "tokens_per_s": 231.0,
                               "quality": 0.909}},
        "paired": {"latency_ms": {"a": "linear", "b": "iterative",
                                  "mean_diff": float(d.mean()),
                                  "ci95": [float(d.mean() - half), float(d.mean() + half)],
                                  "p_value": 1.2e-9, "p_value_t": 3.4e-12,
                                  "test": "Wilcoxon signed-rank (p_value), paired t "
                                          "(p_value_t)", "n": 30,
                                  "rel_diff_pct": float(100 * d.mean() / a.mean())}},
        "verdict": "iterative is faster than linear (p < 0.001)",
        "samples_ms": {"linear": a.tolist(), "iterative": b.tolist()},
    }


def test_compare_html(tmp_path):
    blob = _compare_blob()
    out = report.compare(str(tmp_path), blob)
    assert out["html"] == os.path.join(str(tmp_path), "compare.html")
    assert out["figures"] == ["paired_latency"]
    p = _parse(out["html"])
    assert len(_images(p)) == 1
    _self_contained(p)
    assert blob["verdict"] in p.plain
    heads = _rows(p, "metric")
    assert heads[0][1:] == ["linear", "iterative"]
    lat = _rows(p, "latency mean [95% CI] (ms)")[0]
    assert "[9.800, 10.20]" in lat[1] and "[8.600, 9.000]" in lat[2]
    paired = _rows(p, "latency_ms")[0]
    assert paired[1:3] == ["linear", "iterative"]
    assert paired[3] == f"{blob['paired']['latency_ms']['mean_diff']:+.3f}"
    assert "1.2e-09" in paired and "3.4e-12" in paired and paired[-1] == "30"
    assert "mean diff (b − a)" in _rows(p, "metric")[1]
    assert json.dumps(blob)  # the input stays JSON-shaped


def test_compare_without_samples_has_no_figure(tmp_path):
    blob = _compare_blob()
    del blob["samples_ms"]
    out = report.compare(str(tmp_path), blob)
    assert out["figures"] == []
    p = _parse(out["html"])
    assert not _images(p) and "no latency samples" in p.plain
    with pytest.raises(ArtifactError):
        report.compare(str(tmp_path), ["not", "a", "dict"])
