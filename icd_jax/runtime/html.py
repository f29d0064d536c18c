"""The report's HTML: the page, its tables and sections, for ``report.html`` and
``compare.html``.

Pages are self-contained: inline CSS, figures embedded as PNG data URIs, no scripts and
no external resources. Every text from a run is escaped (``esc``). A missing value reads
"not measured", never as a passed gate.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

from icd_jax.runtime.figures import REPORT_FIGURES, Fig
from icd_jax.runtime.gates import SENSE
from icd_jax.runtime.rundir import STATS
from icd_jax.runtime.views import (
    NA,
    RunView,
    arm_names,
    as_dict,
    fmt,
    not_measured,
    num,
    short_json,
    summary_value,
)

#: The page style.
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0 auto;padding:16px 24px 48px;max-width:1200px;color:#1d1d1f;line-height:1.45;
 font-size:15px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;margin:28px 0 6px;
 border-bottom:1px solid #ddd;padding-bottom:3px}h3{font-size:16px;margin:16px 0 4px}
.sub{color:#555;margin:0 0 8px}.verdict{font-size:17px;margin:8px 0;padding:8px 12px;
 background:#f4f6fa;border-left:4px solid #3b6fb6}
table{border-collapse:collapse;margin:6px 0 14px;font-size:14px}
th,td{border:1px solid #d0d0d0;padding:4px 8px;text-align:right;vertical-align:top}
td{white-space:nowrap}td.l{white-space:normal}
th{background:#f0f0f0;font-weight:600}th.l,td.l{text-align:left}
td.na{color:#777;font-style:italic;text-align:center}
tr.active td{background:#eef4ff;font-weight:600}
.tag{display:inline-block;font-size:12px;padding:0 6px;border-radius:8px;background:#3b6fb6;
 color:#fff;font-weight:600}
.met{background:#e2f3e2;color:#125212;font-weight:600}
.notmet{background:#fbe1e1;color:#7d1010;font-weight:600}
.nm{background:#ececec;color:#555;font-weight:600}
td.met,td.notmet,td.nm{white-space:nowrap}
.notice{border:2px solid #c25e00;background:#fff3e3;padding:8px 14px;margin:12px 0}
.problems{border:2px solid #a00;background:#fff0f0;padding:8px 14px;margin:12px 0}
figure{margin:14px 0 22px}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:13px;color:#555;margin-top:4px;max-width:1000px}
.bar{height:10px;background:#3b6fb6;min-width:1px}.bar.fail{background:#b33}
td.bar-cell{width:260px;text-align:left}
code{font-size:13px;background:#f4f4f4;padding:0 3px}
.small{font-size:13px;color:#555}
"""


def esc(x) -> str:
    """``x`` as HTML text (None as empty)."""
    return escape("" if x is None else str(x), quote=True)


def td(text, cls: str = "", title: str | None = None) -> str:
    """A table cell; ``None`` renders as "not measured"."""
    t = f' title="{esc(title)}"' if title else ""
    if text is None:
        return f'<td class="na"{t}>{NA}</td>'
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}{t}>{esc(text)}</td>"


def table(head: list[str], rows: list[str], left=1, cls: str = "") -> str:
    """A table; header cells are left-aligned for the first ``left`` columns (an int) or
    for the column indices in ``left`` (a set)."""
    lefts = set(range(left)) if isinstance(left, int) else set(left)
    ths = "".join(f'<th class="l">{esc(h)}</th>' if i in lefts else f"<th>{esc(h)}</th>"
                  for i, h in enumerate(head))
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def figure_html(name: str, fig: Fig) -> str:
    """A ``<figure>`` with the PNG inline, its alt text and caption."""
    b64, alt, cap = fig
    return (f'<figure id="fig-{esc(name)}"><img src="data:image/png;base64,{b64}" '
            f'alt="{esc(alt)}"><figcaption>{esc(cap)}</figcaption></figure>')


