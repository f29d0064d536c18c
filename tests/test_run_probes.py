"""The pipeline on a tiny user target (``tests.test_target.MLP``): switches that must
decide what is written and failures that must be loud; each case was a bug found by
probing ``icd run``."""

from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icd_jax.runtime import artifacts, orchestrator, runfiles
from icd_jax.runtime.summary import summary_text
from tests.test_target import MLP

MLP_RUN = {"model": {"target": "tests.test_target:make_mlp"},
           "pipeline": {"mode": "linear", "repeats": 1, "warmup": 0},
           "graph": {"top_frac": 0.25, "topk": 4},
           "solver": {"time_budget_s": 1.0, "refine_steps": 100},
           "transform": {"quant": {"act": "none", "smooth_alpha": None},
                         "sparsity": {"enabled": False}},
           "cache": {"enabled": False}, "report": {"stablehlo": False}}


def mlp_cfg(**sections) -> dict:
    """``MLP_RUN`` with ``sections`` merged in, one level deep."""
    cfg = copy.deepcopy(MLP_RUN)
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.mark.parametrize("html_on, csv_on", [(False, False), (True, False), (False, True)])
def test_report_switches_decide_what_is_written_and_summarised(tmp_path, html_on, csv_on):
    out = tmp_path / "run"
    res = orchestrator.run(mlp_cfg(report={"html": html_on, "csv": csv_on}), str(out))
    assert res.ok, res.metrics["warnings"]
    html, csv = (runfiles.file_path(out, k) for k in ("html", "csv"))
    assert (os.path.exists(html), os.path.exists(csv)) == (html_on, csv_on)
    want = [p for p, on in ((html, html_on), (csv, csv_on)) if on]
    last = summary_text(res.metrics, res.out_dir).splitlines()[-1]
    assert last == ("report: " + ", ".join(want) if want else "report: none written")


class HostCallbackMLP(MLP):
    """The MLP with a host callback in ``forward``: jit-able, but ``jax.export`` cannot
    serialise it, so the StableHLO export fails."""

    def forward(self, params, batch):
        zero = jax.pure_callback(lambda a: np.asarray(a, np.float32),
                                 jax.ShapeDtypeStruct((), jnp.float32), jnp.float32(0.0))
        return super().forward(params, batch) + zero


def make_callback_mlp(seed: int = 0) -> HostCallbackMLP:
    return HostCallbackMLP(seed)


def test_a_failed_stablehlo_export_is_loud(tmp_path):
    # it was only an event's stablehlo_error: appended to the warnings after metrics.json
    said: list[str] = []
    out = tmp_path / "run"
    res = orchestrator.run(mlp_cfg(model={"target": "tests.test_run_probes:make_callback_mlp"},
                                   report={"stablehlo": True}), str(out), log_fn=said.append)
    assert res.ok and not os.path.exists(runfiles.file_path(out, "stablehlo"))
    assert any(s.startswith("WARNING: REPORTED: StableHLO export failed") for s in said), said
    saved = artifacts.read_json(runfiles.file_path(out, "metrics"))
    assert [w for w in saved["warnings"] if "StableHLO export failed" in w] == [
        w for w in res.metrics["warnings"] if "StableHLO export failed" in w]
    assert len([w for w in saved["warnings"] if "StableHLO export failed" in w]) == 1
    page = open(runfiles.file_path(out, "html"), encoding="utf-8").read()
    assert "StableHLO export failed" in page


def test_a_failed_run_after_a_forced_one_reports_nothing_of_it(tmp_path):
    out = tmp_path / "forced"
    out.mkdir()
    for name in ("W.npz", "stats_permuted.json"):  # user files of run names
        (out / name).write_text("user")
    cfg = mlp_cfg(report={"csv": False})
    artifacts.prepare_run_dir(out, force=True)
    assert orchestrator.run(cfg, str(out)).ok
    assert "Solver stats per axis" in (out / "report.html").read_text()
    bad = mlp_cfg(model={"kwargs": {"width": 3}}, report={"csv": False})  # fails at READY
    res = orchestrator.run(bad, str(out))
    assert not res.ok and res.failed_stage == "READY"
    assert not (out / "W.npz").exists() and not (out / "stats_permuted.json").exists()
    assert "Solver stats per axis" not in (out / "report.html").read_text()


def test_export_of_a_lock_without_config_names_the_lock(tmp_path):
    # a probe: icd export silently rebuilt the default MiniLM config instead
    from icd_jax.errors import ArtifactError
    from icd_jax.runtime import export

    run = tmp_path / "run"
    artifacts.prepare_run_dir(run)
    lock = runfiles.file_path(run, "lock")

    def rebuilt(cfg):
        raise AssertionError(f"the model was rebuilt from {cfg.model.name}")

    for blob, needle in (({"config_hash": "x"}, "no 'config' object"),
                         ({"config": []}, "no 'config' object"),
                         ({"config": {"pipeline": {"mode": "both"}}}, "does not validate")):
        artifacts.write_json(lock, blob)
        with pytest.raises(ArtifactError, match=f"config.lock.json: .*{needle}"):
            export.export_saved(str(run), str(tmp_path / "m.stablehlo"), rebuilt)


@pytest.mark.parametrize("perms, needle", [
    ({"hidden": list(range(8))}, "perms['hidden'] has 8 entries, the model's axis 'hidden' "
                                 "has 16"),
    ({"zzz": [1, 0]}, "perms['zzz'] names no axis of the model 'mlp' (it has hidden)"),
])
def test_export_of_orders_that_do_not_fit_names_the_file(tmp_path, perms, needle):
    from icd_jax.errors import ArtifactError
    from icd_jax.runtime import config, export, usertarget

    path = tmp_path / "perm_active.json"
    artifacts.save_perms(path, perms)
    t = usertarget.UserTarget(config.load(MLP_RUN), MLP())
    with pytest.raises(ArtifactError) as e:
        export.export_run(t, str(path), str(tmp_path / "m.stablehlo"))
    assert str(e.value) == f"{path}: {needle}"
