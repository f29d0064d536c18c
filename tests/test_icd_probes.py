"""What a new user of ``icd`` and the bridge ran into: each case was a bug found by
probing (a crash after a finished run, a raw error, a claim about what did not run)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from icd_jax import graph, solver
from icd_jax.adapters import tree
from icd_jax.errors import ConfigError
from icd_jax.runtime import config as config_lib
from icd_jax.runtime import gates, html, permcache, summary
from stablehlo_bridge import layout


def icd(*args):
    return subprocess.run([sys.executable, "-m", "icd_jax.cli", *args], capture_output=True,
                          text=True, timeout=300)


# -- the command line ---------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["run", "--bogus-flag"], "Unknown command line flag 'bogus_flag'"),
    (["run", "--pair_repeats=abc"], "flag --pair_repeats=abc"),
    (["report", "a", "b"], "unexpected arguments ['b']"),
    (["run", "stray", "--dry-run"], "unexpected arguments ['stray']"),
    (["run", "--dry-run", "--set", "pipeline.seed=-1"], "pipeline.seed"),
    (["run", "--dry-run", "--set", "model.target="], "model.target must be"),
])
def test_bad_usage_exits_2_with_one_line(args, message):
    res = icd(*args)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch):
    from icd_jax import cli
    from icd_jax.runtime import orchestrator

    class Interrupted:
        def __init__(self, *a, **k):
            pass

        def execute(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(orchestrator, "Run", Interrupted)
    cli.FLAGS(["icd", "--out", str(tmp_path / "out")])
    try:
        assert cli.main(["icd", "run"]) == 130
    finally:
        cli.FLAGS.unparse_flags()


@pytest.mark.parametrize("bad", [{"seed": -1}, {"seed": 2**40}])
def test_config_bounds_the_seed(bad):
    with pytest.raises(ConfigError, match="pipeline.seed"):
        config_lib.load(None, [f"pipeline.seed={bad['seed']}"])


# -- what the run reports -------------------------------------------------------------------
def test_summary_of_a_single_repeat_has_no_interval():
    lat = dict(mean_ms=1.5, ci95_ms=[None, None], tokens_per_s=10.0)
    text = summary.summary_text(dict(arms=["dense"], latency={"dense": lat}), "out")
    assert "1.5 (CI n/a)" in text
    tol = config_lib.load(None, []).rollback
    slow = dict(lat, mean_ms=9.0)
    reasons, _ = gates.regressions(tol, dict(latency={"a": lat, "b": slow}), "b", "a")
    assert reasons == []  # no interval, so no disjoint CI95s to call a regression


def test_latency_gate_blames_int8_only_when_int8_ran():
    targets = config_lib.load(None, []).gates
    probe = dict(fast_int8=False, w8a8_speedup=0.9, f32_gops=10.0, int8_gops=9.0,
                 w8a8_gops=9.0, flags={"avx512_vnni": True})
    lat = {"dense": dict(mean_ms=1.0), "iterative": dict(mean_ms=2.0)}
    for int8_kernels, blamed in (([], False), (["fc/kernel"], True)):
        m = dict(latency=lat, host_probe=probe,
                 transforms={"quant": dict(int8_kernels=int8_kernels)})
        g = gates.evaluate(targets, m, "iterative")["latency"]
        assert g["status"] == "not met"
        assert ("no fast int8" in (g["reason"] or "")) == blamed


def test_report_names_int8_flags_as_what_the_cpu_reports():
    assert "although the CPU reports avx512_vnni" in html._int8_verdict(
        dict(fast_int8=False, flags={"avx512_vnni": True, "amx_int8": False}))
    assert "reports neither VNNI nor AMX" in html._int8_verdict(
        dict(fast_int8=False, flags={"avx2": True}))
    assert html._int8_verdict(dict(fast_int8=True)) == "fast int8 on this host."


def test_quant_record_counts_only_kernels_that_ran_grouped():
    rng = np.random.default_rng(0)
    params = {"fc": {"kernel": rng.standard_normal((32, 8)).astype(np.float32)},
              "proj": {"kernel": rng.standard_normal((40, 8)).astype(np.float32)}}
    _, meta = tree.quantize(params, ["fc/kernel", "proj/kernel"], "int8", group_size=48)
    assert meta["settings"]["grouped_kernels"] == 0
    assert sorted(meta["per_channel_fallback"]) == ["fc/kernel", "proj/kernel"]
    assert meta["delta_layout"]["repermute"] is False
    _, meta = tree.quantize(params, ["fc/kernel", "proj/kernel"], "int8", group_size=8)
    assert meta["settings"]["grouped_kernels"] == 2 and meta["delta_layout"]["repermute"]


# -- inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(p_intra=2.0), dict(D=16.5), dict(noise=-1),
                                 dict(avg_degree=float("nan")), dict(seed=-3)])
def test_mock_graph_options_are_checked(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        graph.build_w("mock", **{"D": 16, **bad})


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2**70), dict(refine_steps=-1)])
def test_solver_checks_seed_and_steps(bad):
    w = graph.build_w("mock", D=16, blocks=2).csr
    with pytest.raises(ConfigError, match=next(iter(bad))):
        solver.fit_permutation(w, **bad)


def test_permutation_cache_refits_entries_that_do_not_fit(tmp_path):
    cfg = config_lib.load(None, [f"cache.dir={tmp_path}"]).cache
    cache = permcache.PermCache(cfg, reuse=True)
    calls = []

    def fit():
        calls.append(1)
        return np.arange(4)[::-1].astype(np.int32), dict(C=1.0, C_identity=2.0, Q=0.1,
                                                          Q_identity=0.0)

    key = {"k": 1}
    pi, _, hit = cache.get_or_fit(key, fit, size=4, stats=permcache.FIT_STATS)
    assert not hit and len(calls) == 1
    (entry,) = tmp_path.glob("*.json")
    good = json.loads(entry.read_text())
    for change in ({"perms": {"zzz": [0, 1, 2, 3]}}, {"perms": {"pi": [1, 0]}},
                   {"meta": {"stats": 5}}, {"meta": [1]}):
        entry.write_text(json.dumps({**good, **change}))
        pi, st, hit = cache.get_or_fit(key, fit, size=4, stats=permcache.FIT_STATS)
        assert not hit and len(pi) == 4 and st["cache"] == "miss"
    pi, _, hit = cache.get_or_fit(key, fit, size=4, stats=permcache.FIT_STATS)
    assert hit and len(calls) == 5


def test_bridge_refuses_a_negative_axis():
    with pytest.raises(layout.SpecError, match="negative"):
        layout.resolve({"w1": (-1, np.arange(4))})


@pytest.mark.parametrize("field, value", [("tags", 5), ("tags", "abc"), ("tags", [1]),
                                          ("tags", {"@main": 5}), ("sha256", 123),
                                          ("bytes", "9"), ("name", 7)])
def test_sidecar_fields_of_a_wrong_type_are_artifact_errors(tmp_path, field, value):
    from stablehlo_bridge import (
        ArtifactError,
        export,
        export_artifacts,
        load_exported,
        load_module,
    )
    from tests.bridge_cases import mlp

    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((3, 4)).astype(np.float32),
              "b1": rng.standard_normal(4).astype(np.float32),
              "w2": rng.standard_normal((4, 2)).astype(np.float32)}
    paths = export_artifacts(export(mlp, params, np.ones((2, 3), np.float32)),
                             tmp_path / "model.stablehlo")
    side = json.loads(open(paths["sidecar"]).read())
    if field == "tags":
        side["tags"] = value
    else:
        for entry in side["files"].values():
            entry[field] = value
    with open(paths["sidecar"], "w") as f:
        json.dump(side, f)
    with pytest.raises(ArtifactError):
        load_module(tmp_path / "model.stablehlo")
    if field != "tags":
        with pytest.raises(ArtifactError, match=field):
            load_exported(tmp_path / "model.stablehlo")


def test_dry_run_plan_of_a_custom_target_names_only_what_applies():
    cfg = config_lib.load("examples/tiny_gpt.yaml", [])
    text = summary.plan_text(cfg)
    assert "load custom" in text and "(L6)" not in text
    assert "the target's own batches" in text and "tiles/token" not in text
    assert "(400 items" in summary.plan_text(config_lib.load(None, []))


def test_pair_dry_run_names_the_rounds_pair_times():
    res = icd("pair", "--dry-run", "--pair_repeats", "40")
    assert res.returncode == 0, res.stderr
    assert "latency (40 interleaved rounds" in res.stdout
    assert "latency (10 interleaved rounds" in icd("run", "--dry-run").stdout


def test_cost_api_names_a_bad_graph_or_block_count():
    import scipy.sparse as sp

    from icd_jax import cost

    w = sp.random(6, 6, density=0.5, random_state=0)
    w = w + w.T
    pi = np.arange(6)
    dense = cost.modularity(w.toarray(), pi, 2)  # dense arrays are accepted
    assert dense == pytest.approx(cost.modularity(w, pi, 2))
    with pytest.raises(ConfigError, match=r"k_blocks must be an integer in \[1"):
        cost.modularity(w, pi, 0)
    for fn in (lambda g: cost.modularity(g, pi, 2), lambda g: cost.cache_cost(g, pi)):
        with pytest.raises(ConfigError, match=r"square \[D, D\] co-access graph, got shape"):
            fn(sp.random(6, 5, density=0.5, random_state=0))
    from icd_jax.errors import GraphError

    for bad in (np.nan, np.inf):  # objective returned Q = nan for a NaN edge
        g = w.toarray()
        g[0, 1] = g[1, 0] = bad
        for fn in (lambda x: cost.objective(x, pi), lambda x: cost.cache_cost(x, pi),
                   lambda x: cost.modularity(sp.csr_matrix(x), pi, 2)):
            with pytest.raises(GraphError, match="W has 2 NaN/inf entries"):
                fn(g)
