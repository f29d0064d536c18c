"""Plain-text views of a run for the terminal: the plan (``--dry-run``) and the summary
table a finished run prints."""

from __future__ import annotations

import os
from collections.abc import Mapping

from icd_jax.runtime.records import Metrics, ci_bounds
from icd_jax.runtime.rundir import file_path


def plan_text(cfg, pair_repeats: int | None = None) -> str:
    """The stages a run with ``cfg`` goes through, one line each (``pair_repeats``: the
    rounds ``icd pair`` times, at least ``pipeline.repeats``)."""
    from icd_jax.runtime import config as config_lib

    t, g = cfg.transform, cfg.graph
    q = t.quant
    on = [f"S={t.sparsity.kind}" if t.sparsity.enabled else None,
          quant_plan(q, weight_only=cfg.model.name != "minilm") if q.enabled else None,
          f"K=drop {t.kv.drop:g}/block {t.kv.block}" if t.kv.enabled else None]
    custom = cfg.model.name == "custom"  # the target's own batches decide what runs
    model = f"custom {cfg.model.target}" if custom else f"{cfg.model.name} ({cfg.model.size})"
    items = "the target's own batches" if custom else f"{g.sentences} items"
    lines = [
        f"READY        load {model}; lock the run directory",
        f"W_BUILT      {g.source} -> co-access W per axis ({items}, "
        f"top {g.top_frac:g} active, top-{g.topk} neighbours)",
        f"PERMUTED     fit_permutation per axis ({cfg.solver.time_budget_s:g} s budget, "
        f"{cfg.solver.refine_steps} moves); cache {'reuse' if cfg.cache.reuse else 'write'}",
        f"TRANSFORMED  {' '.join(x for x in on if x) or 'no transforms'}",
    ]
    if cfg.pipeline.mode == "iterative":
        w_after = ("W' = the same planted mock W (graph.source mock: nothing is measured "
                   "on the transformed model)" if g.source == "mock"
                   else "W' on the transformed model")
        lines.append(f"REPERMUTED   {w_after} -> pi1; transforms redone under pi0 o pi1")
    quality = "the target's own batches" if custom else f"{cfg.quality.sentences} items"
    skip = not custom or (t.sparsity.enabled and t.sparsity.kind == "ffn")
    tiles = f"tiles/token, simulated L{cfg.measure.sim_level}, " if skip else ""
    rounds = max(cfg.pipeline.repeats, pair_repeats or 0)
    lines += [f"MEASURED     latency ({rounds} interleaved rounds, "
              f"{cfg.pipeline.warmup} warmup), quality ({quality}), "
              f"{tiles}NVML/ncu where present",
              f"REPORTED     gates, rollback decision, {written(cfg.report)}",
              f"config hash  {config_lib.digest(config_lib.resolved(cfg))[:16]}"]
    return "\n".join(lines)


def quant_plan(q, weight_only: bool) -> str:
    """What the ``Quant`` section ``q`` runs, for the plan; ``weight_only``: the model's
    layers take float weights (mamba, a custom target), so int8 activations and SmoothQuant
    are not applied (the run lists them as fallbacks)."""
    groups = f"/g{q.group_size} on {q.groups_on}" if q.group_size else ""
    if not weight_only:
        smooth = f"/smooth {q.smooth_alpha:g}" if q.smooth_alpha is not None else ""
        return f"Q={q.dtype}/act {q.act}{groups}{smooth}"
    skipped = ([f"act {q.act}"] if q.act != "none" else []) + (
        [f"smooth {q.smooth_alpha:g}"] if q.smooth_alpha is not None else [])
    return (f"Q={q.dtype} weight-only{groups}"
            + (f" ({', '.join(skipped)}: not applied, listed as fallbacks)" if skipped else ""))


