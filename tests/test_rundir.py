"""The run folder reader (icd_jax.runtime.rundir): file names, typed readers and the
typed errors a foreign or corrupt folder gives."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from icd_jax.errors import ArtifactError
from icd_jax.runtime import artifacts, report, rundir
from icd_jax.runtime.records import Gate, Metrics
from icd_jax.runtime.rundir import FILES, RunDir
from tests.run_fixture import AXES, D, make_run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("rundir") / "run")


@pytest.fixture
def fresh(tmp_path):
    """A run folder of its own, to corrupt."""
    return make_run_dir(tmp_path / "run")


def rewrite_metrics(folder: str, change) -> None:
    path = os.path.join(folder, FILES["metrics"])
    m = artifacts.read_json(path)
    change(m)
    with open(path, "w") as f:
        json.dump(m, f)


def test_files_registry_is_the_one_list_of_names():
    assert artifacts.prepare_run_dir is rundir.prepare_run_dir
    assert len(set(FILES.values())) == len(FILES)
    for key in ("stats_permuted", "stats_repermuted", "compare", "events_prev", "marker"):
        assert key in FILES
    assert set(rundir.STATS.values()) <= set(FILES)
    assert set(rundir.GRAPHS) | set(rundir.PERMS) <= set(FILES)


def test_a_run_folder_round_trips(run_dir):
    rd = RunDir(run_dir)
    assert rd.path("metrics") == os.path.join(run_dir, "metrics.json")
    assert rd.exists("w") and not rd.exists("compare")
    m = rd.metrics()
    assert isinstance(m, Metrics) and m.active == "after"
    assert m.dump() == artifacts.read_json(rd.path("metrics"))
    assert isinstance(m.gates["latency"], Gate)
    assert rd.lock()["config"]["pipeline"]["mode"] == "iterative"
    assert [e["stage"] for e in rd.events()][0] == "READY"
    perms, meta = rd.perms("perm_before")
    assert set(perms) == set(AXES) and meta["arm"] == "before"
    assert all(sorted(p) == list(range(D)) for p in perms.values())
    graphs = rd.graphs("w")
    assert set(graphs) == set(AXES) and graphs[AXES[0]].shape == (D, D)
    assert set(rd.stats("permuted")) == set(AXES)
    assert set(rd.stats("repermuted")) == set(AXES)


def test_missing_optional_files_and_unknown_keys_are_artifact_errors(run_dir):
    rd = RunDir(run_dir)
    with pytest.raises(ArtifactError, match="compare.json"):
        rd.compare()
    with pytest.raises(ArtifactError, match="state.json"):
        rd.state()
    with pytest.raises(ArtifactError, match="unknown run file"):
        rd.path("metrics_json")
    with pytest.raises(ArtifactError, match="cost stage"):
        rd.stats("sideways")
    with pytest.raises(ArtifactError, match="not a permutation file"):
        rd.perms("w")
    with pytest.raises(ArtifactError, match="not a graph file"):
        rd.graphs("perm_before")
    problems: list[str] = []
    assert rd.optional("compare", rd.compare, problems) is None and problems == []


def test_a_foreign_folder_is_refused(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an icd run folder.*metrics.json"):
        RunDir(user)
    with pytest.raises(ArtifactError, match="no such run folder"):
        RunDir(tmp_path / "absent")
    with pytest.raises(ArtifactError, match="no such run folder"):
        RunDir(user / "notes.txt")
    with pytest.raises(ArtifactError, match="metrics.json"):
        report.build(user)


def test_a_marked_folder_without_metrics_opens_but_metrics_are_missing(tmp_path):
    d = tmp_path / "run"
    rundir.prepare_run_dir(d)
    rd = RunDir(d)
    with pytest.raises(ArtifactError, match="metrics.json: no such artefact"):
        rd.metrics()


def test_corrupt_metrics_json_names_the_file(fresh):
    with open(os.path.join(fresh, "metrics.json"), "w") as f:
        f.write('{"arms": ["dense"], "act')  # truncated
    with pytest.raises(ArtifactError, match="metrics.json: corrupt JSON"):
        RunDir(fresh).metrics()
    with open(os.path.join(fresh, "metrics.json"), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(ArtifactError, match="metrics.json: expected a JSON object"):
        RunDir(fresh).metrics()


def test_unknown_top_level_key_names_the_file_and_key(fresh):
    rewrite_metrics(fresh, lambda m: m.update(lattency={"dense": 1.0}))
    with pytest.raises(ArtifactError, match=r"metrics.json: lattency: unknown key"):
        RunDir(fresh).metrics()


@pytest.mark.parametrize("change, where", [
    (lambda m: m.update(arms="dense"), "arms"),
    (lambda m: m.update(active=None), "active"),
    (lambda m: m["latency"]["dense"].update(mean_ms="fast"), "latency.dense.mean_ms"),
    (lambda m: m["latency"].update(dense=[1, 2]), "latency.dense"),
    (lambda m: m["tiles_per_token"].update(tile=True), "tiles_per_token.tile"),
    (lambda m: m["gates"]["latency"].update(status="passed"), "gates.latency.status"),
    (lambda m: m["rollback"].update(happened="no"), "rollback.happened"),
    (lambda m: m.update(warnings="none"), "warnings"),
])
def test_a_wrong_typed_value_names_the_file_and_key(fresh, change, where):
    rewrite_metrics(fresh, change)
    with pytest.raises(ArtifactError) as e:
        RunDir(fresh).metrics()
    assert "metrics.json" in str(e.value) and f"{where}:" in str(e.value)


def test_a_truncated_graph_file_names_the_file(fresh):
    path = os.path.join(fresh, "W.npz")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="W.npz"):
        RunDir(fresh).graphs("w")
    out = report.build(fresh)  # optional: listed as a problem, not fatal
    assert "w_heatmaps" not in out["figures"]
    with open(out["html"], encoding="utf-8") as f:
        assert "Artefact problems" in f.read()


def test_malformed_perms_stats_and_events_name_the_file(fresh):
    with open(os.path.join(fresh, "perm_after.json"), "w") as f:
        json.dump({"perms": {"ffn_0": ["a", "b"]}, "meta": {}}, f)
    with pytest.raises(ArtifactError, match="perm_after.json"):
        RunDir(fresh).perms("perm_after")
    with open(os.path.join(fresh, "stats_permuted.json"), "w") as f:
        json.dump({"ffn_0": 3}, f)
    with pytest.raises(ArtifactError, match="stats_permuted.json"):
        RunDir(fresh).stats("permuted")
    with open(os.path.join(fresh, "events.jsonl"), "a") as f:
        f.write("[1]\n")
    with pytest.raises(ArtifactError, match="events.jsonl"):
        RunDir(fresh).events()
    out = report.build(fresh)  # every one of them optional for the report
    with open(out["html"], encoding="utf-8") as f:
        page = f.read()
    for name in ("perm_after.json", "stats_permuted.json", "events.jsonl"):
        assert name in page


@pytest.mark.parametrize("change", [
    lambda m: m.update(gates={"latency": "met"}),
    lambda m: m.update(latency=[1, 2, 3]),
    lambda m: m.update(arms=[1, 2]),
    lambda m: m.update(quality={"metric": "acc", "dense": {"value": "high"}}),
    lambda m: m.update(cost={"permuted": {"C": "low"}}),
    lambda m: m.pop("active"),
])
def test_report_of_a_corrupt_folder_is_an_artifact_error(fresh, change):
    rewrite_metrics(fresh, change)
    with pytest.raises(ArtifactError, match="metrics.json"):
        report.build(fresh)
    assert not os.path.exists(os.path.join(fresh, "report.html"))


def test_perms_round_trip_exactly(tmp_path):
    d = make_run_dir(tmp_path / "run", mode="linear")
    rd = RunDir(d)
    saved, _ = artifacts.load_perms(os.path.join(d, "perm_active.json"))
    got, meta = rd.perms("perm_active")
    assert meta == {"arm": "before"}
    assert all(np.array_equal(saved[k], got[k]) for k in saved)
    assert not rd.exists("w_after") and not rd.exists("stats_repermuted")
