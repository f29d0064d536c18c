"""Gates, verdicts and what a run's numbers mean: pure functions of ``metrics.json``.

A gate is ``met`` / ``not met`` / ``not measured`` (missing is never met); a transform
that fell back turns every measured gate into ``not met``; ``effects`` separates what the
transform bought from what the layout bought.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from icd_jax.runtime import hostprobe, measure
from icd_jax.runtime.records import ci_bounds


@dataclasses.dataclass(frozen=True)
class GateDef:
    """One gate: its name, the ``gates.<field>`` config key holding its target, whether
    lower is better, its default target, its unit and what it compares."""

    name: str
    field: str
    lower: bool
    default: float
    unit: str
    doc: str


#: The gates, the one definition the config schema, the run and the report share.
DEFINITIONS = (
    GateDef("latency", "latency_pct", True, -20.0, "% vs dense fp32",
            "active vs dense fp32 latency change, at most"),
    GateDef("l2_hit", "l2_hit_pp", False, 10.0, "pp vs identity",
            "L2 hit rate gain over identity, at least"),
    GateDef("ept", "ept_pct", True, -15.0, "% vs dense fp32",
            "energy per token change vs dense, at most"),
    GateDef("quality", "quality_drop_pp", True, 0.1, "pp drop vs dense fp32",
            "quality drop vs dense, at most"),
)
GATES = tuple(g.name for g in DEFINITIONS)
#: ``≤`` where the value must stay at or below its target, ``≥`` at or above.
SENSE = {g.name: "≤" if g.lower else "≥" for g in DEFINITIONS}


def quality_p_value(prev, cand) -> float | None:
    """Paired p-value of per-item quality samples: exact McNemar for binary outcomes,
    else Wilcoxon; None without samples."""
    if prev is None or cand is None or len(prev) != len(cand) or len(prev) < 2:
        return None
    exact = measure.mcnemar(prev, cand)
    return exact["p_value"] if exact is not None else measure.paired(prev, cand)["p_value"]


def gate(value: float | None, target: float, unit: str, lower: bool,
         reason: str | None) -> dict:
    """A gate's record: ``met`` / ``not met`` / ``not measured`` (missing is never met)."""
    if value is None:
        return dict(target=target, value=None, unit=unit, status="not measured",
                    reason=reason or "not measured")
    ok = value <= target if lower else value >= target
    return dict(target=target, value=value, unit=unit, status="met" if ok else "not met",
                reason=None)


def latency_significance(record: dict, active: Mapping, dense: Mapping) -> dict:
    """A latency gate that claims a speedup (a negative target) is met only when the
    speedup is beyond the timing noise: the active arm's CI95 lies wholly below dense's.
    Records ``ci95_disjoint``; a speedup met by the means alone becomes ``not met`` with
    the reason (overlapping intervals, or one repeat and so no interval). A target of 0
    or more is a slowdown budget, met by the means."""
    ca, cd = ci_bounds(active.get("ci95_ms")), ci_bounds(dense.get("ci95_ms"))
    disjoint = None if ca is None or cd is None else bool(ca[1] < cd[0] or ca[0] > cd[1])
    out = dict(record, ci95_disjoint=disjoint)
    if record["status"] == "met" and record["target"] < 0 and not disjoint:
        out["status"] = "not met"
        out["reason"] = ("within the timing noise: one repeat gives no CI95"
                         if disjoint is None else
                         f"within the timing noise: the CI95s overlap (active "
                         f"{ca[0]:.3g}-{ca[1]:.3g} ms, dense {cd[0]:.3g}-{cd[1]:.3g} ms)")
    return out


