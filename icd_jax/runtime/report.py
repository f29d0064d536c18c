"""The run report: ``report.html`` and ``report.csv`` from a run directory, ``compare.html``.

``build(run_dir)`` reads the run through ``RunDir`` and writes a self-contained HTML page
(``html``; figures from ``figures``) and a one-row-per-arm CSV (``tables``).
``metrics.json`` is required; every other artefact is optional: a missing piece is shown
as "not measured" (or listed under "artefact problems" when present but unreadable),
never as a passed gate. ``compare(out_dir, blob)`` renders a ``compare.json``-shaped dict
(``icd pair``) as ``compare.html``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from icd_jax.errors import ArtifactError
from icd_jax.runtime import artifacts, figures, html, tables, views
from icd_jax.runtime.rundir import FILES, RunDir, file_path
from icd_jax.runtime.tables import CSV_COLUMNS, csv_rows  # noqa: F401 (public here too)


def build(run_dir: str | os.PathLike, heatmap_cap: int = views.HEATMAP_MAX, *,
          html_page: bool = True, csv_table: bool = True) -> dict:
    """Write ``report.html`` (``html_page``) and ``report.csv`` (``csv_table``) into
    ``run_dir`` (atomically) and return ``{"html": path | None, "csv": path | None,
    "figures": [names], "problems": [str], "elapsed_s": float}`` (None: not written;
    ``problems``: optional artefacts present but unreadable, shown in the report as not
    measured).

    ``ArtifactError`` (naming the file) if ``run_dir`` is no run folder or its
    ``metrics.json`` is missing or malformed; other artefacts are optional. Heatmaps have
    at most ``heatmap_cap`` cells a side (``config.report.heatmap_max`` may lower it).
    """
    t0 = time.perf_counter()
    rd = RunDir(run_dir)
    run = views.open_run(rd)
    figs: dict = {}
    if csv_table:
        artifacts.write_bytes(rd.path("csv"), tables.csv_bytes(tables.csv_rows(run.metrics)))
    if html_page:
        figs = figures.report_figures(run, views.heatmap_max(run.lock, heatmap_cap))
        body = html.report_body(run, views.gate_rows(run.metrics), figs)
        body += html.footer(rd.dir, time.perf_counter() - t0)
        model = (run.metrics.run.model if run.metrics.run else None) or "run"
        artifacts.write_bytes(rd.path("html"), html.page(f"icd report: {model}", body))
    return {"html": rd.path("html") if html_page else None,
            "csv": rd.path("csv") if csv_table else None, "figures": list(figs),
            "problems": list(run.problems), "elapsed_s": time.perf_counter() - t0}


def compare_order(blob: Mapping) -> list[str]:
    """The arms of a ``compare.json``-shaped dict: its summaries, then the paired ones."""
    order = list(views.as_dict(blob.get("arms")))
    for p in views.as_dict(blob.get("paired")).values():
        for k in ("a", "b"):
            a = views.as_dict(p).get(k)
            if isinstance(a, str) and a not in order:
                order.append(a)
    return order


def compare(out_dir: str | os.PathLike, compare: dict) -> dict:
    """Write ``compare.html`` (into ``out_dir``) from a ``compare.json``-shaped dict and
    return ``{"html": path, "figures": [names], "elapsed_s": float}``."""
    t0 = time.perf_counter()
    if not isinstance(compare, Mapping):
        raise ArtifactError(f"{FILES['compare']}: expected an object, got "
                            f"{type(compare).__name__}")
    order = compare_order(compare)
    fig = figures.fig_paired(compare, order)
    path = file_path(out_dir, "compare_html")
    artifacts.write_bytes(path, html.page("icd pair comparison",
                                          html.compare_body(compare, order, fig)))
    return {"html": path, "figures": [] if fig is None else ["paired_latency"],
            "elapsed_s": time.perf_counter() - t0}