def section_header(m: Mapping, gates: list[tuple[str, dict]]) -> str:
    """The title, what ran and the verdict."""
    run = as_dict(m.get("run"))
    verdict = as_dict(m.get("verdict"))
    counts = {s: [n for n, g in gates if g["status"] == s] for s in ("met", "not met", NA)}
    summary = verdict.get("summary") or (
        f"{len(counts['met'])} of {len(gates)} gates met, {len(counts['not met'])} not met, "
        f"{len(counts[NA])} not measured")
    model = run.get("model") or "unknown model"
    size = run.get("size")
    bits = [f"model <b>{esc(model)}</b>" + (f" ({esc(size)})" if size else ""),
            f"mode <b>{esc(run.get('mode') or 'unknown')}</b>",
            f"active arm <b>{esc(m.get('active') or 'unknown')}</b>"]
    if run.get("seed") is not None:
        bits.append(f"seed {esc(run.get('seed'))}")
    if num(run.get("tokens")) is not None:
        bits.append(f"{int(run['tokens']):,} tokens timed")
    if num(run.get("elapsed_s")) is not None:
        bits.append(f"{esc(fmt(run.get('elapsed_s')))} s")
    detail = " · ".join(f"{esc(k.replace('_', ' '))}: {esc(', '.join(v) or '—')}"
                        for k, v in (("met", counts["met"]), ("not met", counts["not met"]),
                                     ("not measured", counts[NA])))
    return (f"<h1>icd run report: {esc(model)}</h1><p class=\"sub\">{' · '.join(bits)}</p>"
            f'<div class="verdict"><b>Verdict:</b> {esc(summary)}<br>'
            f'<span class="small">{detail}</span></div>')


def section_rollback(m: Mapping) -> str:
    """A notice when the run rolled back."""
    rb = as_dict(m.get("rollback"))
    if not rb.get("happened"):
        return ""
    return (f'<div class="notice" id="rollback"><b>Rollback:</b> the run rolled back from arm '
            f"<b>{esc(rb.get('from') or '?')}</b> to <b>{esc(rb.get('to') or '?')}</b>. "
            f"Reason: {esc(rb.get('reason') or 'not recorded')}. The active arm is "
            f"<b>{esc(m.get('active') or '?')}</b>.</div>")


def section_summary(m: Mapping) -> str:
    """One row per arm: latency, quality, tiles, cache figures; the active arm marked."""
    lat = as_dict(m.get("latency"))
    qual = as_dict(m.get("quality"))
    tiles = as_dict(m.get("tiles_per_token"))
    lines = as_dict(m.get("lines_per_token"))
    sim = as_dict(m.get("l2_hit_pct_sim"))
    l2 = as_dict(m.get("l2_hit_pct"))
    ept = as_dict(m.get("ept_j_per_tok"))
    active = m.get("active")
    metric = qual.get("metric")
    head = ["arm", "latency mean [95% CI] (ms)", "p50 (ms)", "p95 (ms)", "tokens/s",
            f"quality ({metric})" if metric else "quality", "drop (pp)",
            "tiles/token" + (f" (of {num(tiles.get('of')):g})" if num(tiles.get("of")) else ""),
            "lines/token", "L2 hit % (simulated)"]
    if l2:
        head.append("L2 hit % (measured)")
    if ept:
        head.append("energy (J/token)")
    head.append("active")
    rows = []
    for arm in arm_names(m):
        la = as_dict(lat.get(arm))
        qa = as_dict(qual.get(arm))
        mean = fmt(la.get("mean_ms"))
        ci = la.get("ci95_ms")
        if mean is not None and isinstance(ci, (list, tuple)) and len(ci) == 2 and \
                fmt(ci[0]) is not None and fmt(ci[1]) is not None:
            mean = f"{mean} [{fmt(ci[0])}, {fmt(ci[1])}]"
        cells = [td(arm, "l"), td(mean), td(fmt(la.get("p50_ms"))), td(fmt(la.get("p95_ms"))),
                 td(fmt(la.get("tokens_per_s"))), td(fmt(qa.get("value"))),
                 td(fmt(qa.get("drop_pp"))), td(fmt(tiles.get(arm))), td(fmt(lines.get(arm))),
                 td(fmt(sim.get(arm)), title="simulated cache, not a measurement")]
        if l2:
            cells.append(td(fmt(l2.get(arm))))
        if ept:
            cells.append(td(fmt(ept.get(arm))))
        cells.append('<td class="l"><span class="tag">active</span></td>' if arm == active
                     else "<td></td>")
        cls = ' class="active"' if arm == active else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    note = []
    if lat.get("degraded"):
        note.append(f"Latency is degraded: {esc(lat.get('degraded'))}.")
    if sim:
        cache = as_dict(sim.get("cache"))
        desc = ", ".join(f"{k} {cache[k]}" for k in ("level", "size_bytes", "ways",
                                                      "line_bytes", "source") if k in cache)
        note.append("“L2 hit % (simulated)” is a cache simulation"
                    + (f" ({esc(sim.get('what'))})" if sim.get("what") else "")
                    + (f", cache: {esc(desc)}" if desc else "") + "; it is not a measurement.")
    return ("<h2>Summary</h2>" + table(head, rows)
            + (f'<p class="small">{" ".join(note)}</p>' if note else ""))


