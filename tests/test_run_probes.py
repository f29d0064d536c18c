"""The pipeline on a tiny user target (``tests.test_target.MLP``): switches that must
decide what is written and failures that must be loud; each case was a bug found by
probing ``icd run``."""

from __future__ import annotations

import copy
import os

import pytest

from icd_jax.runtime import orchestrator, runfiles
from icd_jax.runtime.summary import summary_text

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
