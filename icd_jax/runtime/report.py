"""The run report: ``report.html`` and ``report.csv`` from a run directory, ``compare.html``.

``build(run_dir)`` reads the artefacts of docs/pipeline.md and writes a self-contained
HTML page (inline CSS, figures embedded as PNG data URIs, no scripts, no external
resources) and a one-row-per-arm CSV. ``metrics.json`` is required; every other artefact
is optional: a missing piece is shown as "not measured" (or listed under "artefact
problems" when present but unreadable), never as a passed gate. ``compare(out_dir, blob)``
renders a ``compare.json``-shaped dict (``icd pair``) as ``compare.html``.

Figures are drawn on ``matplotlib.figure.Figure`` objects with an explicit Agg canvas:
pyplot and its global state are never touched, so the report can be built inside any
process. Co-access heatmaps are block-summed to at most 256 x 256 cells straight from the
sparse COO entries (O(nnz)), so big runs stay fast.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import time
from collections.abc import Mapping

import numpy as np

from icd_jax.errors import ArtifactError
from icd_jax.runtime import artifacts

#: The columns of ``report.csv``, in order (docs/pipeline.md).
CSV_COLUMNS = ("arm", "latency_mean_ms", "latency_p50_ms", "latency_p95_ms", "ci95_lo_ms",
               "ci95_hi_ms", "tokens_per_s", "quality_metric", "quality_value", "drop_pp",
               "tiles_per_token", "lines_per_token", "l2_hit_pct_sim", "active")
#: The gates every run reports, in display order.
GATES = ("latency", "l2_hit", "ept", "quality")
#: How each known gate compares its value with its target (config.gates descriptions).
GATE_SENSE = {"latency": "≤", "l2_hit": "≥", "ept": "≤", "quality": "≤"}
#: Largest heatmap side in cells (``config.report.heatmap_max`` may lower it).
HEATMAP_MAX = 256
#: Co-access axes drawn as heatmaps (the first ones in ``W.npz`` order).
HEATMAP_AXES = 4
#: Stats files per cost stage.
STATS_FILES = {"permuted": "stats_permuted.json", "repermuted": "stats_repermuted.json"}
#: Keys of a metrics section that are not arm names.
_NOT_ARMS = {"method", "degraded", "metric", "higher_is_better", "tile", "of", "line_bytes",
             "cache", "what"}
_NA = "not measured"
_DPI = 100

_CSS = """
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


# -- small helpers ------------------------------------------------------------------------
def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _dict(x) -> dict:
    return x if isinstance(x, Mapping) else {}