def section_gates(gates: list[tuple[str, dict]], sense: Mapping[str, str] = SENSE) -> str:
    """The gates table (``gates`` as ``views.gate_rows`` gives them)."""
    rows = []
    for name, g in gates:
        status = g["status"]
        cls = {"met": "met", "not met": "notmet"}.get(status, "nm")
        unit = g.get("unit") or ""
        target = g.get("target")
        if num(target) is not None:
            target = f"{sense.get(name, '')} {fmt(target)} {unit}".strip()
        elif target is not None:
            target = f"{target} {unit}".strip()
        value = fmt(g.get("value"), signed=True)
        value = None if value is None else f"{value} {unit}".strip()
        rows.append(f"<tr>{td(name, 'l')}{td(target or '—')}{td(value)}"
                    f'<td class="l {cls}">{esc(status)}</td>{td(g.get("reason") or "", "l")}'
                    "</tr>")
    return ('<h2>Gates</h2><p class="small">A gate whose value is missing is “not measured”, '
            "never passed.</p>"
            + table(["gate", "target", "value", "status", "reason"], rows, left={0, 3, 4}))



def section_fallbacks(m: Mapping) -> str:
    """A loud banner for every transform that did not run as configured."""
    falls = [f for f in m.get("fallbacks") or [] if f] if isinstance(
        m.get("fallbacks"), list) else []
    if not falls:
        return ""
    return ('<div class="problems"><b>Transforms that fell back</b> (what ran is not the '
            "configured co-design; the measured gates read “not met”):<ul>"
            + "".join(f"<li>{esc(f)}</li>" for f in falls) + "</ul></div>")


def section_effects(m: Mapping) -> str:
    """What the transform bought (vs dense fp32) and what the layout bought (at a fixed
    transform: identity order vs pi0 vs pi0 o pi1)."""
    eff = as_dict(m.get("effects"))
    if not eff:
        return ""
    t = as_dict(eff.get("transform"))
    rows = [f"<tr>{td('transform (active arm ' + str(t.get('arm')) + ') vs dense fp32', 'l')}"
            f"{td(fmt(t.get('latency_pct'), True) or NA)}"
            f"{td(fmt(t.get('quality_drop_pp'), True) or NA)}{td('')}{td('')}</tr>"]
    names = {"identity": "identity order", "before": "π₀ (linear)", "after": "π₀∘π₁ (iterative)"}
    for a, r in as_dict(eff.get("layout")).items():
        r = as_dict(r)
        rows.append(f"<tr>{td('layout: ' + names.get(a, a), 'l')}"
                    f"{td(fmt(r.get('latency_ms')) or NA)}"
                    f"{td(fmt(r.get('drop_pp'), True) or NA)}"
                    f"{td(fmt(r.get('tiles_per_token')) or '–')}"
                    f"{td(fmt(r.get('p_vs_identity')) or '–')}</tr>")
    return ("<h2>Two effects: the transform, and the layout</h2>"
            '<p class="small">First row: what the transform bought (latency change % and '
            "quality drop pp against dense fp32). Layout rows: the same transform under "
            "each channel order (mean latency ms, quality drop pp, tiles per token where a "
            "kernel skips tiles, paired quality p-value against the identity order). "
            f"{esc(eff.get('layout_verdict') or '')}</p>"
            + table(["effect", "latency (% vs dense; ms)", "drop pp", "tiles/token",
                     "p vs identity"], rows))


