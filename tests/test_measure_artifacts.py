"""Measurement statistics, NVML/ncu plumbing and the atomic artefact files."""

import json
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from icd_jax.errors import ArtifactError
from icd_jax.runtime import artifacts, measure


@given(st.lists(st.floats(1e-4, 1.0), min_size=2, max_size=50))
def test_summarize_matches_numpy(samples):
    s = measure.summarize(samples, tokens=100)
    ms = np.asarray(samples) * 1e3
    assert np.isclose(s["mean_ms"], ms.mean()) and np.isclose(s["p50_ms"], np.median(ms))
    assert np.isclose(s["p95_ms"], np.percentile(ms, 95))
    from scipy.stats import t
    half = t.ppf(0.975, len(ms) - 1) * ms.std(ddof=1) / np.sqrt(len(ms))
    assert np.isclose(s["ci95_ms"][1], ms.mean() + half)
    # the lower end is the t bound, clamped at 0 (a mean time cannot be negative)
    assert np.isclose(s["ci95_ms"][0], max(ms.mean() - half, 0.0))
    assert s["ci95_ms"][0] >= 0
    assert np.isclose(s["tokens_per_s"], 100 / (ms.mean() / 1e3))


def test_summarize_keeps_a_heavy_tailed_interval_non_negative():
    """Two fast calls and one slow one: the t interval's lower end falls below zero."""
    s = measure.summarize([0.001, 0.001, 0.030], tokens=1)
    assert s["ci95_ms"][0] == 0.0 and s["ci95_ms"][1] > s["mean_ms"]
    one = measure.summarize([0.002], tokens=1)
    assert np.isnan(one["ci95_ms"][0]) and np.isnan(one["ci95_ms"][1])


def test_paired_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(10, 1, 40)
    shifted = measure.paired(a, a + 0.5 + rng.normal(0, 0.05, 40))
    assert shifted["p_value"] < 1e-6 and shifted["ci95"][0] > 0
    same = measure.paired(a, a + rng.normal(0, 0.05, 40))
    assert same["p_value"] > 0.01 and same["ci95"][0] < 0 < same["ci95"][1]
    assert np.isclose(shifted["mean_diff"], 0.5, atol=0.05)
    with pytest.raises(Exception, match="one length"):
        measure.paired([1, 2], [1])


def test_interleaved_alternates_arms_and_excludes_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = measure.interleaved(fns, repeats=3, warmup=2)
    assert calls[:4] == ["a", "a", "b", "b"]  # warmup per arm
    assert calls[4:] == ["a", "a", "b", "b"] * 3  # each round: a warm + a timed, then b
    assert [len(v) for v in out.values()] == [3, 3]


def test_trapezoid_energy():
    t = np.linspace(0, 2, 201)
    assert np.isclose(measure.trapezoid_j(t, 100 + 0 * t), 200.0)
    assert np.isclose(measure.trapezoid_j(t, 50 * t), 100.0)
    assert measure.trapezoid_j([0.0], [5.0]) is None  # no interval: no energy, not 0 J
    assert measure.trapezoid_j([], []) is None


def test_energy_is_null_with_reason_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    out, reason = measure.energy_per_token({"a": lambda: 0}, 10, 2)
    assert out is None and "pynvml" in reason


def test_energy_per_token_with_a_fake_nvml(monkeypatch):
    fake_nvml(monkeypatch)
    import time
    out, reason = measure.energy_per_token({"a": lambda: time.sleep(0.05)}, tokens=10,
                                           calls=2, interval_s=0.005, min_samples=5)
    assert reason is None
    assert 200 * 0.08 / 20 < out["a"] < 200 * 0.3 / 20  # 200 W over ~0.1 s, 20 tokens


def fake_nvml(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetPowerUsage=lambda h: 200_000)  # mW
    monkeypatch.setitem(sys.modules, "pynvml", fake)


def test_energy_of_a_short_window_is_null_with_reason_not_zero(monkeypatch):
    fake_nvml(monkeypatch)
    import time
    # a 1 s interval takes one sample in a window of ~0 s: no energy, never 0 J
    out, reason = measure.energy_per_token({"a": lambda: 0}, tokens=10, calls=1,
                                           interval_s=1.0, min_samples=10)
    assert out is None and "nvml_min_samples=10" in reason and reason.startswith("a:")
    # one arm long enough, one too short: the short one is None, the reason names it
    out, reason = measure.energy_per_token(
        {"long": lambda: time.sleep(0.1), "short": lambda: 0}, tokens=10, calls=1,
        interval_s=0.005, min_samples=4)
    assert out["long"] > 0 and out["short"] is None
    assert "short:" in reason and "long:" not in reason


