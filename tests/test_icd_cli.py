"""The ``icd`` command, run as a user would: a separate process on a tiny Mamba."""

import json
import os
import subprocess
import sys

import pytest

from icd_jax.runtime import artifacts

TINY_MAMBA = {"model": {"name": "mamba", "size": "tiny", "batch_size": 8, "max_tokens": 32},
              "graph": {"sentences": 16},
              "solver": {"time_budget_s": 0.3, "refine_steps": 500},
              "quality": {"sentences": 8},
              "measure": {"sentences": 8, "sim_tokens": 32},
              "pipeline": {"repeats": 2, "warmup": 1}}


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
    assert m["transforms"]["kv"]["applicable"] is False
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
    res = icd("export", "--run", str(out), "--to", str(d / "again.stablehlo"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.getsize(d / "again.stablehlo") > 0