def _int8_verdict(probe: Mapping) -> str:
    """What the probe found about int8, naming the CPU flags only as what they are."""
    if probe.get("fast_int8"):
        return "fast int8 on this host."
    has = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8")
           if as_dict(probe.get("flags")).get(f)]
    if has:
        return (f"int8 measured no faster than float32 here, although the CPU reports "
                f"{', '.join(has)}.")
    return "no fast int8 on this host (its CPU reports neither VNNI nor AMX)."


def section_what_ran(m: Mapping) -> str:
    """The arithmetic each quantised kernel ran, and the host probe behind it."""
    parts = []
    quant = as_dict(as_dict(m.get("transforms")).get("quant"))
    if quant.get("compute"):
        kinds = ", ".join(f"{n} × {k}" for k, n in sorted(as_dict(quant["compute"]).items()))
        parts.append(f"<p>Quantised kernels ran: {esc(kinds)}.</p>")
    probe = as_dict(m.get("host_probe"))
    if probe.get("shapes"):
        rows = [f"<tr>{td(str((r.get('m'), r.get('k'), r.get('n'))), 'l')}"
                f"{td(fmt(r.get('f32_gops')))}{td(fmt(r.get('int8_gops')))}"
                f"{td(fmt(r.get('w8a8_gops')))}</tr>" for r in probe["shapes"]]
        flags = ", ".join(f for f, on in as_dict(probe.get("flags")).items() if on) or "none"
        parts.append(
            f"<p>Host probe (GOP/s at the model's GEMM shapes; CPU flags: {esc(flags)}): "
            f"W8A8 layer {fmt(probe.get('w8a8_speedup'))}× float32 — "
            + _int8_verdict(probe) + "</p>"
            + table(["(m, k, n)", "float32", "int8 dot", "W8A8 layer"], rows)
            + f'<p class="small">{esc(probe.get("method") or "")}</p>')
    if not parts:
        return ""
    return "<h2>What ran</h2>" + "".join(parts)


def section_not_measured(run: RunView) -> str:
    """What the run did not measure, with the reasons."""
    items = not_measured(run)
    if not items:
        return ("<h2>Not measured on this host</h2><p>Every metric was measured.</p>")
    rows = [f"<tr>{td(k, 'l')}{td(v, 'l')}</tr>" for k, v in items]
    return ('<h2 id="not-measured">Not measured on this host</h2>'
            + table(["metric", "reason"], rows, left=2))


def section_prepost(m: Mapping) -> str:
    """Dense vs the active arm."""
    active = m.get("active")
    if not active or active == "dense":
        return ""
    return arm_pair_table(m, "dense", active, f"Before / after: dense vs active ({active})",
                           "dense", f"{active} (active)")


def section_modes(m: Mapping) -> str:
    """Linear (arm ``before``, pi0) vs iterative (arm ``after``, pi0 o pi1)."""
    lat = as_dict(m.get("latency"))
    if "before" not in lat or "after" not in lat:
        return ""
    return arm_pair_table(m, "before", "after", "Linear vs iterative: π₀ vs π₀∘π₁",
                           "linear (before)", "iterative (after)")


