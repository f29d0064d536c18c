"""Gates, verdicts and what a run's numbers mean: pure functions of ``metrics.json``.

A gate is ``met`` / ``not met`` / ``not measured`` (missing is never met); a transform
that fell back turns every measured gate into ``not met``; ``effects`` separates what the
transform bought from what the layout bought.
"""

from __future__ import annotations

from collections.abc import Mapping

from icd_jax.runtime import measure


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
