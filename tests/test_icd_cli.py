"""The ``icd`` command, run as a user would: a separate process on a tiny Mamba."""

import json
import os
import subprocess
import sys

import pytest

from icd_jax.runtime import artifacts, runfiles

TINY_MAMBA = {"model": {"name": "mamba", "size": "tiny", "batch_size": 8, "max_tokens": 32},
              "graph": {"sentences": 16},
              "solver": {"time_budget_s": 0.3, "refine_steps": 500},
              "quality": {"sentences": 8},
              "measure": {"sentences": 8, "sim_tokens": 32},
              "pipeline": {"repeats": 2, "warmup": 1},
              # mamba has no KV cache and runs no activation-sparse FFN (rejected at load)
              "transform": {"sparsity": {"enabled": False}, "kv": {"enabled": False}}}


def icd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "icd_jax.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def test_dry_run_prints_the_plan_and_resolved_config():
    res = icd("run", "--dry-run", "--set", "pipeline.mode=linear")
    assert res.returncode == 0, res.stderr
    assert '"mode": "linear"' in res.stdout and "READY" in res.stdout
    assert "REPERMUTED" not in res.stdout and "config hash" in res.stdout


def test_print_schema_and_bad_config_exit_codes(tmp_path):
    res = icd("run", "--print-schema")
    assert res.returncode == 0 and "pipeline" in json.loads(res.stdout)["properties"]
    res = icd("run", "--dry-run", "--set", "transform.quant.group_sz=8")
    assert res.returncode == 2 and "transform.quant.group_sz: unknown key" in res.stderr
    res = icd("frobnicate")
    assert res.returncode == 2 and "unknown command" in res.stderr


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = dict(TINY_MAMBA, cache={"dir": str(d / "cache")})
    path = d / "mamba.json"
    path.write_text(json.dumps(cfg))
    res = icd("run", "-c", str(path), "--out", str(d / "out"))
    return d, res


def test_cli_run_on_tiny_mamba(cli_run):
    d, res = cli_run
    assert res.returncode == 0, res.stderr[-3000:]
    out = d / "out"
    assert "gates:" in res.stdout and "report:" in res.stdout and "verdict:" in res.stdout
    m = artifacts.read_json(out / "metrics.json")
    assert m["run"]["model"] == "mamba" and m["quality"]["metric"] == "logit_fidelity"
    assert "kv" not in m["transforms"] and "sparsity" not in m["transforms"]
    q = m["quality"]["identity"]
    assert 0 < q["rel_logit_error"] and abs(q["drop_pp"] - 100 * q["rel_logit_error"]) < 1e-9
    for name in ("report.html", "report.csv", "model.stablehlo", "W_after.npz"):
        assert os.path.getsize(out / name) > 0


def test_cli_report_and_export_rebuild_from_artefacts(cli_run):
    d, _ = cli_run
    out = d / "out"
    os.unlink(out / "report.html")
    res = icd("report", str(out))
    assert res.returncode == 0 and os.path.getsize(out / "report.html") > 0
    assert f"report: {out / 'report.html'}, {out / 'report.csv'} (" in res.stdout  # both
    res = icd("export", "--run", str(out), "--to", str(d / "again.stablehlo"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.getsize(d / "again.stablehlo") > 0


def test_exit_status_fails_only_on_measured_gates_not_met():
    from icd_jax import cli

    def metrics(**status):
        return {"gates": {k: {"status": v} for k, v in status.items()}}

    unmeasured = metrics(latency="met", l2_hit="not measured", ept="not measured",
                         quality="met")
    missed = metrics(latency="not met", l2_hit="not measured", ept="not measured",
                     quality="met")
    assert cli.gates_not_met(missed) == ["latency"] and cli.gates_not_met(unmeasured) == []
    assert cli.exit_status(True, unmeasured, fail_on_gates=True) == 0
    assert cli.exit_status(True, missed, fail_on_gates=False) == 0  # the default stays
    assert cli.exit_status(True, missed, fail_on_gates=True) == 3
    assert cli.exit_status(False, missed, fail_on_gates=True) == 1  # a rollback comes first
    assert cli.exit_status(False, unmeasured, fail_on_gates=False) == 1
    assert cli.exit_status(True, {}, fail_on_gates=True) == 0


def one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("icd")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), res.stderr


USER_FILES = {"W_after.npz": "mine", "perm_after.json": "{\"mine\": 1}",
              "report.html": "<p>mine</p>"}


def test_bad_out_and_unreadable_config_exit_2_with_one_line(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    for name, text in USER_FILES.items():
        (user / name).write_text(text)
    one_line_error(icd("run", "--out", str(user)), "not empty", "--force")
    assert {p.name: p.read_text() for p in user.iterdir()} == USER_FILES  # untouched
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(icd("pair", "--out", str(afile)), "not a folder")
    one_line_error(icd("run", "--out", ""), "--out")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("pipeline:\n  mode: linear  # caf\xe9\n".encode("latin-1"))
    one_line_error(icd("run", "-c", str(latin), "--out", str(tmp_path / "new")),
                   "not UTF-8")
    assert not (tmp_path / "new").exists()
    dated = tmp_path / "date.yaml"
    dated.write_text("pipeline:\n  seed: 2020-01-01\n")  # a YAML date crashed json.dumps
    one_line_error(icd("run", "--dry-run", "-c", str(dated)), "pipeline.seed", "date")
    one_line_error(icd("run", "--dry-run", "--set", "gates.quality_drop_pp=NaN"),
                   "gates.quality_drop_pp", "not a finite number")
    one_line_error(icd("run", "--out", str(tmp_path / "new"), "--set",
                       f"cache.dir={afile}"), "cache.dir", "not a folder")
    assert not (tmp_path / "new").exists()


def test_force_keeps_foreign_files_and_fail_on_gates_exits_3(tmp_path):
    cfg = dict(TINY_MAMBA, cache={"dir": str(tmp_path / "cache")},
               pipeline=dict(TINY_MAMBA["pipeline"], mode="linear"),
               report={"stablehlo": False})
    path = tmp_path / "mamba.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    keep = {"W_after.npz": "mine", "perm_after.json": "{\"mine\": 1}", "notes.txt": "mine"}
    for name, text in keep.items():
        (out / name).write_text(text)
    # no latency can fall 1000% below dense: the gate is measured and not met
    res = icd("run", "-c", str(path), "--out", str(out), "--force", "--fail-on-gates",
              "--set", "gates.latency_pct=-1000")
    assert res.returncode == 3, res.stderr[-3000:]
    assert "--force: writing into" in res.stderr
    assert "--fail-on-gates: not met: latency" in res.stderr
    m = artifacts.read_json(out / "metrics.json")
    assert m["gates"]["latency"]["status"] == "not met"
    for g in ("l2_hit", "ept"):  # not measured here: named nowhere in the failure
        assert m["gates"][g]["status"] == "not measured"
    failed = [ln for ln in res.stderr.splitlines() if "not met:" in ln][0]
    assert "l2_hit" not in failed and "ept" not in failed
    # a linear run removes a stale perm_after.json / W_after.npz only if a run wrote it
    assert all((out / n).read_text() == t for n, t in keep.items())
    marker = artifacts.read_json(out / runfiles.FILES["marker"])
    assert set(keep) <= set(marker["foreign"])


def test_help_lists_every_command():
    """``icd --help`` through the console-script entry (no module docstring of its own)."""
    code = "import sys; sys.argv = ['icd', '--help']; from icd_jax.cli import entry; entry()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    for cmd in ("icd run", "icd pair", "icd export", "icd report", "model.target"):
        assert cmd in res.stdout, cmd