def arm_pair_table(m: Mapping, a_arm: str, b_arm: str, title: str, a_head: str,
                   b_head: str) -> str:
    """Arm ``a_arm`` against ``b_arm``: each headline metric, its change and change %."""
    lat = as_dict(m.get("latency"))
    qual = as_dict(m.get("quality"))

    def get(arm):
        la, qa = as_dict(lat.get(arm)), as_dict(qual.get(arm))
        return [("latency mean (ms)", la.get("mean_ms"), True),
                ("latency p95 (ms)", la.get("p95_ms"), True),
                ("tokens/s", la.get("tokens_per_s"), True),
                (f"quality ({qual.get('metric') or 'quality'})", qa.get("value"), False),
                ("tiles/token", as_dict(m.get("tiles_per_token")).get(arm), True),
                ("lines/token", as_dict(m.get("lines_per_token")).get(arm), True),
                ("L2 hit % (simulated)", as_dict(m.get("l2_hit_pct_sim")).get(arm), False),
                ("L2 hit % (measured)", as_dict(m.get("l2_hit_pct")).get(arm), False),
                ("energy (J/token)", as_dict(m.get("ept_j_per_tok")).get(arm), True)]

    rows = []
    for (label, d, rel), (_, a, _) in zip(get(a_arm), get(b_arm)):
        dv, av = num(d), num(a)
        delta = None if dv is None or av is None else av - dv
        pct = None
        if delta is not None and rel and dv != 0:
            pct = f"{fmt(100 * delta / dv, signed=True)} %"
        rows.append(f"<tr>{td(label, 'l')}{td(fmt(dv))}{td(fmt(av))}"
                    f"{td(fmt(delta, signed=True))}{td(pct if rel else '—')}</tr>")
    return f"<h2>{esc(title)}</h2>" + table(["metric", a_head, b_head, "Δ", "Δ %"], rows)


def section_timeline(events: list) -> str:
    """The stage events with their durations as bars."""
    evs = [e for e in events if isinstance(e, Mapping)]
    if not evs:
        return '<h2>Stage timeline</h2><p class="small">No events recorded (events.jsonl).</p>'
    starts = [num(e.get("t_start")) for e in evs]
    ends = [num(e.get("t_end")) for e in evs]
    t0 = min((s for s in starts if s is not None), default=None)
    durs = [None if s is None or t is None else t - s for s, t in zip(starts, ends)]
    dmax = max((d for d in durs if d is not None), default=0.0) or 1.0
    rows = []
    for e, s, d in zip(evs, starts, durs):
        ok = e.get("ok")
        ok_s = "ok" if ok is True else "failed" if ok is False else "?"
        cls = "met" if ok is True else "notmet" if ok is False else "nm"
        width = 0 if d is None else max(0.5, 100 * d / dmax)
        bar = f'<div class="bar{" fail" if ok is False else ""}" style="width:{width:.1f}%"></div>'
        rel = None if s is None or t0 is None else f"{s - t0:.2f}"
        rows.append(f"<tr>{td(e.get('stage') or '?', 'l')}{td(rel)}"
                    f"{td(None if d is None else f'{d:.3f}')}"
                    f'<td class="l {cls}">{ok_s}</td><td class="bar-cell">{bar}</td>'
                    f"{td(short_json(e.get('meta')) if e.get('meta') else '', 'l')}</tr>")
    total = None
    if t0 is not None:
        t_end = max((t for t in ends if t is not None), default=None)
        total = None if t_end is None else t_end - t0
    return ("<h2>Stage timeline</h2>"
            + table(["stage", "start (s)", "duration (s)", "ok", "", "meta"], rows,
                     left={0, 3, 4, 5})
            + (f'<p class="small">Wall time from the first stage: {total:.2f} s.</p>'
               if total is not None else ""))


