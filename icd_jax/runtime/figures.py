"""The report's figures, drawn with matplotlib and returned as ``(png_base64, alt,
caption)``.

Figures are drawn on ``matplotlib.figure.Figure`` objects with an explicit Agg canvas:
pyplot and its global state are never touched, so the report can be built inside any
process. Co-access heatmaps are block-summed to at most ``n_max`` x ``n_max`` cells
straight from the sparse COO entries (O(nnz)), so big runs stay fast.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping

import numpy as np

from icd_jax.runtime.views import (
    RunView,
    arm_names,
    as_dict,
    cost_by_stage,
    fmt,
    num,
    target_number,
)

#: Resolution of every figure (dots per inch).
DPI = 100
#: Co-access axes drawn as heatmaps (the first ones in ``W.npz`` order).
HEATMAP_AXES = 4

#: A drawn figure: ``(png_base64, alt_text, caption)``.
Fig = tuple[str, str, str]
#: The report's figures in page order: ``(name, title, why it is missing)``.
REPORT_FIGURES = (
    ("w_heatmaps", "Co-access before / after permutation", "no readable W.npz"),
    ("latency", "Latency distributions", "latency not measured"),
    ("quality", "Quality against transform arm", "quality not measured"),
    ("tiles", "Tiles touched per token", "tiles per token not measured"),
    ("cost", "Layout cost C and modularity Q", "no cost stats recorded"),
)


def new_figure(w_in: float, h_in: float, dpi: int = DPI):
    """A blank constrained-layout figure on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def legend_below(ax, dy: float = -0.16) -> None:
    """A legend under the axes (``dy`` in axes heights), where it cannot cover bars or
    their labels."""
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, dy), ncol=3,
              frameon=False)


def png_b64(fig) -> str:
    """``fig`` as base64 PNG text (the figure is cleared)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def blocksum(w, order, n_max: int) -> np.ndarray:
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


def fig_heatmaps(run: RunView, n_max: int, axes: int = HEATMAP_AXES) -> Fig | None:
    """W in shipped order, W by pi0 and W' by pi1 for the first ``axes`` axes, block-summed
    to at most ``n_max`` cells a side; None without a readable ``W.npz``."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    if not run.w:
        return None
    names = list(run.w)[:axes]
    pb = run.perm_before[0] if run.perm_before else {}
    pa = run.perm_after[0] if run.perm_after else {}
    wa = run.w_after or {}
    show_after = any(n in wa for n in names)
    ncol = 3 if show_after else 2
    fig = new_figure(4.0 * ncol + 0.8, 3.7 * len(names) + 0.3)
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
        grids = [None if g is None else blocksum(g, o, n_max) for _, g, o, _ in panels]
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
    return png_b64(fig), alt, cap


def fig_latency(metrics: Mapping) -> Fig | None:
    """Box plots of each arm's timed calls with the mean and its 95% CI."""
    lat = as_dict(metrics.get("latency"))
    active = metrics.get("active")
    arms, samples, means, cis = [], [], [], []
    for arm in arm_names(metrics):
        la = as_dict(lat.get(arm))
        s = [v for v in (num(x) for x in la.get("samples_ms") or []) if v is not None] \
            if isinstance(la.get("samples_ms"), list) else []
        m = num(la.get("mean_ms"))
        if not s and m is None:
            continue
        ci = la.get("ci95_ms")
        ci = (tuple(num(c) for c in ci) if isinstance(ci, (list, tuple)) and len(ci) == 2
              else (None, None))
        arms.append(arm)
        samples.append(s)
        means.append(m if m is not None else float(np.mean(s)))
        cis.append(ci)
    if not arms:
        return None
    fig = new_figure(max(5.5, 1.5 * len(arms) + 2.5), 3.8)
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
    legend_below(ax, dy=-0.22)
    ax.grid(axis="y", alpha=0.3)
    degraded = lat.get("degraded")
    ax.set_title("Latency per arm" + (" (degraded)" if degraded else ""), fontsize=11)
    alt = "Latency distributions per arm: " + "; ".join(
        f"{a} mean {fmt(m)} ms" for a, m in zip(arms, means))
    cap = ("Boxes: timed repeats per arm; orange: mean with its 95% confidence interval. "
           f"Method: {lat.get('method') or 'not recorded'}."
           + (f" Degraded: {degraded}." if degraded else ""))
    return png_b64(fig), alt, cap


def fig_quality(metrics: Mapping) -> Fig | None:
    """Bars of each transformed arm's quality drop vs dense, with the gate's target."""
    qual = as_dict(metrics.get("quality"))
    active = metrics.get("active")
    arms, drops = [], []
    for arm in arm_names(metrics):
        if arm == "dense":
            continue
        d = num(as_dict(qual.get(arm)).get("drop_pp"))
        if d is not None:
            arms.append(arm)
            drops.append(d)
    if not arms:
        return None
    gate = as_dict(as_dict(metrics.get("gates")).get("quality"))
    target = target_number(gate.get("target"))
    fig = new_figure(max(5.0, 1.3 * len(arms) + 2.5), 3.4)
    ax = fig.subplots()
    colors = ["#3b6fb6" if a != active else "#1d3f73" for a in arms]
    bars = ax.bar(arms, drops, color=colors, width=0.55)
    ax.bar_label(bars, labels=[f"{d:.3g}" for d in drops], fontsize=9, padding=2)
    if target is not None:
        ax.axhline(target, color="#b33", ls="--", lw=1.2, label=f"gate: drop ≤ {target:g} pp")
        legend_below(ax)
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
    return png_b64(fig), alt, cap


