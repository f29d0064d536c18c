"""The pipeline on a tiny BERT: states, artefacts, rollback rules, cache, pair, export.

One target (a random-init 2-layer BERT with MiniLM's real tokenizer) is built once and
shared, so its compiled programs serve every run of this module.
"""

import glob
import os
import threading
import time

import numpy as np
import pytest
from filelock import FileLock

from icd_jax import cost as cost_lib
from icd_jax.adapters import tree
from icd_jax.errors import AdapterWarning, RunLockedError
from icd_jax.runtime import (
    arms,
    artifacts,
    cachesim,
    config,
    gates,
    orchestrator,
    permcache,
    runfiles,
    targets,
)

TINY = {"model": {"size": "tiny", "batch_size": 16, "max_tokens": 64},
        "graph": {"sentences": 32},
        "solver": {"time_budget_s": 0.5, "refine_steps": 3000},
        "quality": {"sentences": 48},
        "measure": {"sentences": 16, "sim_tokens": 48},
        "transform": {"quant": {"calib_sentences": 16}},
        "pipeline": {"repeats": 3, "warmup": 1, "retry_backoff_s": 0.01}}
STAGES = ["READY", "W_BUILT", "PERMUTED", "TRANSFORMED", "REPERMUTED", "MEASURED",
          "REPORTED"]


def tiny(tmp_path, **sections):
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["cache"] = {"dir": str(tmp_path / "cache")}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="module")
def target():
    return targets.make(config.load(TINY))


@pytest.fixture(scope="module")
def full(tmp_path_factory, target):
    d = tmp_path_factory.mktemp("run")
    return orchestrator.run(tiny(d), str(d / "out"), target=target)


def no_temp_files(folder):
    return [p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
            if p.endswith(".tmp")]


def stages(run_dir):
    return [(e["stage"], e["ok"]) for e in artifacts.read_events(
        os.path.join(run_dir, "events.jsonl"))]


def test_full_iterative_run_writes_every_artefact(full):
    assert full.ok and full.state == "REPORTED" and full.failed_stage is None
    for key in ("lock", "events", "w", "w_after", "w_meta", "perm_before", "perm_after",
                "perm_active", "metrics", "html", "csv", "stablehlo"):
        assert os.path.getsize(full.path(key)) > 0, key
    for name in ("stats_permuted.json", "stats_repermuted.json"):
        assert os.path.exists(os.path.join(full.out_dir, name))
    assert no_temp_files(full.out_dir) == []
    ev = artifacts.read_events(full.path("events"))
    names = [e["stage"] for e in ev if e["stage"] != "ROLLBACK"]
    assert names == STAGES
    assert all(e["t_start"] <= e["t_end"] and isinstance(e["meta"], dict) for e in ev)
    lock = artifacts.read_json(full.path("lock"))
    assert lock["config"]["model"]["size"] == "tiny"
    assert len(lock["env_hash"]) == 64 and lock["env"]["jax"]
    rollback = artifacts.read_json(full.path("metrics"))["rollback"]  # docs/pipeline.md
    assert set(rollback) == {"happened", "reason", "from", "to"}, rollback


def test_metrics_report_unmeasurable_as_null_with_reason(full):
    m = artifacts.read_json(full.path("metrics"))
    assert m["arms"] == ["dense", "identity", "before", "after"]
    for arm in m["arms"]:
        lat = m["latency"][arm]
        assert len(lat["samples_ms"]) == 3 and lat["ci95_ms"][0] <= lat["mean_ms"]
        assert lat["p50_ms"] <= lat["p95_ms"] and lat["tokens_per_s"] > 0
    assert m["l2_hit_pct"] is None and m["l2_hit_pct_reason"]
    assert m["ept_j_per_tok"] is None and m["ept_reason"]
    for key in ("tiles_per_token", "lines_per_token", "l2_hit_pct_sim"):
        assert m[key] is None and "never executed" in m[f"{key}_reason"]
    assert m["fallbacks"] == [] and m["transforms"]["quant"]["compute"]
    assert m["host_probe"]["f32_gops"] > 0 and m["host_probe"]["int8_gops"] > 0
    assert set(m["effects"]["layout"]) == {"identity", "before", "after"}
    for gate in ("l2_hit", "ept"):
        assert m["gates"][gate]["status"] == "not measured" and m["gates"][gate]["reason"]
    assert set(m["verdict"]["not_measured"]) >= {"l2_hit", "ept"}
    assert m["quality"]["dense"]["drop_pp"] == 0.0
    assert m["events"]["count"] >= len(STAGES)