def section_cost_table(run: RunView) -> str:
    """The solver stats per cost stage and axis."""
    rows = []
    for stage in STATS:
        for axis, s in as_dict(run.stats.get(stage)).items():
            if not isinstance(s, Mapping):
                continue
            rows.append(f"<tr>{td(stage, 'l')}{td(axis, 'l')}{td(fmt(s.get('C_identity')))}"
                        f"{td(fmt(s.get('C')))}{td(fmt(s.get('Q_identity')))}"
                        f"{td(fmt(s.get('Q')))}{td(s.get('method') or '', 'l')}"
                        f"{td(fmt(s.get('elapsed_s')))}{td(s.get('iters'))}"
                        f"{td('yes' if s.get('timed_out') else 'no')}</tr>")
    if not rows:
        return ""
    return ("<h3>Solver stats per axis</h3>"
            + table(["stage", "axis", "C identity", "C π", "Q identity", "Q π", "method",
                      "time (s)", "iters", "timed out"], rows, left=2))


def section_details(run: RunView) -> str:
    """Hashes, environment, transform meta, event overhead and the active order."""
    m = run.m
    rows = []
    r = as_dict(m.get("run"))
    for k in ("config_hash", "env_hash"):
        if r.get(k):
            rows.append(f"<tr>{td(k, 'l')}{td(r[k], 'l')}</tr>")
    env = as_dict(as_dict(run.lock).get("env"))
    for k, v in env.items():
        v = short_json(v) if isinstance(v, (dict, list)) else "—" if v is None else v
        rows.append(f"<tr>{td('env.' + str(k), 'l')}{td(v, 'l')}</tr>")
    for k, v in as_dict(m.get("transforms")).items():
        rows.append(f"<tr>{td('transform.' + str(k), 'l')}{td(short_json(v), 'l')}</tr>")
    ev = as_dict(m.get("events"))
    if ev:
        rows.append(f"<tr>{td('events', 'l')}{td(short_json(ev), 'l')}</tr>")
    if run.perm_active:
        rows.append(f"<tr>{td('perm_active.meta', 'l')}"
                    f"{td(short_json(run.perm_active[1]), 'l')}</tr>")
    if not rows:
        return ""
    return "<h2>Run details</h2>" + table(["key", "value"], rows, left=2)


def page(title: str, body: str, css: str = CSS) -> bytes:
    """A whole HTML document (UTF-8 bytes)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{css}</style></head><body>{body}"
            "</body></html>\n").encode()



# -- whole pages --------------------------------------------------------------------------
def section_figures(run: RunView, figs: Mapping[str, Fig]) -> str:
    """Every report figure under its title, or why it is missing; the solver stats
    follow the cost figure."""
    out = ["<h2>Figures</h2>"]
    for name, title, missing in REPORT_FIGURES:
        out.append(f"<h3>{esc(title)}</h3>")
        if name in figs:
            out.append(figure_html(name, figs[name]))
        else:
            out.append(f'<p class="small">{NA}: {esc(missing)}.</p>')
        if name == "cost":
            out.append(section_cost_table(run))
    return "".join(out)


def section_problems(problems: list[str]) -> str:
    """Optional artefacts present but unreadable."""
    if not problems:
        return ""
    return ('<div class="problems"><b>Artefact problems</b> (shown as not measured):'
            "<ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul></div>")


def section_warnings(m: Mapping) -> str:
    """The run's warnings."""
    warnings = [w for w in m.get("warnings") or [] if w] if isinstance(
        m.get("warnings"), list) else []
    if not warnings:
        return ""
    return "<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>"


def report_body(run: RunView, gates: list[tuple[str, dict]], figs: Mapping[str, Fig]
                ) -> str:
    """The body of ``report.html`` (without the footer)."""
    m = run.m
    return "".join([
        section_header(m, gates), section_rollback(m), section_problems(run.problems),
        section_fallbacks(m), section_warnings(m), section_summary(m), section_effects(m),
        section_gates(gates), section_what_ran(m), section_not_measured(run),
        section_figures(run, figs), section_prepost(m), section_modes(m),
        section_timeline(run.events), section_details(run)])


