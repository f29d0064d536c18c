"""What the report shows of a run: the run as read through ``RunDir`` (``RunView``),
the number formatting every table and figure shares, the arms, the gates with their
status normalised, the layout cost per stage and what was not measured."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from icd_jax.runtime.gates import GATES
from icd_jax.runtime.records import Metrics
from icd_jax.runtime.rundir import PERMS, STATS, RunDir

#: Keys of a metrics section that are not arm names.
NOT_ARMS = frozenset({"method", "degraded", "metric", "higher_is_better", "unit", "reason",
                      "tile", "of", "calls", "line_bytes", "cache", "what"})
#: How a missing value reads.
NA = "not measured"
#: Largest heatmap side in cells (``config.report.heatmap_max`` may lower it).
HEATMAP_MAX = 256

Perms = tuple[dict[str, np.ndarray], dict[str, Any]]


@dataclasses.dataclass
class RunView:
    """One run as the report reads it: ``metrics`` (typed) and ``m`` (its JSON dict);
    optional artefacts are None when absent, and ``problems`` lists those present but
    unreadable."""

    dir: str
    metrics: Metrics
    m: dict
    lock: dict | None
    events: list[dict]
    w: dict[str, sp.csr_matrix] | None
    w_after: dict[str, sp.csr_matrix] | None
    perm_before: Perms | None
    perm_after: Perms | None
    perm_active: Perms | None
    stats: dict[str, dict | None]
    problems: list[str]


def open_run(rd: RunDir) -> RunView:
    """Read run folder ``rd``: ``ArtifactError`` (naming the file) if its
    ``metrics.json`` is missing or malformed; the other artefacts are optional."""
    metrics = rd.metrics()
    problems: list[str] = []

    def opt(key, read):
        return rd.optional(key, read, problems)

    w = opt("w", lambda: rd.graphs("w"))
    perms = {}
    for key in PERMS:
        perms[key] = opt(key, lambda k=key: rd.perms(k))
        misfit = misfit_orders(perms[key], w, rd.path(key))
        if misfit:
            problems.append(misfit)
            perms[key] = None
    return RunView(
        dir=rd.dir, metrics=metrics, m=metrics.dump(), lock=opt("lock", rd.lock),
        events=opt("events", rd.events) or [],
        w=w, w_after=opt("w_after", lambda: rd.graphs("w_after")),
        perm_before=perms["perm_before"], perm_after=perms["perm_after"],
        perm_active=perms["perm_active"],
        stats={stage: opt(key, lambda s=stage: rd.stats(s)) for stage, key in STATS.items()},
        problems=problems)


def misfit_orders(perms: Perms | None, w: Mapping | None, path: str) -> str | None:
    """Why the orders read from ``path`` do not fit the run's W (an axis whose order has
    another length than its graph in ``W.npz``), or None (also without W)."""
    for ax, order in (perms[0] if perms and w else {}).items():
        g = w.get(ax)
        if g is not None and len(order) != g.shape[0]:
            return (f"{path}: perms[{ax!r}] has {len(order)} entries, but W.npz's graph "
                    f"{ax!r} has {g.shape[0]} channels")
    return None


def heatmap_max(lock: Mapping | None, cap: int = HEATMAP_MAX) -> int:
    """The largest heatmap side: ``config.report.heatmap_max`` of the lock (at least 8),
    at most ``cap``."""
    cfg = as_dict(as_dict(as_dict(lock).get("config")).get("report"))
    n = cfg.get("heatmap_max")
    if isinstance(n, int) and not isinstance(n, bool) and n >= 8:
        return min(n, cap)
    return cap


def as_dict(x) -> dict:
    """``x`` if it is a mapping, else an empty dict."""
    return x if isinstance(x, Mapping) else {}


def num(x) -> float | None:
    """``x`` as a finite float, or None (bools, strings, NaN and missing values)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fmt(x, signed: bool = False) -> str | None:
    """A readable number, or None when ``x`` is not one."""
    v = num(x)
    if v is None:
        return None
    a = abs(v)
    sign = "+" if signed else ""
    if a >= 1000:
        return f"{v:{sign},.0f}"
    if a >= 10:
        return f"{v:{sign}.2f}"
    if a >= 0.01 or a == 0:
        return f"{v:{sign}.3f}"
    return f"{v:{sign}.3g}"


def arm_names(metrics: Mapping) -> list[str]:
    """The measured arms: ``metrics["arms"]``, or the arm keys of the latency section."""
    arms = metrics.get("arms")
    if isinstance(arms, list) and all(isinstance(a, str) for a in arms):
        return list(arms)
    out = []
    for sec in ("latency", "quality"):
        for k, v in as_dict(metrics.get(sec)).items():
            if k not in NOT_ARMS and isinstance(v, Mapping) and k not in out:
                out.append(k)
    return out