def evaluate(targets, m: Mapping, active: str) -> dict:
    """Every gate of ``DEFINITIONS`` for the ``active`` arm of metrics ``m``, against
    ``targets`` (the config's ``Gates``); a fallback turns measured gates ``not met``."""
    t = {g.name: getattr(targets, g.field) for g in DEFINITIONS}
    units = {g.name: g.unit for g in DEFINITIONS}
    lower = {g.name: g.lower for g in DEFINITIONS}

    def make(name, value, reason):
        return gate(value, t[name], units[name], lower[name], reason)

    out = {}
    lat = m.get("latency") or {}
    v = (measure.change_pct(lat[active]["mean_ms"], lat["dense"]["mean_ms"])
         if active in lat and "dense" in lat else None)
    out["latency"] = make("latency", v, None if v is not None else "latency not measured")
    if v is not None:
        out["latency"] = latency_significance(out["latency"], lat[active], lat["dense"])
    hw = m.get("l2_hit_pct")
    v = (hw[active] - hw["identity"] if isinstance(hw, dict) and active in hw
         and "identity" in hw else None)
    out["l2_hit"] = make("l2_hit", v, m.get("l2_hit_pct_reason") or "not measured")
    sim = m.get("l2_hit_pct_sim") or {}
    if hw is None and active in sim and "identity" in sim:
        out["l2_hit"]["simulated_value"] = sim[active] - sim["identity"]
    ept = m.get("ept_j_per_tok")
    v = (measure.change_pct(ept[active], ept["dense"]) if isinstance(ept, dict)
         and active in ept else None)
    out["ept"] = make("ept", v, m.get("ept_reason"))
    q = m.get("quality") or {}
    v = q[active]["drop_pp"] if active in q else None
    out["quality"] = make("quality", v, None if v is not None else "quality not measured")
    qs = m.get("quality_samples") or {}
    p = quality_p_value(qs.get("dense"), qs.get(active))
    out["quality"]["p_vs_dense"] = p
    if p is not None and v is not None:
        out["quality"]["significant_loss"] = bool(v > 0 and p < 0.05)
    probe = m.get("host_probe")
    quant = (m.get("transforms") or {}).get("quant") or {}
    ran_int8 = bool(quant.get("int8_kernels"))  # only then can int8 speed be the cause
    if (out["latency"]["status"] == "not met" and probe and ran_int8
            and not probe.get("fast_int8")):
        out["latency"]["reason"] = ("this host has no fast int8 (W8A8 layer "
                                    f"{probe['w8a8_speedup']:.2f}x float32); "
                                    + hostprobe.describe(probe))
    return fallback_gates(out, m.get("fallbacks") or [])


def regressions(tol, m: Mapping, cand: str, prev: str) -> tuple[list[str], list[str]]:
    """Why arm ``cand`` regressed against ``prev`` beyond the rollback tolerances ``tol``
    (the config's ``Rollback``): significant quality loss, slower with disjoint CI95s.
    Returns ``(reasons, notes)``; ``notes`` are losses kept as not significant."""
    reasons, notes = [], []
    q = m.get("quality") or {}
    if cand in q and prev in q:
        loss = q[prev]["value"] - q[cand]["value"]
        p = quality_p_value((m.get("quality_samples") or {}).get(prev),
                            (m.get("quality_samples") or {}).get(cand))
        significant = tol.alpha is None or p is None or p < tol.alpha
        if loss > tol.quality_pp and significant:
            reasons.append(f"quality {loss:.2f} pp below {prev} (tolerance "
                           f"{tol.quality_pp} pp" + ("" if p is None else
                                                     f", paired p={p:.3g}") + ")")
        elif loss > tol.quality_pp:
            notes.append(f"quality {loss:.2f} pp below {prev}, but not significant "
                         f"(paired p={p:.3g} >= {tol.alpha}); kept")
    lat = m.get("latency") or {}
    if cand in lat and prev in lat:
        a, b = lat[prev], lat[cand]
        slower = measure.change_pct(b["mean_ms"], a["mean_ms"])
        ca, cb = ci_bounds(a.get("ci95_ms")), ci_bounds(b.get("ci95_ms"))
        disjoint = ca is not None and cb is not None and cb[0] > ca[1]  # needs intervals
        if slower > tol.latency_pct and disjoint:
            reasons.append(f"latency {slower:+.1f}% vs {prev} (tolerance "
                           f"{tol.latency_pct}%, CI95s disjoint)")
    return reasons, notes


