"""``icd pair``'s comparison: linear (pi0) against iterative (pi0 o pi1) from one run's
``metrics.json``, with paired tests on latency, quality and tiles."""

from __future__ import annotations

from icd_jax.runtime import measure
from icd_jax.runtime.gates import fmt_p


def arm_summary(m: dict, arm: str) -> dict:
    """One arm's headline figures from ``metrics.json``."""
    lat = (m.get("latency") or {}).get(arm) or {}
    q = (m.get("quality") or {}).get(arm) or {}
    return dict(arm=arm, mean_ms=lat.get("mean_ms"), ci95_ms=lat.get("ci95_ms"),
                p50_ms=lat.get("p50_ms"), tokens_per_s=lat.get("tokens_per_s"),
                quality=q.get("value"), drop_pp=q.get("drop_pp"),
                tiles_per_token=(m.get("tiles_per_token") or {}).get(arm),
                l2_hit_pct_sim=(m.get("l2_hit_pct_sim") or {}).get(arm))


def compare_modes(m: dict) -> dict:
    """``compare.json`` from an iterative run's metrics: linear (= arm ``before``, pi0)
    against iterative (= arm ``after``, pi0 o pi1), measured on the same inputs in the
    same interleaved rounds; paired tests on latency and on per-token tiles."""
    lin, it = arm_summary(m, "before"), arm_summary(m, "after")
    paired = {}
    lat = m.get("latency") or {}
    if "before" in lat and "after" in lat:
        paired["latency_ms"] = dict(measure.paired(lat["before"]["samples_ms"],
                                                   lat["after"]["samples_ms"]),
                                    a="linear", b="iterative")
    qs = m.get("quality_samples") or {}
    if qs.get("before") is not None and qs.get("after") is not None:
        paired["quality"] = dict(measure.paired(qs["before"], qs["after"]), a="linear",
                                 b="iterative", exact=measure.mcnemar(qs["before"],
                                                                      qs["after"]))
    tiles = m.get("tiles_per_token_samples") or {}
    if "before" in tiles and "after" in tiles:
        paired["tiles_per_token"] = dict(measure.paired(tiles["before"], tiles["after"]),
                                         a="linear", b="iterative")
    notes = []
    if lin["drop_pp"] is not None and it["drop_pp"] is not None:
        better_q = it["drop_pp"] <= lin["drop_pp"]
        note = (f"quality: iterative {'is' if better_q else 'is NOT'} at least as good as "
                f"linear (drop {it['drop_pp']:.2f} vs {lin['drop_pp']:.2f} pp")
        if "quality" in paired:
            d = paired["quality"]
            note += (f"; paired over {d['n']} items: {d['mean_diff']:+.2f} pp, CI95 "
                     f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}], p={fmt_p(d['p_value'])}")
        notes.append(note + ")")
    if "tiles_per_token" in paired:
        d = paired["tiles_per_token"]
        notes.append(f"tiles/token: iterative {'is' if d['mean_diff'] <= 0 else 'is NOT'} at "
                     f"least as good as linear ({d['mean_diff']:+.2f} per token, CI95 "
                     f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}], p={fmt_p(d['p_value'])})")
    if "latency_ms" in paired:
        d = paired["latency_ms"]
        notes.append(f"latency: iterative {d['rel_diff_pct']:+.1f}% vs linear (CI95 "
                     f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] ms, p={fmt_p(d['p_value'])}"
                     f", n={d['n']})")
    return dict(arms=dict(linear=lin, iterative=it), paired=paired,
                samples_ms={"linear": (lat.get("before") or {}).get("samples_ms", []),
                            "iterative": (lat.get("after") or {}).get("samples_ms", [])},
                verdict="; ".join(notes) or "nothing to compare (a stage failed)")