def target_number(target) -> float | None:
    """A gate target as a number: itself, or the first number in its text."""
    v = num(target)
    if v is not None:
        return v
    if isinstance(target, str):
        m = re.search(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", target)
        if m:
            return float(m.group())
    return None


def short_json(x, limit: int = 160) -> str:
    """``x`` as compact JSON, cut to ``limit`` characters."""
    try:
        s = json.dumps(x, sort_keys=True, default=str)
    except (TypeError, ValueError):
        s = str(x)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def cost_by_stage(run: RunView) -> dict[str, dict]:
    """``{stage: {"C", "Q", "C_identity", "Q_identity"}}`` from metrics ``cost``, else the
    mean over axes of the stats files."""
    out = {}
    for stage in STATS:
        c = run.metrics.cost.get(stage)
        c = c.dump() if c is not None else {}
        vals = {k: num(c.get(k)) for k in ("C", "Q", "C_identity", "Q_identity")}
        if all(v is None for v in vals.values()):
            st = as_dict(run.stats.get(stage))
            per = [s for s in st.values() if isinstance(s, Mapping)]
            if per:
                for k in vals:
                    xs = [num(s.get(k)) for s in per]
                    xs = [x for x in xs if x is not None]
                    vals[k] = float(np.mean(xs)) if xs else None
        if any(v is not None for v in vals.values()):
            out[stage] = vals
    return out


def gate_rows(metrics: Metrics, order: tuple[str, ...] = GATES) -> list[tuple[str, dict]]:
    """``(name, gate)`` for the gates of ``order`` then any others recorded, with the
    status normalised: a gate without a value, or missing, is "not measured" (never
    met)."""
    gates = {name: g.dump() for name, g in metrics.gates.items()}
    fallback = {"l2_hit": metrics.l2_hit_pct_reason, "ept": metrics.ept_reason}
    out = []
    for name in list(order) + [g for g in gates if g not in order]:
        g = dict(gates.get(name) or {})
        status = g.get("status")
        if name not in gates:
            status, g["reason"] = NA, fallback.get(name) or "no gate result recorded"
        elif status not in ("met", "not met", NA) or num(g.get("value")) is None:
            if status in ("met", "not met"):
                g["reason"] = g.get("reason") or "no value recorded"
            status = NA
        if status == NA and not g.get("reason"):
            g["reason"] = fallback.get(name) or "no reason recorded"
        g["status"] = status
        out.append((name, g))
    return out


def not_measured(run: RunView) -> list[tuple[str, str]]:
    """``(metric, reason)`` for every metric the run did not measure."""
    m = run.m
    out = []
    if m.get("l2_hit_pct") is None:
        out.append(("l2_hit_pct (hardware L2 hit rate)",
                    m.get("l2_hit_pct_reason") or "no reason recorded"))
    if m.get("ept_j_per_tok") is None:
        out.append(("ept_j_per_tok (energy per token)", m.get("ept_reason") or
                    "no reason recorded"))
    lat = as_dict(m.get("latency"))
    if not any(num(as_dict(lat.get(a)).get("mean_ms")) is not None for a in arm_names(m)):
        out.append(("latency", lat.get("degraded") or "no latency recorded"))
    elif lat.get("degraded"):
        out.append(("latency (degraded, still reported)", lat["degraded"]))
    qual = as_dict(m.get("quality"))
    if not any(as_dict(qual.get(a)) for a in arm_names(m)):
        gate = as_dict(as_dict(m.get("gates")).get("quality"))
        out.append(("quality", qual.get("reason") or m.get("quality_reason")
                    or gate.get("reason") or "no quality recorded"))
    for key, what in (("tiles_per_token", "tiles touched per token"),
                      ("lines_per_token", "cache lines per token"),
                      ("l2_hit_pct_sim", "simulated L2 hit rate")):
        if m.get(key) is None:
            out.append((f"{key} ({what})", m.get(f"{key}_reason") or "no value recorded"))
    mode = as_dict(m.get("run")).get("mode")
    cost = as_dict(m.get("cost"))
    if mode == "iterative" and cost.get("repermuted") is None and not run.stats.get(
            "repermuted"):
        out.append(("cost.repermuted", "no re-permutation stats recorded"))
    return out


def summary_value(v) -> str | None:
    """A compare.json value for a table cell: a pair as ``[a, b]``, numbers formatted."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(num(x) is not None for x in v):
        return f"[{fmt(v[0])}, {fmt(v[1])}]"
    if isinstance(v, (dict, list)):
        return short_json(v)
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    return fmt(v)

