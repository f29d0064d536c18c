"""``report.csv``: one row per arm with exactly ``CSV_COLUMNS``."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping

import numpy as np

from icd_jax.runtime.records import Metrics
from icd_jax.runtime.views import arm_names, as_dict, num

#: The columns of ``report.csv``, in order (docs/pipeline.md).
CSV_COLUMNS = ("arm", "latency_mean_ms", "latency_p50_ms", "latency_p95_ms", "ci95_lo_ms",
               "ci95_hi_ms", "tokens_per_s", "quality_metric", "quality_value", "drop_pp",
               "tiles_per_token", "lines_per_token", "l2_hit_pct_sim", "active")


def cell(x) -> str:
    """A CSV value: numbers at full precision, missing values empty."""
    if x is None or isinstance(x, bool):
        return ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    v = num(x)
    if v is not None:
        return repr(v)
    if isinstance(x, (float, np.floating)):  # NaN / inf
        return ""
    return str(x)


def csv_rows(metrics: Metrics | Mapping) -> list[dict]:
    """One row per arm with exactly ``CSV_COLUMNS``; missing values are empty strings."""
    metrics = metrics.dump() if isinstance(metrics, Metrics) else as_dict(metrics)
    lat = as_dict(metrics.get("latency"))
    qual = as_dict(metrics.get("quality"))
    tiles = as_dict(metrics.get("tiles_per_token"))
    lines = as_dict(metrics.get("lines_per_token"))
    sim = as_dict(metrics.get("l2_hit_pct_sim"))
    active = metrics.get("active")
    rows = []
    for arm in arm_names(metrics):
        la = as_dict(lat.get(arm))
        ci = la.get("ci95_ms")
        lo, hi = (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None,
                                                                                          None)
        qa = as_dict(qual.get(arm))
        rows.append({
            "arm": arm,
            "latency_mean_ms": cell(la.get("mean_ms")),
            "latency_p50_ms": cell(la.get("p50_ms")),
            "latency_p95_ms": cell(la.get("p95_ms")),
            "ci95_lo_ms": cell(lo),
            "ci95_hi_ms": cell(hi),
            "tokens_per_s": cell(la.get("tokens_per_s")),
            "quality_metric": cell(qual.get("metric")) if qa else "",
            "quality_value": cell(qa.get("value")),
            "drop_pp": cell(qa.get("drop_pp")),
            "tiles_per_token": cell(tiles.get(arm)),
            "lines_per_token": cell(lines.get(arm)),
            "l2_hit_pct_sim": cell(sim.get(arm)),
            "active": "true" if arm == active else "false",
        })
    return rows


def csv_bytes(rows: list[dict], columns: tuple[str, ...] = CSV_COLUMNS) -> bytes:
    """``rows`` as CSV text with a header (``\\n`` line ends)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()