def test_arm_energy_counts_samples():
    t = np.linspace(0, 1, 11)
    e, why = measure.arm_energy(t, 100 + 0 * t, tokens=50, min_samples=11)
    assert why is None and np.isclose(e, 2.0)
    e, why = measure.arm_energy(t, 100 + 0 * t, tokens=50, min_samples=12)
    assert e is None and "11 NVML power samples" in why
    e, why = measure.arm_energy([0.0], [5.0], tokens=1, min_samples=0)  # at least 2
    assert e is None and "fewer than" in why


def test_ncu_unavailable_and_csv_parsing(monkeypatch):
    monkeypatch.setattr(measure.shutil, "which", lambda name: None)
    ok, reason = measure.ncu_status()
    assert not ok and "ncu" in reason
    assert measure.ncu_l2_hit(["true"]) == (None, reason)
    text = ('==PROF== Connected\n"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
            '"0","gemm","lts__t_sector_hit_rate.pct","%","80.5"\n'
            '"1","gemv","lts__t_sector_hit_rate.pct","%","60.5"\n'
            '"1","gemv","other","%","1"\n')
    assert measure.parse_ncu_csv(text) == pytest.approx(70.5)
    assert measure.parse_ncu_csv("nothing") is None


def test_ncu_runs_with_profiling_off_from_the_start(tmp_path, monkeypatch):
    """A fake ncu on PATH records its command line and prints one metric row."""
    args = tmp_path / "args.txt"
    ncu = tmp_path / "ncu"
    ncu.write_text("#!/bin/sh\n"
                   f'printf "%s\\n" "$@" > {args}\n'
                   'echo \'"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\'\n'
                   'echo \'"0","gemm","lts__t_sector_hit_rate.pct","%","42.5"\'\n')
    ncu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(measure.jax, "devices",
                        lambda *a: [types.SimpleNamespace(platform="gpu")])
    probe = [sys.executable, "-m", "icd_jax.runtime.probe", "RUN", "after"]
    assert measure.ncu_l2_hit(probe) == (pytest.approx(42.5), None)
    argv = args.read_text().splitlines()
    assert argv[:2] == ["--profile-from-start", "off"]
    assert argv[argv.index("--metrics") + 1] == measure.NCU_METRIC
    assert argv[-len(probe):] == probe


def test_probe_profiles_only_the_calls_after_warmup(monkeypatch):
    from icd_jax.runtime import probe

    events = []
    monkeypatch.setattr(probe, "profiler_start", lambda: events.append("start"))
    monkeypatch.setattr(probe, "profiler_stop", lambda: events.append("stop"))
    assert probe.run_profiled(lambda: events.append("call"), calls=3, warmup=2) is None
    assert events == ["call", "call", "start", "call", "call", "call", "stop"]

    def boom():
        events.append("call")
        if events.count("call") > 1:
            raise RuntimeError("kernel failed")

    events.clear()
    with pytest.raises(RuntimeError):
        probe.run_profiled(boom, calls=2, warmup=1)
    assert events == ["call", "start", "call", "stop"]  # stopped even on a failure


def test_probe_profiler_is_a_no_op_with_a_reason_without_libcudart(monkeypatch):
    from icd_jax.runtime import probe

    monkeypatch.setattr(probe, "cudart_candidates", lambda: ["/nonexistent/libcudart.so"])
    assert "libcudart not found" in probe.profiler_start()
    assert "libcudart not found" in probe.profiler_stop()
    reason = probe.run_profiled(lambda: 0, calls=1, warmup=0)
    assert "libcudart not found" in reason


def test_graph_and_perm_files_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = sp.random(20, 20, density=0.2, random_state=0, format="csr", dtype=np.float32)
    g = {"ffn_0": a + a.T, "ffn_1": sp.csr_matrix((5, 5), dtype=np.float32)}
    artifacts.save_graphs(tmp_path / "W.npz", g)
    back = artifacts.load_graphs(tmp_path / "W.npz")
    assert set(back) == set(g) and all((back[k] != g[k]).nnz == 0 for k in g)
    perms = {"x": rng.permutation(7)}
    artifacts.save_perms(tmp_path / "p.json", perms, {"arm": "before"})
    p, meta = artifacts.load_perms(tmp_path / "p.json")
    assert np.array_equal(p["x"], perms["x"]) and meta == {"arm": "before"}


def test_corrupt_artefacts_raise_naming_the_file(tmp_path):
    bad = tmp_path / "W.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="W.npz"):
        artifacts.load_graphs(bad)
    (tmp_path / "p.json").write_text(json.dumps({"perms": {"x": [0, 0, 1]}}))
    with pytest.raises(ArtifactError, match="not a permutation"):
        artifacts.load_perms(tmp_path / "p.json")
    (tmp_path / "m.json").write_text("{oops")
    with pytest.raises(ArtifactError, match="m.json"):
        artifacts.read_json(tmp_path / "m.json")
    with pytest.raises(ArtifactError, match="no such"):
        artifacts.read_json(tmp_path / "missing.json")