def footer(source: str, elapsed_s: float) -> str:
    """Where the report came from and how long it took."""
    return (f'<p class="small">Generated by icd_jax.runtime.report from {esc(source)} in '
            f"{elapsed_s:.2f} s.</p>")


def compare_body(blob: Mapping, order: list[str], fig: Fig | None) -> str:
    """The body of ``compare.html`` from a ``compare.json``-shaped dict: the verdict, the
    arms side by side, the paired tests and the paired latency figure."""
    arms = as_dict(blob.get("arms"))
    paired = as_dict(blob.get("paired"))
    verdict = blob.get("verdict")
    verdict = verdict.get("summary") if isinstance(verdict, Mapping) else verdict
    body = [f"<h1>icd pair: {esc(' vs '.join(order) or 'comparison')}</h1>",
            f'<div class="verdict"><b>Verdict:</b> {esc(verdict or "not recorded")}</div>',
            "<h2>Arms side by side</h2>",
            compare_arms_table(arms) if arms else
            f'<p class="small">{NA}: no arm summaries.</p>',
            "<h2>Paired tests</h2>",
            paired_tests_table(paired) if paired else
            f'<p class="small">{NA}: no paired tests.</p>',
            "<h2>Paired latency samples</h2>",
            figure_html("paired_latency", fig) if fig is not None else
            f'<p class="small">{NA}: no latency samples (samples_ms).</p>']
    return "".join(body)


def compare_arms_table(arms: Mapping) -> str:
    """Each arm's summary values side by side (long sample lists left out)."""
    keys: list[str] = []
    for s in arms.values():
        for k, v in as_dict(s).items():
            if k not in keys and k != "arm" and not (isinstance(v, list) and len(v) > 2):
                keys.append(k)
    rows = []
    if "mean_ms" in keys and "ci95_ms" in keys:
        cells = []
        for arm in arms:
            s = as_dict(arms[arm])
            mean, ci = fmt(s.get("mean_ms")), summary_value(s.get("ci95_ms"))
            cells.append(td(None if mean is None else f"{mean} {ci or ''}".strip()))
        rows.append(f"<tr>{td('latency mean [95% CI] (ms)', 'l')}{''.join(cells)}</tr>")
        keys = [k for k in keys if k not in ("mean_ms", "ci95_ms")]
    for k in keys:
        cells = "".join(td(summary_value(as_dict(arms[a]).get(k))) for a in arms)
        rows.append(f"<tr>{td(k, 'l')}{cells}</tr>")
    return table(["metric", *arms], rows)


def paired_tests_table(paired: Mapping) -> str:
    """One row per paired test: the arms, mean difference, CI, p values, test, n."""
    rows = []
    for metric, p in paired.items():
        p = as_dict(p)
        ci = p.get("ci95")
        ci_s = summary_value(ci) if isinstance(ci, (list, tuple)) else None
        pv, pt = num(p.get("p_value")), num(p.get("p_value_t"))
        rel = fmt(p.get("rel_diff_pct"), signed=True)
        rows.append(f"<tr>{td(metric, 'l')}{td(p.get('a'), 'l')}{td(p.get('b'), 'l')}"
                    f"{td(fmt(p.get('mean_diff'), signed=True))}{td(ci_s)}"
                    f"{td(None if rel is None else rel + ' %')}"
                    f"{td(None if pv is None else f'{pv:.3g}')}"
                    f"{td(None if pt is None else f'{pt:.3g}')}{td(p.get('test'), 'l')}"
                    f"{td(p.get('n'))}</tr>")
    return table(["metric", "a", "b", "mean diff (b − a)", "95% CI", "diff % of a",
                  "p value", "p value (t)", "test", "n"], rows, left={0, 1, 2, 8})