def test_permutations_and_costs_match_independent_recomputation(full):
    graphs = artifacts.load_graphs(full.path("w"))
    perms, _ = artifacts.load_perms(full.path("perm_before"))
    stats = artifacts.read_json(os.path.join(full.out_dir, "stats_permuted.json"))
    cfg = cost_lib.CostConfig()
    for ax, w in graphs.items():
        assert sorted(perms[ax]) == list(range(w.shape[0]))
        o = cost_lib.objective(w, perms[ax], cfg)
        assert np.isclose(o["C"], stats[ax]["C"], rtol=1e-6)
        assert np.isclose(o["Q"], stats[ax]["Q"], rtol=1e-6)
    active, meta = artifacts.load_perms(full.path("perm_active"))
    want = "after" if not full.rolled_back else "before"
    ref, _ = artifacts.load_perms(full.path(f"perm_{want}"))
    assert meta["arm"] == full.active == want
    assert all(np.array_equal(active[k], ref[k]) for k in ref)


# A run whose FFN down projections really skip tiles: small calls (2 sentences, 64 packed
# rows at most) and tiles of 4 of the tiny BERT's 128 neurons.
SKIP = {"model": {"batch_size": 2},
        "transform": {"sparsity": {"enabled": True, "kind": "ffn", "mode": "skip",
                                   "tile": 4, "top_frac": 0.02, "max_rows": 64}}}


@pytest.fixture(scope="module")
def skip_target():
    cfg = {k: dict(v) for k, v in TINY.items()}
    for k, v in SKIP.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return targets.make(config.load(cfg))


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory, skip_target):
    d = tmp_path_factory.mktemp("skip")
    cfg = tiny(d, report={"stablehlo": False}, **SKIP)
    cfg["transform"] = {**cfg["transform"], **SKIP["transform"]}
    return orchestrator.run(cfg, str(d / "out"), target=skip_target)