def written(r) -> str:
    """The files the REPORTED stage writes under the ``Report`` section ``r``."""
    files = [name for name, on in (("model.stablehlo", r.stablehlo), ("report.html", r.html),
                                   ("report.csv", r.csv)) if on]
    return ", ".join(files) if files else "no files (report.* all off)"


def _ci_text(ci) -> str:
    """``lo-hi`` of a CI95 pair; n/a where it is missing (one repeat has no interval)."""
    bounds = ci_bounds(ci)
    return "CI n/a" if bounds is None else f"{bounds[0]:.1f}-{bounds[1]:.1f}"


def summary_text(metrics: Metrics | Mapping, out_dir: str | os.PathLike) -> str:
    """A short table of the arms, the gates and where the report is (``metrics``: the
    run's ``Metrics`` or its ``metrics.json`` dict)."""
    if isinstance(metrics, Metrics):
        metrics = metrics.dump()
    lat, q = metrics.get("latency") or {}, metrics.get("quality") or {}
    tiles, sim = metrics.get("tiles_per_token") or {}, metrics.get("l2_hit_pct_sim") or {}
    active = metrics.get("active")
    rows = [f"{'arm':10s} {'latency ms (CI95)':>24s} {'tok/s':>8s} {'quality %':>10s} "
            f"{'drop pp':>8s} {'tiles/tok':>10s} {'L2 sim %':>9s}"]
    for a in metrics.get("arms", []):
        la = lat.get(a)
        lt = f"{la['mean_ms']:.1f} ({_ci_text(la.get('ci95_ms'))})" if la else "n/a"
        tps = f"{la['tokens_per_s']:.0f}" if la else "n/a"
        qa = q.get(a)
        qv = f"{qa['value']:.2f}" if qa else "n/a"
        dp = f"{qa['drop_pp']:+.2f}" if qa else "n/a"
        tt = f"{tiles[a]:.1f}" if a in tiles else "-"
        ss = f"{sim[a]:.1f}" if a in sim else "-"
        mark = " <- active" if a == active else ""
        rows.append(f"{a:10s} {lt:>24s} {tps:>8s} {qv:>10s} {dp:>8s} {tt:>10s} {ss:>9s}{mark}")
    rows.append("gates:")
    for name, g in (metrics.get("gates") or {}).items():
        val = "n/a" if g["value"] is None else f"{g['value']:+.2f}"
        why = f" ({g['reason']})" if g.get("reason") else ""
        target = g.get("target")
        target = f"{target:+g}" if isinstance(target, (int, float)) else str(target)
        rows.append(f"  {name:8s} target {target} {g.get('unit') or ''}: {val} -> "
                    f"{g['status']}{why}")
    rows.append(f"verdict: {metrics.get('verdict', {}).get('summary', 'n/a')}")
    for f in metrics.get("fallbacks") or []:
        rows.append(f"FALLBACK: {f}")
    quant = (metrics.get("transforms") or {}).get("quant") or {}
    if quant.get("compute"):
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(quant["compute"].items()))
        rows.append(f"quant ran: {kinds} kernels")
    probe = metrics.get("host_probe")
    if probe:
        from icd_jax.runtime.hostprobe import describe
        rows.append(describe(probe))
    eff = metrics.get("effects") or {}
    if eff.get("layout_verdict"):
        rows.append(f"what pi bought: {eff['layout_verdict']}")
    rb = metrics.get("rollback") or {}
    if rb.get("happened"):
        rows.append(f"ROLLBACK to {rb.get('to')}: {rb.get('reason')}")
    rows.append(report_line(out_dir))
    return "\n".join(rows)


def report_line(out_dir: str | os.PathLike) -> str:
    """``report: PATH[, PATH]`` naming the report files that exist in ``out_dir`` (none
    when ``report.html`` and ``report.csv`` are off or the report failed)."""
    found = [file_path(out_dir, k) for k in ("html", "csv")
             if os.path.isfile(file_path(out_dir, k))]
    return f"report: {', '.join(found)}" if found else "report: none written"