def _num(x) -> float | None:
    """``x`` as a finite float, or None (bools, strings, NaN and missing values)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _f(x, signed: bool = False) -> str | None:
    """A readable number, or None when ``x`` is not one."""
    v = _num(x)
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


def _td(text, cls: str = "", title: str | None = None) -> str:
    """A table cell; ``None`` renders as "not measured"."""
    t = f' title="{_e(title)}"' if title else ""
    if text is None:
        return f'<td class="na"{t}>{_NA}</td>'
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}{t}>{_e(text)}</td>"


def _table(head: list[str], rows: list[str], left=1, cls: str = "") -> str:
    """A table; header cells are left-aligned for the first ``left`` columns (an int) or
    for the column indices in ``left`` (a set)."""
    lefts = set(range(left)) if isinstance(left, int) else set(left)
    ths = "".join(f'<th class="l">{_e(h)}</th>' if i in lefts else f"<th>{_e(h)}</th>"
                  for i, h in enumerate(head))
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(x) -> str:
    """A CSV value: numbers at full precision, missing values empty."""
    if x is None or isinstance(x, bool):
        return ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    v = _num(x)
    if v is not None:
        return repr(v)
    if isinstance(x, (float, np.floating)):  # NaN / inf
        return ""
    return str(x)


def _arms(metrics: Mapping) -> list[str]:
    """The measured arms: ``metrics["arms"]``, or the arm keys of the latency section."""
    arms = metrics.get("arms")
    if isinstance(arms, list) and all(isinstance(a, str) for a in arms):
        return list(arms)
    out = []
    for sec in ("latency", "quality"):
        for k, v in _dict(metrics.get(sec)).items():
            if k not in _NOT_ARMS and isinstance(v, Mapping) and k not in out:
                out.append(k)
    return out


def _target_number(target) -> float | None:
    v = _num(target)
    if v is not None:
        return v
    if isinstance(target, str):
        m = re.search(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", target)
        if m:
            return float(m.group())
    return None


def _short_json(x, limit: int = 160) -> str:
    try:
        s = json.dumps(x, sort_keys=True, default=str)
    except (TypeError, ValueError):
        s = str(x)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# -- reading a run ------------------------------------------------------------------------
class _Run:
    """The artefacts of one run directory; optional ones are None when absent, and
    ``problems`` lists those present but unreadable."""

    def __init__(self, run_dir: str):
        self.dir = run_dir
        self.problems: list[str] = []
        self.metrics = artifacts.read_json(self._p("metrics"))
        self.lock = self._opt(lambda: artifacts.read_json(self._p("lock")), self._p("lock"))
        self.events = self._opt(lambda: artifacts.read_events(self._p("events")),
                                self._p("events")) or []
        self.w = self._opt(lambda: artifacts.load_graphs(self._p("w")), self._p("w"))
        self.w_after = self._opt(lambda: artifacts.load_graphs(self._p("w_after")),
                                 self._p("w_after"))
        self.perm_before = self._perms("perm_before")
        self.perm_after = self._perms("perm_after")
        self.perm_active = self._perms("perm_active")
        self.stats = {}
        for stage, name in STATS_FILES.items():
            path = os.path.join(run_dir, name)
            self.stats[stage] = self._opt(lambda p=path: artifacts.read_json(p), path)

    def _p(self, key: str) -> str:
        return os.path.join(self.dir, artifacts.FILES[key])

    def _opt(self, load, path: str):
        if not os.path.exists(path):
            return None
        try:
            return load()
        except ArtifactError as e:
            self.problems.append(str(e))
            return None

    def _perms(self, key: str):
        path = self._p(key)
        return self._opt(lambda: artifacts.load_perms(path), path)

    @property
    def heatmap_max(self) -> int:
        cfg = _dict(_dict(_dict(self.lock).get("config")).get("report"))
        n = cfg.get("heatmap_max")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 8:
            return min(n, HEATMAP_MAX)
        return HEATMAP_MAX


# -- CSV ----------------------------------------------------------------------------------
def csv_rows(metrics: dict) -> list[dict]:
    """One row per arm with exactly ``CSV_COLUMNS``; missing values are empty strings."""
    metrics = _dict(metrics)
    lat = _dict(metrics.get("latency"))
    qual = _dict(metrics.get("quality"))
    tiles = _dict(metrics.get("tiles_per_token"))
    lines = _dict(metrics.get("lines_per_token"))
    sim = _dict(metrics.get("l2_hit_pct_sim"))
    active = metrics.get("active")
    rows = []
    for arm in _arms(metrics):
        la = _dict(lat.get(arm))
        ci = la.get("ci95_ms")
        lo, hi = (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None,
                                                                                          None)
        qa = _dict(qual.get(arm))
        rows.append({
            "arm": arm,
            "latency_mean_ms": _cell(la.get("mean_ms")),
            "latency_p50_ms": _cell(la.get("p50_ms")),
            "latency_p95_ms": _cell(la.get("p95_ms")),
            "ci95_lo_ms": _cell(lo),
            "ci95_hi_ms": _cell(hi),
            "tokens_per_s": _cell(la.get("tokens_per_s")),
            "quality_metric": _cell(qual.get("metric")) if qa else "",
            "quality_value": _cell(qa.get("value")),
            "drop_pp": _cell(qa.get("drop_pp")),
            "tiles_per_token": _cell(tiles.get(arm)),
            "lines_per_token": _cell(lines.get(arm)),
            "l2_hit_pct_sim": _cell(sim.get(arm)),
            "active": "true" if arm == active else "false",
        })
    return rows


def _csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


# -- figures ------------------------------------------------------------------------------
def _figure(w_in: float, h_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend_below(ax, dy: float = -0.16) -> None:
    """A legend under the axes (``dy`` in axes heights), where it cannot cover bars or
    their labels."""
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, dy), ncol=3,
              frameon=False)


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _blocksum(w, order, n_max: int) -> np.ndarray:
    """``w`` (sparse) with rows and columns placed by ``order`` (``order[p]`` = channel at
    position ``p``; None = shipped order), block-summed to at most ``n_max`` per side."""
    coo = w.tocoo()
    nr, nc = coo.shape
    br, bc = min(n_max, nr), min(n_max, nc)
    rows = coo.row.astype(np.int64)
    cols = coo.col.astype(np.int64)
    if order is not None:
        pos = np.empty(nr, np.int64)
        pos[np.asarray(order, np.int64)] = np.arange(nr)
        rows, cols = pos[rows], pos[cols]
    r = rows * br // max(nr, 1)
    c = cols * bc // max(nc, 1)
    out = np.bincount(r * bc + c, weights=np.abs(coo.data.astype(np.float64)),
                      minlength=br * bc)
    return out.reshape(br, bc)


def _fig_heatmaps(run: _Run) -> tuple[str, str, str] | None:
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    if not run.w:
        return None
    names = list(run.w)[:HEATMAP_AXES]
    pb = run.perm_before[0] if run.perm_before else {}
    pa = run.perm_after[0] if run.perm_after else {}
    wa = run.w_after or {}
    show_after = any(n in wa for n in names)
    ncol = 3 if show_after else 2
    n_max = run.heatmap_max
    fig = _figure(4.0 * ncol + 0.8, 3.7 * len(names) + 0.3)
    axs = fig.subplots(len(names), ncol, squeeze=False)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    for i, name in enumerate(names):
        w = run.w[name]
        d = w.shape[0]
        panels = [(f"{name}: W, shipped order", w, None, None)]
        p = pb.get(name)
        if p is not None and len(p) == d:
            panels.append((f"{name}: W by π₀ (perm_before)", w, p, None))
        else:
            panels.append((f"{name}: W by π₀", None, None, "no perm_before for this axis"))
        if show_after:
            w2, p2 = wa.get(name), pa.get(name)
            if p2 is not None and p is not None and len(p) == len(p2):
                # W_after is stored in pi0's order; perm_after = pi0 o pi1, so pi1 = pi0^-1[after]
                p2 = np.argsort(np.asarray(p))[np.asarray(p2)]
            if w2 is not None and p2 is not None and len(p2) == w2.shape[0]:
                panels.append((f"{name}: W′ by π₁ (perm_after)", w2, p2, None))
            else:
                panels.append((f"{name}: W′ by π₁", None, None, "no W_after / perm_after"))
        grids = [None if g is None else _blocksum(g, o, n_max) for _, g, o, _ in panels]
        pos_vals = np.concatenate([g[g > 0].ravel() for g in grids if g is not None] or
                                  [np.zeros(0)])
        norm = (LogNorm(vmin=float(pos_vals.min()), vmax=max(float(pos_vals.max()),
                                                             float(pos_vals.min()) * 1.0001))
                if pos_vals.size else None)
        im = None
        for j, ((title, g, _, why), grid) in enumerate(zip(panels, grids)):
            ax = axs[i][j]
            ax.set_title(title, fontsize=10)
            if grid is None or norm is None:
                ax.text(0.5, 0.5, why or "empty graph", ha="center", va="center",
                        transform=ax.transAxes, fontsize=10, color="#555")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            nr, nc = g.shape
            im = ax.imshow(np.ma.masked_less_equal(grid, 0), cmap=cmap, norm=norm,
                           interpolation="nearest", extent=(0, nc, nr, 0), aspect="equal")
            ax.set_xlabel("position", fontsize=9)
            ax.tick_params(labelsize=8)
        if im is not None:
            cb = fig.colorbar(im, ax=list(axs[i]), shrink=0.85, pad=0.01)
            cb.set_label("co-access weight (log)", fontsize=9)
            cb.ax.tick_params(labelsize=8)
    more = len(run.w) - len(names)
    alt = (f"Co-access heatmaps of {len(names)} axes ({', '.join(names)}): W in shipped order, "
           "W reordered by perm_before" + (", W_after reordered by perm_after" if show_after
                                           else "") + "; log colour scale")
    cap = ("Co-access graphs, log colour scale, block-summed to at most "
           f"{n_max}×{n_max} cells; white = no co-access. A good order gathers the weight "
           "into blocks on the diagonal." + (f" {more} more axes not drawn." if more > 0
                                             else ""))
    return _png_b64(fig), alt, cap


def _fig_latency(metrics: Mapping) -> tuple[str, str, str] | None:
    lat = _dict(metrics.get("latency"))
    active = metrics.get("active")
    arms, samples, means, cis = [], [], [], []
    for arm in _arms(metrics):
        la = _dict(lat.get(arm))
        s = [v for v in (_num(x) for x in la.get("samples_ms") or []) if v is not None] \
            if isinstance(la.get("samples_ms"), list) else []
        m = _num(la.get("mean_ms"))
        if not s and m is None:
            continue
        ci = la.get("ci95_ms")
        ci = (tuple(_num(c) for c in ci) if isinstance(ci, (list, tuple)) and len(ci) == 2
              else (None, None))
        arms.append(arm)
        samples.append(s)
        means.append(m if m is not None else float(np.mean(s)))
        cis.append(ci)
    if not arms:
        return None
    fig = _figure(max(5.5, 1.5 * len(arms) + 2.5), 3.8)
    ax = fig.subplots()
    x = np.arange(1, len(arms) + 1)
    with_s = [i for i, s in enumerate(samples) if s]
    if with_s:
        ax.boxplot([samples[i] for i in with_s], positions=x[with_s], widths=0.5,
                   patch_artist=True, boxprops=dict(facecolor="#cfe0f5", edgecolor="#3b6fb6"),
                   medianprops=dict(color="#1d3f73"), flierprops=dict(markersize=3))
    lo = [means[i] - cis[i][0] if cis[i][0] is not None else 0.0 for i in range(len(arms))]
    hi = [cis[i][1] - means[i] if cis[i][1] is not None else 0.0 for i in range(len(arms))]
    ax.errorbar(x + 0.33, means, yerr=[lo, hi], fmt="o", color="#c25e00", capsize=4,
                label="mean ± 95% CI")
    ax.set_xticks(x, [f"{a}\n(active)" if a == active else a for a in arms])
    ax.set_xlim(0.4, len(arms) + 0.7)
    ax.set_ylabel("latency per batch (ms)")
    _legend_below(ax, dy=-0.22)
    ax.grid(axis="y", alpha=0.3)
    degraded = lat.get("degraded")
    ax.set_title("Latency per arm" + (" (degraded)" if degraded else ""), fontsize=11)
    alt = "Latency distributions per arm: " + "; ".join(
        f"{a} mean {_f(m)} ms" for a, m in zip(arms, means))
    cap = ("Boxes: timed repeats per arm; orange: mean with its 95% confidence interval. "
           f"Method: {lat.get('method') or 'not recorded'}."
           + (f" Degraded: {degraded}." if degraded else ""))
    return _png_b64(fig), alt, cap


def _fig_quality(metrics: Mapping) -> tuple[str, str, str] | None:
    qual = _dict(metrics.get("quality"))
    active = metrics.get("active")
    arms, drops = [], []
    for arm in _arms(metrics):
        if arm == "dense":
            continue
        d = _num(_dict(qual.get(arm)).get("drop_pp"))
        if d is not None:
            arms.append(arm)
            drops.append(d)
    if not arms:
        return None
    gate = _dict(_dict(metrics.get("gates")).get("quality"))
    target = _target_number(gate.get("target"))
    fig = _figure(max(5.0, 1.3 * len(arms) + 2.5), 3.4)
    ax = fig.subplots()
    colors = ["#3b6fb6" if a != active else "#1d3f73" for a in arms]
    bars = ax.bar(arms, drops, color=colors, width=0.55)
    ax.bar_label(bars, labels=[f"{d:.3g}" for d in drops], fontsize=9, padding=2)
    if target is not None:
        ax.axhline(target, color="#b33", ls="--", lw=1.2, label=f"gate: drop ≤ {target:g} pp")
        _legend_below(ax)
    ax.axhline(0, color="#333", lw=0.8)
    ax.set_ylabel("drop vs dense (pp)")
    ax.margins(y=0.2)
    ax.grid(axis="y", alpha=0.3)
    metric = qual.get("metric") or "quality"
    ax.set_title(f"Quality drop vs dense ({metric}); lower is better", fontsize=11)
    alt = f"Bar chart of the {metric} drop vs dense per transform arm: " + "; ".join(
        f"{a} {d:.3g} pp" for a, d in zip(arms, drops))
    cap = (f"Drop of {metric} against the dense model, in percentage points, per "
           "transformed arm (dark bar: the active arm).")
    return _png_b64(fig), alt, cap


def _fig_tiles(metrics: Mapping) -> tuple[str, str, str] | None:
    tiles = _dict(metrics.get("tiles_per_token"))
    lines = _dict(metrics.get("lines_per_token"))
    active = metrics.get("active")
    arms = _arms(metrics)
    t = [(a, _num(tiles.get(a))) for a in arms if _num(tiles.get(a)) is not None]
    ln = [(a, _num(lines.get(a))) for a in arms if _num(lines.get(a)) is not None]
    if not t and not ln:
        return None
    panels = [p for p in (("tiles", t), ("lines", ln)) if p[1]]
    fig = _figure(5.2 * len(panels) + 0.6, 3.4)
    axs = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, vals) in zip(axs, panels):
        names = [a for a, _ in vals]
        ys = [v for _, v in vals]
        colors = ["#1d3f73" if a == active else "#3b6fb6" for a in names]
        bars = ax.bar(names, ys, color=colors, width=0.55)
        ax.bar_label(bars, labels=[_f(v) for v in ys], fontsize=9, padding=2)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        if kind == "tiles":
            of = _num(tiles.get("of"))
            if of is not None:
                ax.axhline(of, color="#777", ls=":", lw=1.2, label=f"all tiles ({of:g})")
                _legend_below(ax)
            tile = tiles.get("tile")
            ax.set_title(f"Weight tiles touched per token (tile = {tile} rows)", fontsize=11)
            ax.set_ylabel("tiles / token")
        else:
            ax.set_title(f"Cache lines per token ({lines.get('line_bytes')} B lines)",
                         fontsize=11)
            ax.set_ylabel("lines / token")
    alt = "Bar chart of tiles touched per token: " + "; ".join(
        f"{a} {_f(v)}" for a, v in t) + (
        ". Cache lines per token: " + "; ".join(f"{a} {_f(v)}" for a, v in ln) if ln else "")
    cap = ("Weight tiles (and cache lines) a token reads under each layout; fewer is better "
           "(dark bar: the active arm).")
    return _png_b64(fig), alt, cap


def _cost(run: _Run) -> dict[str, dict]:
    """``{stage: {"C", "Q", "C_identity", "Q_identity"}}`` from metrics["cost"], else the
    mean over axes of the stats files."""
    out = {}
    cost = _dict(run.metrics.get("cost"))
    for stage in STATS_FILES:
        c = _dict(cost.get(stage))
        vals = {k: _num(c.get(k)) for k in ("C", "Q", "C_identity", "Q_identity")}
        if all(v is None for v in vals.values()):
            st = _dict(run.stats.get(stage))
            per = [s for s in st.values() if isinstance(s, Mapping)]
            if per:
                for k in vals:
                    xs = [_num(s.get(k)) for s in per]
                    xs = [x for x in xs if x is not None]
                    vals[k] = float(np.mean(xs)) if xs else None
        if any(v is not None for v in vals.values()):
            out[stage] = vals
    return out


def _fig_cost(run: _Run) -> tuple[str, str, str] | None:
    cost = _cost(run)
    if not cost:
        return None
    stages = list(cost)
    fig = _figure(10.5, 3.4)
    axs = fig.subplots(1, 2)
    x = np.arange(len(stages))
    for ax, key, better in zip(axs, ("C", "Q"), ("lower", "higher")):
        ident = [cost[s][f"{key}_identity"] for s in stages]
        perm = [cost[s][key] for s in stages]
        b1 = ax.bar(x - 0.18, [v if v is not None else 0 for v in ident], 0.36,
                    color="#b9b9b9", label="identity")
        b2 = ax.bar(x + 0.18, [v if v is not None else 0 for v in perm], 0.36,
                    color="#3b6fb6", label="π")
        ax.bar_label(b1, labels=[_f(v) or "n/m" for v in ident], fontsize=8, padding=2)
        ax.bar_label(b2, labels=[_f(v) or "n/m" for v in perm], fontsize=8, padding=2)
        ax.set_xticks(x, stages)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{key} per stage ({better} is better)", fontsize=11)
        _legend_below(ax)
    alt = "Layout cost C and modularity Q, identity vs fitted order, per stage: " + "; ".join(
        f"{s}: C {_f(cost[s]['C_identity'])}→{_f(cost[s]['C'])}, "
        f"Q {_f(cost[s]['Q_identity'])}→{_f(cost[s]['Q'])}" for s in stages)
    cap = ("Cache-distance cost C (lower is better) and modularity Q (higher is better) of "
           "the shipped order (identity) and the fitted order π, mean over axes, at the "
           "\"permuted\" (π₀ on W) and \"repermuted\" (π₁ on W′) stages.")
    return _png_b64(fig), alt, cap


def _figure_html(name: str, fig: tuple[str, str, str]) -> str:
    b64, alt, cap = fig
    return (f'<figure id="fig-{_e(name)}"><img src="data:image/png;base64,{b64}" '
            f'alt="{_e(alt)}"><figcaption>{_e(cap)}</figcaption></figure>')


# -- HTML sections ------------------------------------------------------------------------
def _gates(metrics: Mapping) -> list[tuple[str, dict]]:
    """``(name, gate)`` with the status normalised: a gate without a value, or with an
    unknown status, is "not measured" (never met)."""
    gates = _dict(metrics.get("gates"))
    fallback = {"l2_hit": metrics.get("l2_hit_pct_reason"), "ept": metrics.get("ept_reason")}
    out = []
    for name in list(GATES) + [g for g in gates if g not in GATES]:
        g = dict(_dict(gates.get(name)))
        status = g.get("status")
        if name not in gates:
            status, g["reason"] = _NA, fallback.get(name) or "no gate result recorded"
        elif status not in ("met", "not met", _NA) or _num(g.get("value")) is None:
            if status in ("met", "not met"):
                g["reason"] = g.get("reason") or "no value recorded"
            status = _NA
        if status == _NA and not g.get("reason"):
            g["reason"] = fallback.get(name) or "no reason recorded"
        g["status"] = status
        out.append((name, g))
    return out


def _section_header(m: Mapping, lock: Mapping | None, gates) -> str:
    run = _dict(m.get("run"))
    verdict = _dict(m.get("verdict"))
    counts = {s: [n for n, g in gates if g["status"] == s] for s in ("met", "not met", _NA)}
    summary = verdict.get("summary") or (
        f"{len(counts['met'])} of {len(gates)} gates met, {len(counts['not met'])} not met, "
        f"{len(counts[_NA])} not measured")
    model = run.get("model") or "unknown model"
    size = run.get("size")
    bits = [f"model <b>{_e(model)}</b>" + (f" ({_e(size)})" if size else ""),
            f"mode <b>{_e(run.get('mode') or 'unknown')}</b>",
            f"active arm <b>{_e(m.get('active') or 'unknown')}</b>"]
    if run.get("seed") is not None:
        bits.append(f"seed {_e(run.get('seed'))}")
    if _num(run.get("tokens")) is not None:
        bits.append(f"{int(run['tokens']):,} tokens timed")
    if _num(run.get("elapsed_s")) is not None:
        bits.append(f"{_e(_f(run.get('elapsed_s')))} s")
    detail = " · ".join(f"{_e(k.replace('_', ' '))}: {_e(', '.join(v) or '—')}"
                        for k, v in (("met", counts["met"]), ("not met", counts["not met"]),
                                     ("not measured", counts[_NA])))
    return (f"<h1>icd run report: {_e(model)}</h1><p class=\"sub\">{' · '.join(bits)}</p>"
            f'<div class="verdict"><b>Verdict:</b> {_e(summary)}<br>'
            f'<span class="small">{detail}</span></div>')


def _section_rollback(m: Mapping) -> str:
    rb = _dict(m.get("rollback"))
    if not rb.get("happened"):
        return ""
    return (f'<div class="notice" id="rollback"><b>Rollback:</b> the run rolled back from arm '
            f"<b>{_e(rb.get('from') or '?')}</b> to <b>{_e(rb.get('to') or '?')}</b>. "
            f"Reason: {_e(rb.get('reason') or 'not recorded')}. The active arm is "
            f"<b>{_e(m.get('active') or '?')}</b>.</div>")


def _section_summary(m: Mapping) -> str:
    lat = _dict(m.get("latency"))
    qual = _dict(m.get("quality"))
    tiles = _dict(m.get("tiles_per_token"))
    lines = _dict(m.get("lines_per_token"))
    sim = _dict(m.get("l2_hit_pct_sim"))
    l2 = _dict(m.get("l2_hit_pct"))
    ept = _dict(m.get("ept_j_per_tok"))
    active = m.get("active")
    metric = qual.get("metric")
    head = ["arm", "latency mean [95% CI] (ms)", "p50 (ms)", "p95 (ms)", "tokens/s",
            f"quality ({metric})" if metric else "quality", "drop (pp)",
            "tiles/token" + (f" (of {_num(tiles.get('of')):g})" if _num(tiles.get("of")) else ""),
            "lines/token", "L2 hit % (simulated)"]
    if l2:
        head.append("L2 hit % (measured)")
    if ept:
        head.append("energy (J/token)")
    head.append("active")
    rows = []
    for arm in _arms(m):
        la = _dict(lat.get(arm))
        qa = _dict(qual.get(arm))
        mean = _f(la.get("mean_ms"))
        ci = la.get("ci95_ms")
        if mean is not None and isinstance(ci, (list, tuple)) and len(ci) == 2 and \
                _f(ci[0]) is not None and _f(ci[1]) is not None:
            mean = f"{mean} [{_f(ci[0])}, {_f(ci[1])}]"
        cells = [_td(arm, "l"), _td(mean), _td(_f(la.get("p50_ms"))), _td(_f(la.get("p95_ms"))),
                 _td(_f(la.get("tokens_per_s"))), _td(_f(qa.get("value"))),
                 _td(_f(qa.get("drop_pp"))), _td(_f(tiles.get(arm))), _td(_f(lines.get(arm))),
                 _td(_f(sim.get(arm)), title="simulated cache, not a measurement")]
        if l2:
            cells.append(_td(_f(l2.get(arm))))
        if ept:
            cells.append(_td(_f(ept.get(arm))))
        cells.append('<td class="l"><span class="tag">active</span></td>' if arm == active
                     else "<td></td>")
        cls = ' class="active"' if arm == active else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    note = []
    if lat.get("degraded"):
        note.append(f"Latency is degraded: {_e(lat.get('degraded'))}.")
    if sim:
        cache = _dict(sim.get("cache"))
        desc = ", ".join(f"{k} {cache[k]}" for k in ("level", "size_bytes", "ways",
                                                      "line_bytes", "source") if k in cache)
        note.append("“L2 hit % (simulated)” is a cache simulation"
                    + (f" ({_e(sim.get('what'))})" if sim.get("what") else "")
                    + (f", cache: {_e(desc)}" if desc else "") + "; it is not a measurement.")
    return ("<h2>Summary</h2>" + _table(head, rows)
            + (f'<p class="small">{" ".join(note)}</p>' if note else ""))


def _section_gates(gates) -> str:
    rows = []
    for name, g in gates:
        status = g["status"]
        cls = {"met": "met", "not met": "notmet"}.get(status, "nm")
        unit = g.get("unit") or ""
        target = g.get("target")
        if _num(target) is not None:
            target = f"{GATE_SENSE.get(name, '')} {_f(target)} {unit}".strip()
        elif target is not None:
            target = f"{target} {unit}".strip()
        value = _f(g.get("value"), signed=True)
        value = None if value is None else f"{value} {unit}".strip()
        rows.append(f"<tr>{_td(name, 'l')}{_td(target or '—')}{_td(value)}"
                    f'<td class="l {cls}">{_e(status)}</td>{_td(g.get("reason") or "", "l")}'
                    "</tr>")
    return ('<h2>Gates</h2><p class="small">A gate whose value is missing is “not measured”, '
            "never passed.</p>"
            + _table(["gate", "target", "value", "status", "reason"], rows, left={0, 3, 4}))


def _not_measured(run: _Run) -> list[tuple[str, str]]:
    m = run.metrics
    out = []
    if m.get("l2_hit_pct") is None:
        out.append(("l2_hit_pct (hardware L2 hit rate)",
                    m.get("l2_hit_pct_reason") or "no reason recorded"))
    if m.get("ept_j_per_tok") is None:
        out.append(("ept_j_per_tok (energy per token)", m.get("ept_reason") or
                    "no reason recorded"))
    lat = _dict(m.get("latency"))
    if not any(_num(_dict(lat.get(a)).get("mean_ms")) is not None for a in _arms(m)):
        out.append(("latency", lat.get("degraded") or "no latency recorded"))
    elif lat.get("degraded"):
        out.append(("latency (degraded, still reported)", lat["degraded"]))
    qual = _dict(m.get("quality"))
    if not any(_dict(qual.get(a)) for a in _arms(m)):
        gate = _dict(_dict(m.get("gates")).get("quality"))
        out.append(("quality", qual.get("reason") or m.get("quality_reason")
                    or gate.get("reason") or "no quality recorded"))
    for key, what in (("tiles_per_token", "tiles touched per token"),
                      ("lines_per_token", "cache lines per token"),
                      ("l2_hit_pct_sim", "simulated L2 hit rate")):
        if m.get(key) is None:
            out.append((f"{key} ({what})", m.get(f"{key}_reason") or "no value recorded"))
    mode = _dict(m.get("run")).get("mode")
    cost = _dict(m.get("cost"))
    if mode == "iterative" and cost.get("repermuted") is None and not run.stats.get(
            "repermuted"):
        out.append(("cost.repermuted", "no re-permutation stats recorded"))
    return out


def _section_fallbacks(m: Mapping) -> str:
    """A loud banner for every transform that did not run as configured."""
    falls = [f for f in m.get("fallbacks") or [] if f] if isinstance(
        m.get("fallbacks"), list) else []
    if not falls:
        return ""
    return ('<div class="problems"><b>Transforms that fell back</b> (what ran is not the '
            "configured co-design; the measured gates read “not met”):<ul>"
            + "".join(f"<li>{_e(f)}</li>" for f in falls) + "</ul></div>")


def _section_effects(m: Mapping) -> str:
    """What the transform bought (vs dense fp32) and what the layout bought (at a fixed
    transform: identity order vs pi0 vs pi0 o pi1)."""
    eff = _dict(m.get("effects"))
    if not eff:
        return ""
    t = _dict(eff.get("transform"))
    rows = [f"<tr>{_td('transform (active arm ' + str(t.get('arm')) + ') vs dense fp32', 'l')}"
            f"{_td(_f(t.get('latency_pct'), True) or _NA)}"
            f"{_td(_f(t.get('quality_drop_pp'), True) or _NA)}{_td('')}{_td('')}</tr>"]
    names = {"identity": "identity order", "before": "π₀ (linear)", "after": "π₀∘π₁ (iterative)"}
    for a, r in _dict(eff.get("layout")).items():
        r = _dict(r)
        rows.append(f"<tr>{_td('layout: ' + names.get(a, a), 'l')}"
                    f"{_td(_f(r.get('latency_ms')) or _NA)}"
                    f"{_td(_f(r.get('drop_pp'), True) or _NA)}"
                    f"{_td(_f(r.get('tiles_per_token')) or '–')}"
                    f"{_td(_f(r.get('p_vs_identity')) or '–')}</tr>")
    return ("<h2>Two effects: the transform, and the layout</h2>"
            '<p class="small">First row: what the transform bought (latency change % and '
            "quality drop pp against dense fp32). Layout rows: the same transform under "
            "each channel order (mean latency ms, quality drop pp, tiles per token where a "
            "kernel skips tiles, paired quality p-value against the identity order). "
            f"{_e(eff.get('layout_verdict') or '')}</p>"
            + _table(["effect", "latency (% vs dense; ms)", "drop pp", "tiles/token",
                     "p vs identity"], rows))


def _section_what_ran(m: Mapping) -> str:
    """The arithmetic each quantised kernel ran, and the host probe behind it."""
    parts = []
    quant = _dict(_dict(m.get("transforms")).get("quant"))
    if quant.get("compute"):
        kinds = ", ".join(f"{n} × {k}" for k, n in sorted(_dict(quant["compute"]).items()))
        parts.append(f"<p>Quantised kernels ran: {_e(kinds)}.</p>")
    probe = _dict(m.get("host_probe"))
    if probe.get("shapes"):
        rows = [f"<tr>{_td(str((r.get('m'), r.get('k'), r.get('n'))), 'l')}"
                f"{_td(_f(r.get('f32_gops')))}{_td(_f(r.get('int8_gops')))}"
                f"{_td(_f(r.get('w8a8_gops')))}</tr>" for r in probe["shapes"]]
        flags = ", ".join(f for f, on in _dict(probe.get("flags")).items() if on) or "none"
        parts.append(
            f"<p>Host probe (GOP/s at the model's GEMM shapes; CPU flags: {_e(flags)}): "
            f"W8A8 layer {_f(probe.get('w8a8_speedup'))}× float32 — "
            + ("fast int8 on this host." if probe.get("fast_int8") else
               "no fast int8 on this host (needs VNNI/AMX).") + "</p>"
            + _table(["(m, k, n)", "float32", "int8 dot", "W8A8 layer"], rows)
            + f'<p class="small">{_e(probe.get("method") or "")}</p>')
    if not parts:
        return ""
    return "<h2>What ran</h2>" + "".join(parts)


def _section_not_measured(run: _Run) -> str:
    items = _not_measured(run)
    if not items:
        return ("<h2>Not measured on this host</h2><p>Every metric was measured.</p>")
    rows = [f"<tr>{_td(k, 'l')}{_td(v, 'l')}</tr>" for k, v in items]
    return ('<h2 id="not-measured">Not measured on this host</h2>'
            + _table(["metric", "reason"], rows, left=2))


def _section_prepost(m: Mapping) -> str:
    """Dense vs the active arm."""
    active = m.get("active")
    if not active or active == "dense":
        return ""
    return _arm_pair_table(m, "dense", active, f"Before / after: dense vs active ({active})",
                           "dense", f"{active} (active)")


def _section_modes(m: Mapping) -> str:
    """Linear (arm ``before``, pi0) vs iterative (arm ``after``, pi0 o pi1)."""
    lat = _dict(m.get("latency"))
    if "before" not in lat or "after" not in lat:
        return ""
    return _arm_pair_table(m, "before", "after", "Linear vs iterative: π₀ vs π₀∘π₁",
                           "linear (before)", "iterative (after)")


def _arm_pair_table(m: Mapping, a_arm: str, b_arm: str, title: str, a_head: str,
                    b_head: str) -> str:
    lat = _dict(m.get("latency"))
    qual = _dict(m.get("quality"))

    def get(arm):
        la, qa = _dict(lat.get(arm)), _dict(qual.get(arm))
        return [("latency mean (ms)", la.get("mean_ms"), True),
                ("latency p95 (ms)", la.get("p95_ms"), True),
                ("tokens/s", la.get("tokens_per_s"), True),
                (f"quality ({qual.get('metric') or 'quality'})", qa.get("value"), False),
                ("tiles/token", _dict(m.get("tiles_per_token")).get(arm), True),
                ("lines/token", _dict(m.get("lines_per_token")).get(arm), True),
                ("L2 hit % (simulated)", _dict(m.get("l2_hit_pct_sim")).get(arm), False),
                ("L2 hit % (measured)", _dict(m.get("l2_hit_pct")).get(arm), False),
                ("energy (J/token)", _dict(m.get("ept_j_per_tok")).get(arm), True)]

    rows = []
    for (label, d, rel), (_, a, _) in zip(get(a_arm), get(b_arm)):
        dv, av = _num(d), _num(a)
        delta = None if dv is None or av is None else av - dv
        pct = None
        if delta is not None and rel and dv != 0:
            pct = f"{_f(100 * delta / dv, signed=True)} %"
        rows.append(f"<tr>{_td(label, 'l')}{_td(_f(dv))}{_td(_f(av))}"
                    f"{_td(_f(delta, signed=True))}{_td(pct if rel else '—')}</tr>")
    return f"<h2>{_e(title)}</h2>" + _table(["metric", a_head, b_head, "Δ", "Δ %"], rows)


def _section_timeline(events: list) -> str:
    evs = [e for e in events if isinstance(e, Mapping)]
    if not evs:
        return '<h2>Stage timeline</h2><p class="small">No events recorded (events.jsonl).</p>'
    starts = [_num(e.get("t_start")) for e in evs]
    ends = [_num(e.get("t_end")) for e in evs]
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
        rows.append(f"<tr>{_td(e.get('stage') or '?', 'l')}{_td(rel)}"
                    f"{_td(None if d is None else f'{d:.3f}')}"
                    f'<td class="l {cls}">{ok_s}</td><td class="bar-cell">{bar}</td>'
                    f"{_td(_short_json(e.get('meta')) if e.get('meta') else '', 'l')}</tr>")
    total = None
    if t0 is not None:
        t_end = max((t for t in ends if t is not None), default=None)
        total = None if t_end is None else t_end - t0
    return ("<h2>Stage timeline</h2>"
            + _table(["stage", "start (s)", "duration (s)", "ok", "", "meta"], rows,
                     left={0, 3, 4, 5})
            + (f'<p class="small">Wall time from the first stage: {total:.2f} s.</p>'
               if total is not None else ""))


def _section_cost_table(run: _Run) -> str:
    rows = []
    for stage in STATS_FILES:
        for axis, s in _dict(run.stats.get(stage)).items():
            if not isinstance(s, Mapping):
                continue
            rows.append(f"<tr>{_td(stage, 'l')}{_td(axis, 'l')}{_td(_f(s.get('C_identity')))}"
                        f"{_td(_f(s.get('C')))}{_td(_f(s.get('Q_identity')))}"
                        f"{_td(_f(s.get('Q')))}{_td(s.get('method') or '', 'l')}"
                        f"{_td(_f(s.get('elapsed_s')))}{_td(s.get('iters'))}"
                        f"{_td('yes' if s.get('timed_out') else 'no')}</tr>")
    if not rows:
        return ""
    return ("<h3>Solver stats per axis</h3>"
            + _table(["stage", "axis", "C identity", "C π", "Q identity", "Q π", "method",
                      "time (s)", "iters", "timed out"], rows, left=2))


def _section_details(run: _Run) -> str:
    m = run.metrics
    rows = []
    r = _dict(m.get("run"))
    for k in ("config_hash", "env_hash"):
        if r.get(k):
            rows.append(f"<tr>{_td(k, 'l')}{_td(r[k], 'l')}</tr>")
    env = _dict(_dict(run.lock).get("env"))
    for k, v in env.items():
        v = _short_json(v) if isinstance(v, (dict, list)) else "—" if v is None else v
        rows.append(f"<tr>{_td('env.' + str(k), 'l')}{_td(v, 'l')}</tr>")
    for k, v in _dict(m.get("transforms")).items():
        rows.append(f"<tr>{_td('transform.' + str(k), 'l')}{_td(_short_json(v), 'l')}</tr>")
    ev = _dict(m.get("events"))
    if ev:
        rows.append(f"<tr>{_td('events', 'l')}{_td(_short_json(ev), 'l')}</tr>")
    if run.perm_active:
        rows.append(f"<tr>{_td('perm_active.meta', 'l')}"
                    f"{_td(_short_json(run.perm_active[1]), 'l')}</tr>")
    if not rows:
        return ""
    return "<h2>Run details</h2>" + _table(["key", "value"], rows, left=2)


def _page(title: str, body: str) -> bytes:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}"
            "</body></html>\n").encode()


# -- public API ---------------------------------------------------------------------------
def build(run_dir: str) -> dict:
    """Write ``report.html`` and ``report.csv`` into ``run_dir`` (atomically) and return
    ``{"html": path, "csv": path, "figures": [names], "elapsed_s": float}``.

    ``ArtifactError`` (naming the file) if ``metrics.json`` is missing or corrupt; other
    artefacts are optional.
    """
    t0 = time.perf_counter()
    run_dir = os.fspath(run_dir)
    run = _Run(run_dir)
    m = run.metrics
    gates = _gates(m)
    figs: dict[str, tuple[str, str, str]] = {}
    for name, make in (("w_heatmaps", lambda: _fig_heatmaps(run)),
                       ("latency", lambda: _fig_latency(m)),
                       ("quality", lambda: _fig_quality(m)),
                       ("tiles", lambda: _fig_tiles(m)),
                       ("cost", lambda: _fig_cost(run))):
        fig = make()
        if fig is not None:
            figs[name] = fig
    titles = {"w_heatmaps": "Co-access before / after permutation",
              "latency": "Latency distributions", "quality": "Quality against transform arm",
              "tiles": "Tiles touched per token", "cost": "Layout cost C and modularity Q"}
    missing_fig = {"w_heatmaps": "no readable W.npz", "latency": "latency not measured",
                   "quality": "quality not measured", "tiles": "tiles per token not measured",
                   "cost": "no cost stats recorded"}
    fig_html = []
    for name in titles:
        fig_html.append(f"<h3>{_e(titles[name])}</h3>")
        if name in figs:
            fig_html.append(_figure_html(name, figs[name]))
        else:
            fig_html.append(f'<p class="small">{_NA}: {_e(missing_fig[name])}.</p>')
        if name == "cost":
            fig_html.append(_section_cost_table(run))
    warnings = [w for w in m.get("warnings") or [] if w] if isinstance(
        m.get("warnings"), list) else []
    body = [_section_header(m, run.lock, gates), _section_rollback(m)]
    if run.problems:
        body.append('<div class="problems"><b>Artefact problems</b> (shown as not measured):'
                    "<ul>" + "".join(f"<li>{_e(p)}</li>" for p in run.problems)
                    + "</ul></div>")
    body.append(_section_fallbacks(m))
    if warnings:
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings)
                    + "</ul>")
    body += [_section_summary(m), _section_effects(m), _section_gates(gates),
             _section_what_ran(m), _section_not_measured(run),
             "<h2>Figures</h2>", *fig_html, _section_prepost(m), _section_modes(m),
             _section_timeline(run.events), _section_details(run),
             f'<p class="small">Generated by icd_jax.runtime.report from {_e(run_dir)} in '
             f"{time.perf_counter() - t0:.2f} s.</p>"]
    model = _dict(m.get("run")).get("model") or "run"
    html_path = os.path.join(run_dir, artifacts.FILES["html"])
    csv_path = os.path.join(run_dir, artifacts.FILES["csv"])
    artifacts.write_bytes(csv_path, _csv_bytes(csv_rows(m)))
    artifacts.write_bytes(html_path, _page(f"icd report: {model}", "".join(body)))
    return {"html": html_path, "csv": csv_path, "figures": list(figs),
            "elapsed_s": time.perf_counter() - t0}


def _fig_paired(blob: Mapping, order: list[str]) -> tuple[str, str, str] | None:
    samples = _dict(blob.get("samples_ms"))
    data = {}
    for arm in order + [a for a in samples if a not in order]:
        s = samples.get(arm)
        if isinstance(s, list):
            vals = [_num(v) for v in s]
            vals = [v for v in vals if v is not None]
            if vals:
                data[arm] = vals
    if not data:
        return None
    arms = list(data)
    paired = len(arms) == 2 and len(data[arms[0]]) == len(data[arms[1]])
    fig = _figure(11.0 if paired else 6.0, 3.8)
    axs = fig.subplots(1, 2 if paired else 1, squeeze=False)[0]
    ax = axs[0]
    x = np.arange(len(arms))
    def jitter(n):
        return (np.arange(n) % 7 - 3) * 0.012

    if paired:
        a, b = np.asarray(data[arms[0]]), np.asarray(data[arms[1]])
        ja = jitter(a.size)
        for xj, ya, yb in zip(ja, a, b):
            ax.plot([xj, 1 + xj], [ya, yb], color="#999", lw=0.8, alpha=0.6)
    for i, arm in enumerate(arms):
        ys = np.asarray(data[arm])
        ax.plot(i + jitter(ys.size), ys, "o", ms=4, color="#3b6fb6", alpha=0.8)
        ax.errorbar(i + 0.18, ys.mean(), yerr=1.96 * ys.std(ddof=1) / np.sqrt(ys.size)
                    if ys.size > 1 else 0, fmt="s", color="#c25e00", capsize=4)
    ax.set_xticks(x, arms)
    ax.set_xlim(-0.5, len(arms) - 0.5)
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency samples" + (" (lines join pairs)" if paired else ""), fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    if paired:
        diff = b - a
        ax2 = axs[1]
        ax2.hist(diff, bins=min(30, max(5, diff.size // 2)), color="#3b6fb6", alpha=0.85)
        ax2.axvline(0, color="#333", lw=1)
        ax2.axvline(float(diff.mean()), color="#c25e00", ls="--", lw=1.5,
                    label=f"mean {diff.mean():+.3g} ms")
        ax2.set_xlabel(f"{arms[1]} − {arms[0]} (ms)")
        ax2.set_ylabel("pairs")
        ax2.set_title("Paired differences", fontsize=11)
        _legend_below(ax2, dy=-0.22)
    alt = "Paired latency samples: " + "; ".join(
        f"{k} n={len(v)} mean {_f(float(np.mean(v)))} ms" for k, v in data.items())
    cap = ("Latency samples per arm (blue), mean with 95% CI (orange)"
           + ("; right: histogram of the per-pair differences." if paired else "."))
    return _png_b64(fig), alt, cap


def _summary_value(v) -> str | None:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) is not None for x in v):
        return f"[{_f(v[0])}, {_f(v[1])}]"
    if isinstance(v, (dict, list)):
        return _short_json(v)
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    return _f(v)


def compare(out_dir: str, compare: dict) -> dict:
    """Write ``compare.html`` (into ``out_dir``) from a ``compare.json``-shaped dict and
    return ``{"html": path, "figures": [names], "elapsed_s": float}``."""
    t0 = time.perf_counter()
    if not isinstance(compare, Mapping):
        raise ArtifactError(f"{artifacts.FILES['compare']}: expected an object, got "
                            f"{type(compare).__name__}")
    arms = _dict(compare.get("arms"))
    paired = _dict(compare.get("paired"))
    order = list(arms)
    for p in paired.values():
        for k in ("a", "b"):
            a = _dict(p).get(k)
            if isinstance(a, str) and a not in order:
                order.append(a)
    verdict = compare.get("verdict")
    verdict = verdict.get("summary") if isinstance(verdict, Mapping) else verdict
    body = [f"<h1>icd pair: {_e(' vs '.join(order) or 'comparison')}</h1>",
            f'<div class="verdict"><b>Verdict:</b> {_e(verdict or "not recorded")}</div>']
    # side-by-side arm summaries
    keys: list[str] = []
    for s in arms.values():
        for k, v in _dict(s).items():
            if k not in keys and k != "arm" and not (isinstance(v, list) and len(v) > 2):
                keys.append(k)
    rows = []
    if "mean_ms" in keys and "ci95_ms" in keys:
        cells = []
        for arm in arms:
            s = _dict(arms[arm])
            mean, ci = _f(s.get("mean_ms")), _summary_value(s.get("ci95_ms"))
            cells.append(_td(None if mean is None else f"{mean} {ci or ''}".strip()))
        rows.append(f"<tr>{_td('latency mean [95% CI] (ms)', 'l')}{''.join(cells)}</tr>")
        keys = [k for k in keys if k not in ("mean_ms", "ci95_ms")]
    for k in keys:
        cells = "".join(_td(_summary_value(_dict(arms[a]).get(k))) for a in arms)
        rows.append(f"<tr>{_td(k, 'l')}{cells}</tr>")
    body.append("<h2>Arms side by side</h2>")
    body.append(_table(["metric", *arms], rows) if arms else
                f'<p class="small">{_NA}: no arm summaries.</p>')
    # paired tests
    prow = []
    for metric, p in paired.items():
        p = _dict(p)
        ci = p.get("ci95")
        ci_s = _summary_value(ci) if isinstance(ci, (list, tuple)) else None
        pv, pt = _num(p.get("p_value")), _num(p.get("p_value_t"))
        rel = _f(p.get("rel_diff_pct"), signed=True)
        prow.append(f"<tr>{_td(metric, 'l')}{_td(p.get('a'), 'l')}{_td(p.get('b'), 'l')}"
                    f"{_td(_f(p.get('mean_diff'), signed=True))}{_td(ci_s)}"
                    f"{_td(None if rel is None else rel + ' %')}"
                    f"{_td(None if pv is None else f'{pv:.3g}')}"
                    f"{_td(None if pt is None else f'{pt:.3g}')}{_td(p.get('test'), 'l')}"
                    f"{_td(p.get('n'))}</tr>")
    body.append("<h2>Paired tests</h2>")
    body.append(_table(["metric", "a", "b", "mean diff (b − a)", "95% CI", "diff % of a",
                        "p value", "p value (t)", "test", "n"], prow, left={0, 1, 2, 8})
                if prow else f'<p class="small">{_NA}: no paired tests.</p>')
    figs = {}
    fig = _fig_paired(compare, order)
    body.append("<h2>Paired latency samples</h2>")
    if fig is not None:
        figs["paired_latency"] = fig
        body.append(_figure_html("paired_latency", fig))
    else:
        body.append(f'<p class="small">{_NA}: no latency samples (samples_ms).</p>')
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, artifacts.FILES["compare_html"])
    artifacts.write_bytes(path, _page("icd pair comparison", "".join(body)))
    return {"html": path, "figures": list(figs), "elapsed_s": time.perf_counter() - t0}