def test_tiles_per_call_match_a_naive_count_of_what_the_skip_kernel_reads(skip_run,
                                                                          skip_target):
    m = artifacts.read_json(skip_run.path("metrics"))
    skips = skip_target.skipping_calls(skip_target.cfg.transform.sparsity)
    assert m["transforms"]["sparsity"]["skips_tiles"] and sum(skips) >= len(skips) // 2
    # a call too long to skip runs masked: a loud fallback, and it reads every tile
    assert (m["fallbacks"] == []) == all(skips)
    perms, _ = artifacts.load_perms(skip_run.path("perm_before"))
    arm = skip_target.arm("before", perms, skip_target.cfg.transform)
    calls = np.cumsum([0, *skip_target.call_tokens()])
    act = skip_target.activity(arm, int(calls[-1]))
    tile = m["tiles_per_token"]["tile"]
    naive = [sum(len({int(j) // tile for t in range(s, e) for j in np.flatnonzero(a[t])})
                 if k else a.shape[1] // tile for a in act)
             for s, e, k in zip(calls[:-1], calls[1:], skips)]
    assert np.isclose(m["tiles_per_token"]["before"], np.mean(naive))
    assert m["tiles_per_token_samples"]["before"] == naive
    assert m["tiles_per_token"]["calls"] == len(naive) and "union" in m["tiles_per_token"]["unit"]
    assert m["l2_hit_pct_sim"]["what"].startswith("simulated")
    assert "paired" in orchestrator.compare_modes(m) and "tiles_per_token" in (
        orchestrator.compare_modes(m)["paired"])


def test_skip_mode_on_calls_too_large_is_a_loud_fallback(target, tmp_path):
    t = config.load(tiny(tmp_path, transform={"sparsity": {
        "enabled": True, "kind": "ffn", "mode": "skip", "max_rows": 8}})).transform
    arm = target.arm("identity", target.identity(), t)
    s = arm.meta["sparsity"]
    assert s["skips_tiles"] is False and "ran masked" in s["fallbacks"][0]
    assert gates.fallbacks(arm.meta) == s["fallbacks"]


def test_linear_mode_skips_repermuted(tmp_path, target):
    res = orchestrator.run(tiny(tmp_path, pipeline={"mode": "linear"},
                                report={"stablehlo": False}), str(tmp_path / "lin"),
                           target=target)
    names = [s for s, _ in stages(res.out_dir) if s != "ROLLBACK"]
    assert names == [s for s in STAGES if s != "REPERMUTED"]
    assert not os.path.exists(res.path("w_after")) and res.active in ("before", "identity")
    assert artifacts.read_json(res.path("metrics"))["arms"] == ["dense", "identity", "before"]


@pytest.mark.parametrize("stage, prev", [("W_BUILT", "identity"), ("TRANSFORMED", "before"),
                                         ("REPERMUTED", "before"), ("MEASURED", "after")])
def test_failed_stage_rolls_back_to_last_good_order(tmp_path, target, stage, prev):
    res = orchestrator.run(tiny(tmp_path, report={"stablehlo": False}), str(tmp_path / "r"),
                           target=target, inject={stage: RuntimeError(f"boom in {stage}")})
    assert not res.ok and res.failed_stage == stage and res.active == prev
    ev = stages(res.out_dir)
    assert (stage, False) in ev and ("ROLLBACK", True) in ev and ev[-1] == ("REPORTED", True)
    active, meta = artifacts.load_perms(res.path("perm_active"))
    assert meta["arm"] == prev
    if prev != "identity":
        ref, _ = artifacts.load_perms(res.path(f"perm_{prev}"))
        assert all(np.array_equal(active[k], ref[k]) for k in ref)
    else:
        assert all(np.array_equal(v, np.arange(v.size)) for v in active.values())
    m = artifacts.read_json(res.path("metrics"))
    assert m["run"]["failed_stage"] == stage and "boom" in m["run"]["error"]
    assert m["rollback"]["happened"] and m["rollback"]["to"] == prev
    assert os.path.exists(res.path("html")) and no_temp_files(res.out_dir) == []


def test_transient_error_is_retried(tmp_path, target):
    res = orchestrator.run(tiny(tmp_path, pipeline={"mode": "linear"},
                                report={"stablehlo": False, "html": False}),
                           str(tmp_path / "t"), target=target,
                           inject={"W_BUILT": TimeoutError("device busy")})
    assert res.ok
    ev = artifacts.read_events(res.path("events"))
    w = [e for e in ev if e["stage"] == "W_BUILT"]
    assert len(w) == 1 and w[0]["ok"] and w[0]["meta"]["attempts"] == 2


def test_adapter_failure_is_a_no_op_with_warning(tmp_path, target, monkeypatch):
    def broken(*a, **k):
        raise FloatingPointError("scale underflow")

    monkeypatch.setattr(tree, "quantize", broken)
    with pytest.warns(AdapterWarning, match="quant"):
        arm = target.arm("x", target.identity(), config.load(TINY).transform)
    assert arm.meta["quant"]["ok"] is False
    res = orchestrator.run(tiny(tmp_path, pipeline={"mode": "linear"},
                                report={"stablehlo": False, "html": False}),
                           str(tmp_path / "a"), target=target)
    m = artifacts.read_json(res.path("metrics"))
    assert res.ok and m["transforms"]["quant"]["ok"] is False
    assert any("quant" in w for w in m["warnings"])


def test_solver_timeout_keeps_best_order_and_is_flagged(tmp_path, target):
    res = orchestrator.run(tiny(tmp_path, pipeline={"mode": "linear"},
                                solver={"time_budget_s": 1e-4, "refine_steps": 10**7},
                                report={"stablehlo": False, "html": False}),
                           str(tmp_path / "s"), target=target)
    stats = artifacts.read_json(os.path.join(res.out_dir, "stats_permuted.json"))
    assert res.ok and all(s["timed_out"] for s in stats.values())
    assert all(s["J"] <= s["J_identity"] + 1e-12 for s in stats.values())


def test_measurement_failure_degrades_to_wall_clock(tmp_path, skip_target, monkeypatch):
    def broken(*a, **k):
        raise OSError("perf counters unavailable")

    monkeypatch.setattr(cachesim, "replay", broken)
    cfg = tiny(tmp_path, pipeline={"mode": "linear"}, report={"stablehlo": False}, **SKIP)
    cfg["transform"] = {**cfg["transform"], **SKIP["transform"]}
    res = orchestrator.run(cfg, str(tmp_path / "m"), target=skip_target)
    m = artifacts.read_json(res.path("metrics"))
    assert res.ok and m["l2_hit_pct_sim"] is None and m["latency"]["before"]["mean_ms"] > 0
    assert any("cache simulation" in d for d in m["degraded"])


def test_quality_regression_restores_previous_order(tmp_path, target, monkeypatch):
    real = target.quality

    def worse(arm):  # "after" misses every item "before" hits: a significant loss
        q = real(arm)
        if arm.name == "before":
            return dict(q, samples=[100.0] * len(q["samples"]))
        if arm.name != "after":
            return q
        return dict(q, value=q["value"] - 5.0, samples=[0.0] * len(q["samples"]))

    monkeypatch.setattr(target, "quality", worse)
    res = orchestrator.run(tiny(tmp_path, report={"stablehlo": False}), str(tmp_path / "q"),
                           target=target)
    assert res.ok and res.rolled_back and res.active == "before"
    active, _ = artifacts.load_perms(res.path("perm_active"))
    before, _ = artifacts.load_perms(res.path("perm_before"))
    assert all(np.array_equal(active[k], before[k]) for k in before)
    m = artifacts.read_json(res.path("metrics"))
    assert m["rollback"]["happened"] and "quality" in m["rollback"]["reason"]
    assert ("ROLLBACK", True) in stages(res.out_dir)
    with open(res.path("html")) as f:
        assert "rollback" in f.read().lower()


def test_insignificant_quality_loss_is_kept_with_a_warning(tmp_path, target, monkeypatch):
    real, seen = target.quality, {}

    def slightly_worse(arm):  # 1 pp below "before" (beyond 0.1 pp), on identical items
        if arm.name == "after":
            return dict(seen["before"], value=seen["before"]["value"] - 1.0)
        seen[arm.name] = real(arm)
        return seen[arm.name]

    monkeypatch.setattr(target, "quality", slightly_worse)
    res = orchestrator.run(tiny(tmp_path, report={"stablehlo": False, "html": False}),
                           str(tmp_path / "k"), target=target)
    m = artifacts.read_json(res.path("metrics"))
    assert m["quality_samples"]["before"] == m["quality_samples"]["after"]  # McNemar p = 1
    assert res.active == "after" and not res.rolled_back
    assert any("not significant" in w for w in m["warnings"])


def test_corrupt_trace_aborts_or_falls_back_to_mock(tmp_path, target):
    bad = tmp_path / "trace.jsonl"
    bad.write_text('{"src": 0, "dst": 1, "w": 1.0}\nnot json\n')
    cfg = tiny(tmp_path, graph={"source": "trace", "trace_path": str(bad)},
               pipeline={"mode": "linear"}, report={"stablehlo": False, "html": False})
    res = orchestrator.run(cfg, str(tmp_path / "c1"), target=target)
    assert not res.ok and res.failed_stage == "W_BUILT"
    assert "trace" in artifacts.read_json(res.path("metrics"))["run"]["error"].lower()
    cfg["graph"]["fallback_mock"] = True
    res = orchestrator.run(cfg, str(tmp_path / "c2"), target=target)
    m = artifacts.read_json(res.path("metrics"))
    assert res.ok and any("mock" in w for w in m["warnings"])


def test_interrupt_leaves_no_partial_files_and_next_run_restarts(tmp_path, target):
    cfg = tiny(tmp_path, pipeline={"mode": "linear"}, report={"stablehlo": False})
    out = str(tmp_path / "i")
    with pytest.raises(KeyboardInterrupt):
        orchestrator.run(cfg, out, target=target, inject={"TRANSFORMED": KeyboardInterrupt()})
    assert artifacts.read_json(os.path.join(out, "state.json"))["state"] == "INTERRUPTED"
    assert no_temp_files(out) == [] and not os.path.exists(os.path.join(out, "metrics.json"))
    res = orchestrator.run(cfg, out, target=target, reuse_perm=True)
    assert res.ok and os.path.exists(os.path.join(out, "events.jsonl.prev"))
    assert stages(out)[0] == ("READY", True)


def test_permutation_cache_hit_and_miss(tmp_path, target):
    cfg = tiny(tmp_path, pipeline={"mode": "linear"},
               report={"stablehlo": False, "html": False})
    first = orchestrator.run(cfg, str(tmp_path / "a"), target=target, reuse_perm=True)
    second = orchestrator.run(cfg, str(tmp_path / "b"), target=target, reuse_perm=True)
    hits = [e["meta"]["cache_hits"] for run in (first, second)
            for e in artifacts.read_events(run.path("events")) if e["stage"] == "PERMUTED"]
    assert hits == [0, len(target.axes)]
    a, _ = artifacts.load_perms(first.path("perm_before"))
    b, _ = artifacts.load_perms(second.path("perm_before"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    cfg["solver"]["refine_steps"] = 3001  # another solver config is another key
    third = orchestrator.run(cfg, str(tmp_path / "c"), target=target, reuse_perm=True)
    assert [e["meta"]["cache_hits"] for e in artifacts.read_events(third.path("events"))
            if e["stage"] == "PERMUTED"] == [0]


def test_concurrent_runs_share_one_fit_under_the_lock(tmp_path):
    cache = permcache.PermCache(config.Cache(dir=str(tmp_path), reuse=True), reuse=True)
    calls, results = [], []

    def fit():
        calls.append(1)
        time.sleep(0.3)
        return np.arange(5)[::-1].astype(np.int32), {"J": 0.0}

    def worker():
        results.append(cache.get_or_fit({"k": 1}, fit))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r[2] for r in results) == [False, True]
    assert all(np.array_equal(r[0], [4, 3, 2, 1, 0]) for r in results)


def test_an_unusable_cache_dir_is_a_config_error_before_any_stage(tmp_path):
    # a probe saw it as a rollback after W_BUILT (os.makedirs inside get_or_fit)
    from icd_jax.errors import ConfigError

    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad, needle in ((afile, "exists and is not a folder"),
                        (afile / "sub", "is not a folder, so")):
        out = tmp_path / "out"
        with pytest.raises(ConfigError, match=f"cache.dir: .*{needle}"):
            orchestrator.run(tiny(tmp_path, cache={"dir": str(bad)}), str(out))
        assert not out.exists()
    assert permcache.dir_problem(str(tmp_path / "new" / "deeper")) is None
    permcache.check_dir(config.Cache(dir=str(afile), enabled=False))  # unused: fine
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_run_directory_lock(tmp_path, target):
    out = tmp_path / "locked"
    out.mkdir()
    with FileLock(str(out / ".icd.lock")):
        with pytest.raises(RunLockedError, match="in use"):
            orchestrator.run(tiny(tmp_path), str(out), target=target)


def test_pair_mode_writes_comparison(tmp_path, target):
    res, comp = orchestrator.pair(tiny(tmp_path, report={"stablehlo": False}),
                                  str(tmp_path / "p"), repeats=30, target=target)
    m = artifacts.read_json(res.path("metrics"))
    assert len(m["latency"]["before"]["samples_ms"]) == 30
    saved = artifacts.read_json(os.path.join(res.out_dir, "compare.json"))
    assert set(saved["arms"]) == {"linear", "iterative"}
    lat = saved["paired"]["latency_ms"]
    assert lat["n"] == 30 and lat["ci95"][0] <= lat["mean_diff"] <= lat["ci95"][1]
    d = (np.array(m["latency"]["after"]["samples_ms"])
         - np.array(m["latency"]["before"]["samples_ms"]))
    assert np.isclose(lat["mean_diff"], d.mean())
    assert "tiles_per_token" not in saved["paired"] and comp["verdict"]  # nothing skipped
    qual = saved["paired"]["quality"]
    lin, it = (np.array(m["quality_samples"][a]) for a in ("before", "after"))
    assert qual["n"] == 48 and np.isclose(qual["mean_diff"], (it - lin).mean())
    assert qual["exact"]["only_a"] == int(((lin > 0) & (it == 0)).sum())
    assert os.path.getsize(os.path.join(res.out_dir, "compare.html")) > 0


def test_export_of_active_model_matches_jax(full, target):
    from stablehlo_bridge.artifact import load_exported

    exp = load_exported(full.path("stablehlo"))
    _, _, _, args, _ = target.export_fn()
    got = np.asarray(exp.call(*args))
    want = np.asarray(target.enc.embed_packed(target.time_batches[0]))
    assert np.allclose(got, want, atol=2e-5), np.abs(got - want).max()


def test_hardware_l2_from_ncu_feeds_the_gate(tmp_path, target, monkeypatch):
    from icd_jax.runtime import measure

    seen = []

    def fake_ncu(command, timeout_s=600.0):
        seen.append(command)
        return (50.0 if command[-1] == "identity" else 65.0), None

    monkeypatch.setattr(measure, "ncu_status", lambda: (True, None))
    monkeypatch.setattr(measure, "ncu_l2_hit", fake_ncu)
    res = orchestrator.run(tiny(tmp_path, pipeline={"mode": "linear"},
                                report={"stablehlo": False, "html": False}),
                           str(tmp_path / "n"), target=target)
    m = artifacts.read_json(res.path("metrics"))
    assert [c[-1] for c in seen] == ["identity", "before"]
    assert all(c[1:3] == ["-m", "icd_jax.runtime.probe"] for c in seen)
    assert m["l2_hit_pct"] == {"identity": 50.0, "before": 65.0}
    if res.active == "before":
        assert m["gates"]["l2_hit"]["value"] == 15.0 and m["gates"]["l2_hit"]["status"] == "met"


def test_probe_rebuilds_an_arm_of_a_finished_run(full):
    from icd_jax.runtime import probe

    t, arm = probe.arm_of(full.out_dir, "after")
    ref, _ = artifacts.load_perms(full.path("perm_after"))
    assert all(np.array_equal(arm.perms[k], ref[k]) for k in ref)
    assert probe.main(["probe", full.out_dir, "before", "1"]) == 0
    with pytest.raises(Exception, match="unknown arm"):
        probe.arm_of(full.out_dir, "sideways")


def test_prepare_run_dir_states_and_refusals(tmp_path, monkeypatch):
    from icd_jax.errors import ArtifactError, ConfigError

    marker = runfiles.FILES["marker"]
    new = tmp_path / "new"
    assert artifacts.prepare_run_dir(new) == "absent" and (new / marker).exists()
    assert artifacts.prepare_run_dir(new) == "run"  # a run folder is reused
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".icd.lock").write_text("")  # a run lock alone is not a user file
    assert artifacts.prepare_run_dir(empty) == "empty"
    user = tmp_path / "user"
    user.mkdir()
    (user / "W_after.npz").write_text("mine")
    with pytest.raises(ArtifactError, match="--force"):
        artifacts.prepare_run_dir(user)
    assert os.listdir(user) == ["W_after.npz"]  # not even a marker was written
    assert artifacts.prepare_run_dir(user, force=True) == "foreign"
    assert artifacts.foreign_files(user) == {"W_after.npz"}
    assert artifacts.foreign_files(tmp_path) is None  # no marker
    with pytest.raises(ConfigError, match="empty"):
        artifacts.prepare_run_dir("")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        artifacts.prepare_run_dir(tmp_path / "file")
    with pytest.raises(ArtifactError, match="cannot write"):
        artifacts.prepare_run_dir(tmp_path / "file" / "sub")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(artifacts.os, "makedirs", denied)
    with pytest.raises(ArtifactError, match="cannot write.*Permission denied"):
        artifacts.prepare_run_dir(tmp_path / "ro")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_prepare_run_dir_refuses_a_read_only_folder(tmp_path):
    from icd_jax.errors import ArtifactError

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ArtifactError, match="cannot write"):
        artifacts.prepare_run_dir(ro)


def test_run_refuses_a_user_folder_before_touching_it(tmp_path):
    from icd_jax.errors import ArtifactError

    out = tmp_path / "mine"
    out.mkdir()
    mine = {"W_after.npz": "a", "perm_after.json": "b", "report.html": "c"}
    for name, text in mine.items():
        (out / name).write_text(text)
    with pytest.raises(ArtifactError, match="icd_run.json"):
        orchestrator.run(tiny(tmp_path), str(out))
    assert {p.name: p.read_text() for p in out.iterdir()} == mine


def test_restart_removes_only_stale_files_a_run_wrote(tmp_path):
    # every file a run writes as it goes: a failed new run must not report the old W,
    # orders, stats or StableHLO as its own (a probe found them in the new report)
    from icd_jax.runtime.runfiles import FILES, RUN_OUTPUTS

    stale = tuple(FILES[k] for k in RUN_OUTPUTS)
    assert {"W.npz", "perm_before.json", "stats_permuted.json", "model.stablehlo",
            "model.mlir", "model.json", "metrics.json", "report.html"} <= set(stale)
    cfg = config.load(tiny(tmp_path, pipeline={"mode": "linear"}))

    def folder(name, force, marked=True):
        d = tmp_path / name
        d.mkdir()
        for n in stale:
            (d / n).write_text("x")
        if marked:
            artifacts.prepare_run_dir(d, force=force)
        orchestrator.Run(cfg, str(d)).restart_cleanly()
        return {n for n in stale if (d / n).exists()}

    assert folder("no_marker", False, marked=False) == set(stale)  # not a run folder
    assert folder("forced", True) == set(stale)  # there before --force: kept
    d = tmp_path / "ours"
    artifacts.prepare_run_dir(d)
    for n in stale:
        (d / n).write_text("x")  # written after the marker: a previous run's
    orchestrator.Run(cfg, str(d)).restart_cleanly()
    assert not any((d / n).exists() for n in stale)


def test_a_forced_file_a_run_overwrote_is_the_runs(tmp_path):
    # a probe: user files of run names in a --force folder, overwritten by the first run,
    # were never cleaned, so a later failed run reported the first run's stats
    cfg = config.load(tiny(tmp_path, pipeline={"mode": "linear"}))
    d = tmp_path / "forced"
    d.mkdir()
    names = ("W.npz", "stats_permuted.json", "metrics.json", "perm_before.json")
    for n in names:
        (d / n).write_text("user")
    artifacts.prepare_run_dir(d, force=True)
    artifacts.write_json(d / "stats_permuted.json", {"C": 1.0})  # a run's atomic write
    (d / "W.npz").unlink()  # gone, then written by a run
    artifacts.write_bytes(d / "W.npz", b"run")
    with open(d / "metrics.json", "a") as f:  # written in place
        f.write("run")
    assert artifacts.foreign_files(d) == {"perm_before.json"}
    orchestrator.Run(cfg, str(d)).restart_cleanly()
    assert sorted(p.name for p in d.iterdir() if p.name in names) == ["perm_before.json"]
    assert (d / "perm_before.json").read_text() == "user"


def test_an_injected_fallback_is_loud_in_metrics_gates_report_and_summary(tmp_path, target,
                                                                           monkeypatch):
    from icd_jax.runtime.summary import summary_text

    real = target.arm

    def falls_back(name, perms, t, strict=False):
        arm = real(name, perms, t, strict)
        arm.meta["quant"] = dict(arm.meta["quant"], fallbacks=[
            "quant: 3 of 8 kernels ran weight-only float32 instead of int8"])
        return arm

    monkeypatch.setattr(target, "arm", falls_back)
    res = orchestrator.run(tiny(tmp_path, report={"stablehlo": False},
                                gates={"latency_pct": 1e9}), str(tmp_path / "f"),
                           target=target)
    m = artifacts.read_json(res.path("metrics"))
    assert m["fallbacks"] == ["quant: 3 of 8 kernels ran weight-only float32 instead of int8"]
    lat = m["gates"]["latency"]
    assert lat["measured_status"] == "met" and lat["status"] == "not met"
    assert lat["reason"].startswith("transform fell back: quant: 3 of 8")
    assert m["gates"]["ept"]["status"] == "not measured"  # unmeasured stays unmeasured
    with open(res.path("html")) as f:
        html = f.read()
    assert "Transforms that fell back" in html and "3 of 8 kernels" in html
    assert "FALLBACK: quant: 3 of 8" in summary_text(m, res.out_dir)
    assert any("fallback" in w for w in m["warnings"])


def test_quant_fallbacks_name_what_did_not_run():
    q = config.load({"transform": {"quant": {"group_size": 32}}}).transform.quant
    ok = dict(ok=True, compute={"int8": 4}, per_channel_fallback=[])
    assert arms.quant_fallbacks(q, ok, 4) == []
    slow = dict(ok=True, compute={"int8": 2, "float32-weight-only": 2},
                per_channel_fallback=["a/kernel"])
    falls = arms.quant_fallbacks(q, slow, 5)
    assert any("1 of 5 kernels not quantised" in f for f in falls)
    assert any("2 kernels ran weight-only" in f for f in falls)
    assert any("group_size 32 does not divide" in f for f in falls)
    assert arms.quant_fallbacks(q, dict(ok=False, warning="boom"), 4) == ["quant: boom"]
    weight_only = config.load({"transform": {"quant": {"act": "none"}}}).transform.quant
    assert arms.quant_fallbacks(weight_only, dict(ok=True, compute={
        "float32-weight-only": 4}), 4) == []


def test_effects_separate_the_transform_from_the_layout(full):
    m = artifacts.read_json(full.path("metrics"))
    eff = m["effects"]
    t = eff["transform"]
    assert t["arm"] == m["active"]
    assert np.isclose(t["latency_pct"], 100 * (m["latency"][m["active"]]["mean_ms"]
                                               / m["latency"]["dense"]["mean_ms"] - 1))
    for a in ("before", "after"):
        assert eff["layout"][a]["drop_pp"] == m["quality"][a]["drop_pp"]
        assert 0 <= eff["layout"][a]["p_vs_identity"] <= 1
    assert "identity order" in eff["layout_verdict"]


def test_no_fast_int8_host_names_the_probe_in_the_latency_gate(tmp_path, target, monkeypatch):
    from icd_jax.runtime import hostprobe

    slow = dict(shapes=[], f32_gops=200.0, int8_gops=150.0, w8a8_gops=120.0,
                int8_speedup=0.75, w8a8_speedup=0.6, fast_int8=False,
                flags={"avx2": True, "avx512_vnni": False}, method="fake")
    monkeypatch.setattr(hostprobe, "gemm_rates", lambda *a, **k: slow)
    res = orchestrator.run(tiny(tmp_path, pipeline={"mode": "linear"},
                                report={"stablehlo": False},
                                gates={"latency_pct": -1e9}), str(tmp_path / "s"),
                           target=target)
    g = artifacts.read_json(res.path("metrics"))["gates"]["latency"]
    assert g["status"] == "not met"
    assert "no fast int8" in g["reason"] and "W8A8 layer 120 GOP/s" in g["reason"]