@pytest.mark.parametrize("order, needle", [
    ([0, 0, 1], r"is not a permutation of range\(3\): \[0\] repeated"),
    ([-1, 0, 1], r"has entries outside \[0, 3\)"),
    ([0, 1, 3], r"has entries outside \[0, 3\)"),
])
def test_perms_that_are_no_permutation_say_why_naming_file_and_axis(tmp_path, order,
                                                                    needle):
    """load_perms checks through permute.validate_order, the one validator."""
    path = tmp_path / "perm_best.json"
    path.write_text(json.dumps({"perms": {"ffn": order}}))
    with pytest.raises(ArtifactError, match=rf"perm_best.json: perms\['ffn'\] {needle}"):
        artifacts.load_perms(path)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_or_bit_flipped_graphs_raise_naming_the_file(tmp_path, cut):
    path = tmp_path / "W.npz"
    w = sp.random(50, 50, density=0.2, random_state=0, format="csr")
    artifacts.save_graphs(path, {"a": w, "b": w})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ArtifactError, match="W.npz"):
        artifacts.load_graphs(path)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="W.npz"):
        artifacts.load_graphs(path)


def test_perms_of_the_wrong_type_and_unreadable_events_raise_naming_the_file(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"perms": {"x": [[0], "a"]}}))
    with pytest.raises(ArtifactError, match="p.json"):
        artifacts.load_perms(tmp_path / "p.json")
    (tmp_path / "e.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(ArtifactError, match="e.jsonl"):
        artifacts.read_events(tmp_path / "e.jsonl")

@pytest.mark.parametrize("order, needle", [
    ([1.9, 0.2, 2.7], "entry 0 is 1.9"),  # truncated to [1, 0, 2], a valid order
    ([True, False], "entry 0 is True"),  # read as [1, 0]
    ([0.0, 1.0], "entry 0 is 0.0"),
    ([0, 1, 2**70], "entry 2 is out of range"),
    ("10", "got str"),
])
def test_perms_that_are_not_integer_lists_name_the_file_and_axis(tmp_path, order, needle):
    # a probe: load_perms truncated floats and bools, so icd export, icd report and the
    # permutation cache accepted them
    from icd_jax.runtime import permcache

    path = tmp_path / "perm_active.json"
    path.write_text(json.dumps({"perms": {"ffn": order}, "meta": {"stats": {}}}))
    with pytest.raises(ArtifactError, match=rf"perm_active.json: perms\['ffn'\] is not a "
                                            rf"list of integers \({re.escape(needle)}"):
        artifacts.load_perms(path)
    cache = tmp_path / "entry.json"
    cache.write_text(json.dumps({"perms": {"pi": order}, "meta": {"stats": {}}}))
    with pytest.raises(ArtifactError, match="entry.json"):
        permcache.checked_entry(str(cache), None)


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, names=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ArtifactError):
        artifacts.load_graphs(path)


def test_events_skip_a_torn_last_line_but_not_a_corrupt_middle(tmp_path):
    path = tmp_path / "events.jsonl"
    artifacts.append_event(path, {"stage": "READY", "ok": True})
    with open(path, "a") as f:
        f.write('{"stage": "W_BU')  # a writer killed mid-line
    assert [e["stage"] for e in artifacts.read_events(path)] == ["READY"]
    path.write_text('{"stage": "A"}\nbroken\n{"stage": "B"}\n')
    with pytest.raises(ArtifactError, match="line 2"):
        artifacts.read_events(path)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    artifacts.write_json(path, {"v": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", boom)
    with pytest.raises(OSError):
        artifacts.write_json(path, {"v": 2})
    monkeypatch.undo()
    assert artifacts.read_json(path) == {"v": 1}
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)


def test_json_has_no_nan():
    text = json.dumps(artifacts.jsonable({"a": float("nan"), "b": np.float32(2.5),
                                          "c": np.arange(2)}))
    assert json.loads(text) == {"a": None, "b": 2.5, "c": [0, 1]}


def test_mcnemar_exact_against_a_hand_count():
    a = [100, 100, 0, 0, 100, 0, 100, 100]
    b = [100, 0, 0, 100, 0, 0, 0, 100]  # a only: 3 items, b only: 1 item
    out = measure.mcnemar(a, b)
    assert (out["only_a"], out["only_b"]) == (3, 1)
    assert np.isclose(out["p_value"], 2 * (math.comb(4, 0) + math.comb(4, 1)) / 2 ** 4)
    assert measure.mcnemar([0.3, 0.5, 0.9], [0.1, 0.2, 0.3]) is None  # not binary
    assert measure.mcnemar([1, 1], [1, 1])["p_value"] == 1.0