def headline(m: Mapping) -> dict[str, float]:
    """The active arm's numeric figures, for the exported module's ``icd.metrics`` tag."""
    a = m.get("active")
    picks = {"latency_ms": ((m.get("latency") or {}).get(a) or {}).get("mean_ms"),
             "quality_drop_pp": ((m.get("quality") or {}).get(a) or {}).get("drop_pp"),
             "tiles_per_token": (m.get("tiles_per_token") or {}).get(a),
             "l2_hit_pct_sim": (m.get("l2_hit_pct_sim") or {}).get(a)}
    return {k: float(v) for k, v in picks.items() if isinstance(v, (int, float))}


def fallbacks(transforms: Mapping[str, dict]) -> list[str]:
    """Every way the active arm's transforms did not run as configured (from their
    meta): failed adapters (applied as no-ops) and each transform's ``fallbacks``."""
    out = []
    for name, meta in transforms.items():
        if not meta.get("ok", True):
            out.append(f"{name}: {meta.get('warning') or 'failed; applied as a no-op'}")
        out += [f for f in meta.get("fallbacks") or [] if f not in out]
    return out


def fallback_gates(gates: dict, falls: list[str]) -> dict:
    """Measured gates of a run whose transforms fell back read ``not met (transform fell
    back: ...)``: what was measured is not the configured co-design."""
    if not falls:
        return gates
    why = "transform fell back: " + "; ".join(falls)
    return {k: (dict(g, status="not met", measured_status=g["status"], reason=why)
                if g["status"] != "not measured" else g) for k, g in gates.items()}


def effects(m: dict, active: str) -> dict:
    """The two effects a run separates: what the transform bought (the active arm
    against dense fp32: latency, quality drop) and what the layout bought at a fixed
    transform (identity order vs pi0 vs pi0 o pi1: quality, and tiles per token where a
    kernel skips tiles), with the paired quality test of each order against identity."""
    lat, q = m.get("latency") or {}, m.get("quality") or {}
    qs, tiles = m.get("quality_samples") or {}, m.get("tiles_per_token") or {}
    transform = dict(
        arm=active,
        latency_pct=(measure.change_pct(lat[active]["mean_ms"], lat["dense"]["mean_ms"])
                     if active in lat and "dense" in lat else None),
        quality_drop_pp=(q.get(active) or {}).get("drop_pp"))
    layout = {}
    for a in ("identity", "before", "after"):
        if a not in q and a not in lat:
            continue
        row = dict(quality=(q.get(a) or {}).get("value"),
                   drop_pp=(q.get(a) or {}).get("drop_pp"),
                   latency_ms=(lat.get(a) or {}).get("mean_ms"),
                   tiles_per_token=tiles.get(a))
        if a != "identity":
            row["p_vs_identity"] = quality_p_value(qs.get("identity"), qs.get(a))
        layout[a] = row
    notes = []
    for a, label in (("before", "pi0"), ("after", "pi0 o pi1")):
        r = layout.get(a)
        if not r or r.get("drop_pp") is None or layout["identity"].get("drop_pp") is None:
            continue
        d, d0, p = r["drop_pp"], layout["identity"]["drop_pp"], r.get("p_vs_identity")
        sig = p is not None and p < 0.05
        how = ("equal: the order changed no item's outcome" if d == d0 else
               ("lower" if d < d0 else "higher")
               + (", significantly" if sig else ", NOT significantly"))
        notes.append(f"{label}: drop {d:.2f} pp vs identity order {d0:.2f} pp; {how} "
                     f"(paired p={fmt_p(p)})")
    return dict(transform=transform, layout=layout, layout_verdict="; ".join(notes) or
                "no layout comparison (a stage failed or quality was not measured)")


def verdict(gates: dict) -> dict:
    out = {s: [k for k, g in gates.items() if g["status"] == s]
           for s in ("met", "not met", "not measured")}
    summary = (f"{len(out['met'])} of {len(gates)} gates met"
               + (f"; not met: {', '.join(out['not met'])}" if out["not met"] else "")
               + (f"; not measured: {', '.join(out['not measured'])}"
                  if out["not measured"] else ""))
    return dict(met=out["met"], not_met=out["not met"], not_measured=out["not measured"],
                summary=summary)


def fmt_p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}"