def fig_tiles(metrics: Mapping) -> Fig | None:
    """Bars of the tiles (and cache lines) each arm reads per token."""
    tiles = as_dict(metrics.get("tiles_per_token"))
    lines = as_dict(metrics.get("lines_per_token"))
    active = metrics.get("active")
    arms = arm_names(metrics)
    t = [(a, num(tiles.get(a))) for a in arms if num(tiles.get(a)) is not None]
    ln = [(a, num(lines.get(a))) for a in arms if num(lines.get(a)) is not None]
    if not t and not ln:
        return None
    panels = [p for p in (("tiles", t), ("lines", ln)) if p[1]]
    fig = new_figure(5.2 * len(panels) + 0.6, 3.4)
    axs = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, vals) in zip(axs, panels):
        names = [a for a, _ in vals]
        ys = [v for _, v in vals]
        colors = ["#1d3f73" if a == active else "#3b6fb6" for a in names]
        bars = ax.bar(names, ys, color=colors, width=0.55)
        ax.bar_label(bars, labels=[fmt(v) for v in ys], fontsize=9, padding=2)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        if kind == "tiles":
            of = num(tiles.get("of"))
            if of is not None:
                ax.axhline(of, color="#777", ls=":", lw=1.2, label=f"all tiles ({of:g})")
                legend_below(ax)
            tile = tiles.get("tile")
            ax.set_title(f"Weight tiles touched per token (tile = {tile} rows)", fontsize=11)
            ax.set_ylabel("tiles / token")
        else:
            ax.set_title(f"Cache lines per token ({lines.get('line_bytes')} B lines)",
                         fontsize=11)
            ax.set_ylabel("lines / token")
    alt = "Bar chart of tiles touched per token: " + "; ".join(
        f"{a} {fmt(v)}" for a, v in t) + (
        ". Cache lines per token: " + "; ".join(f"{a} {fmt(v)}" for a, v in ln) if ln else "")
    cap = ("Weight tiles (and cache lines) a token reads under each layout; fewer is better "
           "(dark bar: the active arm).")
    return png_b64(fig), alt, cap



def fig_cost(run: RunView) -> Fig | None:
    """C and Q of the identity order vs the fitted order, per cost stage."""
    cost = cost_by_stage(run)
    if not cost:
        return None
    stages = list(cost)
    fig = new_figure(10.5, 3.4)
    axs = fig.subplots(1, 2)
    x = np.arange(len(stages))
    for ax, key, better in zip(axs, ("C", "Q"), ("lower", "higher")):
        ident = [cost[s][f"{key}_identity"] for s in stages]
        perm = [cost[s][key] for s in stages]
        b1 = ax.bar(x - 0.18, [v if v is not None else 0 for v in ident], 0.36,
                    color="#b9b9b9", label="identity")
        b2 = ax.bar(x + 0.18, [v if v is not None else 0 for v in perm], 0.36,
                    color="#3b6fb6", label="π")
        ax.bar_label(b1, labels=[fmt(v) or "n/m" for v in ident], fontsize=8, padding=2)
        ax.bar_label(b2, labels=[fmt(v) or "n/m" for v in perm], fontsize=8, padding=2)
        ax.set_xticks(x, stages)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{key} per stage ({better} is better)", fontsize=11)
        legend_below(ax)
    alt = "Layout cost C and modularity Q, identity vs fitted order, per stage: " + "; ".join(
        f"{s}: C {fmt(cost[s]['C_identity'])}→{fmt(cost[s]['C'])}, "
        f"Q {fmt(cost[s]['Q_identity'])}→{fmt(cost[s]['Q'])}" for s in stages)
    cap = ("Cache-distance cost C (lower is better) and modularity Q (higher is better) of "
           "the shipped order (identity) and the fitted order π, mean over axes, at the "
           "\"permuted\" (π₀ on W) and \"repermuted\" (π₁ on W′) stages.")
    return png_b64(fig), alt, cap


def fig_paired(blob: Mapping, order: list[str]) -> Fig | None:
    """``compare.json``'s latency samples per arm (pairs joined) and the paired
    differences."""
    samples = as_dict(blob.get("samples_ms"))
    data = {}
    for arm in order + [a for a in samples if a not in order]:
        s = samples.get(arm)
        if isinstance(s, list):
            vals = [num(v) for v in s]
            vals = [v for v in vals if v is not None]
            if vals:
                data[arm] = vals
    if not data:
        return None
    arms = list(data)
    paired = len(arms) == 2 and len(data[arms[0]]) == len(data[arms[1]])
    fig = new_figure(11.0 if paired else 6.0, 3.8)
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
        legend_below(ax2, dy=-0.22)
    alt = "Paired latency samples: " + "; ".join(
        f"{k} n={len(v)} mean {fmt(float(np.mean(v)))} ms" for k, v in data.items())
    cap = ("Latency samples per arm (blue), mean with 95% CI (orange)"
           + ("; right: histogram of the per-pair differences." if paired else "."))
    return png_b64(fig), alt, cap



def report_figures(run: RunView, n_max: int, axes: int = HEATMAP_AXES) -> dict[str, Fig]:
    """The figures of ``REPORT_FIGURES`` that the run has data for, by name."""
    draw = {"w_heatmaps": lambda: fig_heatmaps(run, n_max, axes),
            "latency": lambda: fig_latency(run.m), "quality": lambda: fig_quality(run.m),
            "tiles": lambda: fig_tiles(run.m), "cost": lambda: fig_cost(run)}
    figs = {name: draw[name]() for name, _, _ in REPORT_FIGURES}
    return {name: fig for name, fig in figs.items() if fig is not None}
