"""Plots for the HTML pages (drift report, run dashboard, comparison): matplotlib figures
rendered to inline SVG.

matplotlib rather than Vega-Lite: it renders offline inside the process that writes the page,
with no JavaScript runtime to ship or run, and its SVG opens from disk in any browser (see
docs/reports.md). Figures are built on `matplotlib.figure.Figure` (no pyplot, so no global
backend or figure registry), keep their text as text (`svg.fonttype: none`: selectable, and it
scales with the page), treat `$` as a dollar (mathtext off: labels may name anything), and carry
a fixed hash salt and no date, so the same data gives the same bytes.

What every plot here keeps to:
- an axis never collapses to one value (`span`: a minimum span around the data);
- panels of one kind share one scale, stated on the page, so equal heights are equal changes,
  and where a noise band or alert threshold exists it is drawn, so noise does not look like a cliff;
- labels do not overlap: integer tick locators with few bins, one legend outside the axes,
  long titles shortened, figure height growing with the number of rows;
- figures are FIG_W inches wide (about 1040 px), inside a 1280-pixel window's page column.
"""
from __future__ import annotations

import io
import math

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

FIG_W = 10.8  # inches; SVG sizes are in points, which a browser draws at 96/72 px each
STYLE = {
    "svg.fonttype": "none", "svg.hashsalt": "selftrain", "text.parse_math": False,
    "font.family": "sans-serif", "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e6e6e6",
    "grid.linewidth": 0.6, "axes.axisbelow": True,
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22"]
LEVEL_COLORS = {"alert": "#d62728", "watch": "#f0a020", "improved": "#2a7de1"}
BAND = "#d9d9d9"
TITLE_CHARS = 44


def short(text: str, limit: int = TITLE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def span(lo: float, hi: float, min_span: float, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """An axis range holding [lo, hi], at least `min_span` wide (never a single value), moved
    inside `bounds` where it can be."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    if bounds is not None:
        b_lo, b_hi = bounds
        if hi - lo >= b_hi - b_lo:
            return b_lo, b_hi
        if lo < b_lo:
            lo, hi = b_lo, b_lo + (hi - lo)
        if hi > b_hi:
            lo, hi = b_hi - (hi - lo), b_hi
    return lo, hi


def to_svg(fig: Figure) -> str:
    """The figure as an inline <svg> element (no XML prolog), text escaped by matplotlib."""
    buf = io.StringIO()
    with rc_context(STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return "<div class='fig'>" + text[text.index("<svg"):] + "</div>"


def _figure(height: float) -> Figure:
    with rc_context(STYLE):
        return Figure(figsize=(FIG_W, max(height, 1.6)), layout="constrained")


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def grid(panels: list[dict], *, ylabel: str, min_span: float, bounds: tuple[float, float] | None = None,
         band_label: str | None = None, ncols: int = 3, xlabel: str = "generation", percent: bool = False) -> str:
    """Small multiples over generations, one scale for all of them.

    Each panel: {"title", "series": {name: [(x, y, lo, hi), ...]}, "band": (lo, hi) or None,
    "centre": y or None, "marks": [(x, level), ...]}. Every panel spans the same height of the y
    axis (the widest any panel needs, at least `min_span`), centred on its "centre" (or on its
    data), so equal heights mean equal changes everywhere. The band is shaded (what counts as
    noise, or what cannot alert); marks are alert/watch/improved triangles along the top."""
    panels = [p for p in panels if any(_finite(pt[1]) for s in p["series"].values() for pt in s)]
    if not panels:
        return ""
    limits = shared_limits(panels, min_span, bounds)
    chars = int(FIG_W / ncols * 72 / 5.6)  # what fits one panel's width at the title's size
    width_share = min(1.0, len(panels) / ncols)  # a short grid keeps the panel width of a full one
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    with rc_context(STYLE):
        fig = Figure(figsize=(FIG_W * max(width_share, 0.45), 0.5 + 1.95 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        names = list(dict.fromkeys(n for p in panels for n in p["series"]))
        color = {n: COLORS[i % len(COLORS)] for i, n in enumerate(names)}
        xs = [pt[0] for p in panels for s in p["series"].values() for pt in s]
        x_lo, x_hi = span(min(xs) - 0.3, max(xs) + 0.3, 1.6)
        levels_seen: set[str] = set()
        for i, ax in enumerate(axes.flat):
            if i >= len(panels):
                ax.set_visible(False)
                continue
            p, (y_lo, y_hi) = panels[i], limits[i]
            if p.get("band"):
                ax.axhspan(*p["band"], color=BAND, alpha=0.6, lw=0, zorder=0)
            dodge = 0.08 if len(p["series"]) > 1 else 0.0
            for j, (name, pts) in enumerate(p["series"].items()):
                off = (j - (len(p["series"]) - 1) / 2) * dodge
                pts = [pt for pt in pts if _finite(pt[1])]
                if not pts:
                    continue
                x = [pt[0] + off for pt in pts]
                y = [pt[1] for pt in pts]
                ax.plot(x, y, "-o", color=color[name], ms=3.2, lw=1.3, zorder=3)
                ci = [(xx, yy, pt[2], pt[3]) for xx, yy, pt in zip(x, y, pts) if _finite(pt[2]) and _finite(pt[3])]
                if ci:
                    ax.errorbar([c[0] for c in ci], [c[1] for c in ci],
                                yerr=[[c[1] - c[2] for c in ci], [c[3] - c[1] for c in ci]],
                                fmt="none", ecolor=color[name], elinewidth=0.9, capsize=2, alpha=0.75, zorder=2)
            top = y_hi - 0.05 * (y_hi - y_lo)
            for x, level in p.get("marks") or []:
                ax.plot([x], [top], marker="v", ms=7, color=LEVEL_COLORS.get(level, "#555"), mec="black",
                        mew=0.5, zorder=4, clip_on=False)
                levels_seen.add(level)
            ax.set_ylim(y_lo, y_hi)
            ax.set_xlim(x_lo, x_hi)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5, min_n_ticks=1))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
            if percent:
                ax.yaxis.set_major_formatter(lambda v, _: f"{v:+.0f}%")
            ax.set_title("\n".join(short(line, chars) for line in str(p["title"]).split("\n")), loc="left")
            if i % ncols == 0:
                ax.set_ylabel(ylabel)
            if i >= len(panels) - ncols:
                ax.set_xlabel(xlabel)
        handles = [Line2D([], [], color=color[n], marker="o", ms=4, lw=1.3, label=short(n, 30)) for n in names]
        if any(p.get("band") for p in panels) and band_label:
            handles.append(Patch(color=BAND, alpha=0.6, label=band_label))
        handles += [Line2D([], [], ls="none", marker="v", ms=7, color=LEVEL_COLORS[lv], mec="black", mew=0.5,
                           label=lv) for lv in ("alert", "watch", "improved") if lv in levels_seen]
        if handles:
            fig.legend(handles=handles, loc="outside upper left", ncols=min(len(handles), 5), frameon=False)
        return to_svg(fig)


def shared_limits(panels: list[dict], min_span: float,
                  bounds: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    """The y range of each panel of a grid: all of one height (the widest any panel's data, CIs
    and band need, at least `min_span`, plus a margin), each centred on its "centre" or its data,
    and moved inside `bounds` where they fit."""
    need, ranges = min_span, []
    for p in panels:
        vals = [v for s in p["series"].values() for pt in s for v in pt[1:] if _finite(v)]
        vals += [v for v in (p.get("band") or ()) if _finite(v)]
        c = p.get("centre")
        if not vals:
            vals = [c if _finite(c) else 0.0]
        if _finite(c):
            half = max(abs(v - c) for v in vals)
            lo, hi = c - half, c + half
        else:
            lo, hi = min(vals), max(vals)
        ranges.append((lo, hi))
        need = max(need, hi - lo)
    height = need * 1.12
    return [span((lo + hi) / 2 - height / 2, (lo + hi) / 2 + height / 2, height, bounds) for lo, hi in ranges]


def forest(rows: list[dict], *, xlabel: str, threshold: float | None = None,
           threshold_label: str | None = None, min_span: float = 0.5) -> str:
    """One row per label: a point with its 95% CI, coloured by level, with dashed lines at
    ±threshold. rows: [{"label", "x", "lo", "hi", "level"}]; labels are y tick labels, one per
    row, so they cannot pile up."""
    rows = [r for r in rows if _finite(r.get("x"))]
    if not rows:
        return ""
    vals = [v for r in rows for v in (r["x"], r.get("lo"), r.get("hi")) if _finite(v)] + [0.0]
    if threshold:
        vals += [-threshold * 1.15, threshold * 1.15]
    lo, hi = span(min(vals), max(vals), min_span)
    pad = 0.05 * (hi - lo)
    with rc_context(STYLE):
        fig = _figure(0.9 + 0.26 * len(rows))
        ax = fig.subplots()
        ys = list(range(len(rows)))[::-1]
        for y, r in zip(ys, rows):
            c = LEVEL_COLORS.get(r.get("level"), "#1f77b4")
            if _finite(r.get("lo")) and _finite(r.get("hi")):
                ax.plot([r["lo"], r["hi"]], [y, y], color=c, lw=1.4, alpha=0.8)
            ax.plot([r["x"]], [y], "o", color=c, ms=5)
        ax.axvline(0, color="#444", lw=0.8)
        handles = [Line2D([], [], color="#1f77b4", marker="o", lw=1.4, label="shift, 95% CI")]
        if threshold:
            for t in (-threshold, threshold):
                ax.axvline(t, color="#d62728", ls="--", lw=0.9)
            handles.append(Line2D([], [], color="#d62728", ls="--", lw=0.9, label=threshold_label or "threshold"))
        handles += [Line2D([], [], ls="none", marker="o", color=LEVEL_COLORS[lv], label=lv)
                    for lv in ("alert", "watch", "improved") if any(r.get("level") == lv for r in rows)]
        ax.set_yticks(ys, [short(r["label"], 40) for r in rows])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8))
        ax.set_xlabel(xlabel)
        fig.legend(handles=handles, loc="outside upper left", ncols=len(handles), frameon=False)
        return to_svg(fig)


def drift_vs_null(points: list[dict], *, threshold: float | None, ylabel: str) -> str:
    """A statistic per generation against its permutation null: bars to the null's 95th
    percentile (what chance alone reaches), the statistic as a line, the threshold dashed.
    points: [{"x", "value", "null95"}]. The axis starts at 0 and reaches past the threshold."""
    points = [p for p in points if _finite(p.get("value"))]
    if not points:
        return ""
    vals = [p["value"] for p in points] + [p["null95"] for p in points if _finite(p.get("null95"))]
    if threshold:
        vals.append(threshold)
    hi = max(max(vals) * 1.15, 1.0)
    with rc_context(STYLE):
        fig = Figure(figsize=(FIG_W * 0.6, 2.8), layout="constrained")
        ax = fig.subplots()
        nulls = [(p["x"], p["null95"]) for p in points if _finite(p.get("null95"))]
        handles = [Line2D([], [], color=COLORS[0], marker="o", label="observed")]
        if nulls:
            ax.bar([n[0] for n in nulls], [n[1] for n in nulls], width=0.55, color=BAND, zorder=1)
            handles.append(Patch(color=BAND, label="swap-null 95th percentile (noise)"))
        ax.plot([p["x"] for p in points], [p["value"] for p in points], "-o", color=COLORS[0], ms=4, zorder=3)
        if threshold:
            ax.axhline(threshold, color="#d62728", ls="--", lw=0.9)
            handles.append(Line2D([], [], color="#d62728", ls="--", label=f"watch threshold ({threshold:g})"))
        xs = [p["x"] for p in points]
        ax.set_xlim(*span(min(xs) - 0.6, max(xs) + 0.6, 2.0))
        ax.set_ylim(0, hi)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6, min_n_ticks=1))
        ax.set_xlabel("generation")
        ax.set_ylabel(ylabel)
        fig.legend(handles=handles, loc="outside upper left", ncols=len(handles), frameon=False)
        return to_svg(fig)


def stacked_bars(rows: list[str], segments: dict[str, list[float]], *, xlabel: str) -> str:
    """Horizontal stacked bars, one per row (a generation), one colour per segment (a stage)."""
    if not rows or not any(v for s in segments.values() for v in s):
        return ""
    with rc_context(STYLE):
        fig = _figure(1.0 + 0.24 * len(rows))
        ax = fig.subplots()
        ys = list(range(len(rows)))[::-1]
        left = [0.0] * len(rows)
        handles = []
        for i, (name, vals) in enumerate(segments.items()):
            vals = [v or 0.0 for v in vals]
            c = COLORS[i % len(COLORS)]
            ax.barh(ys, vals, left=left, color=c, height=0.7)
            left = [a + b for a, b in zip(left, vals)]
            handles.append(Patch(color=c, label=name))
        ax.set_yticks(ys, rows)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_xlim(0, max(max(left) * 1.05, 1e-3))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8))
        ax.set_xlabel(xlabel)
        fig.legend(handles=handles, loc="outside upper left", ncols=min(len(handles), 8), frameon=False)
        return to_svg(fig)


def step_lines(panels: list[dict], *, xlabel: str = "training step") -> str:
    """Side-by-side line panels over training steps. panels: [{"title", "series": {name: [y]},
    "ylim": (lo, hi) or None}]; a panel without a fixed ylim spans its data and 0."""
    panels = [p for p in panels if any(_finite(v) for s in p["series"].values() for v in s)]
    if not panels:
        return ""
    with rc_context(STYLE):
        fig = Figure(figsize=(FIG_W * min(1.0, 0.34 * len(panels)), 2.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, p in zip(axes, panels):
            for i, (name, ys) in enumerate(p["series"].items()):
                pts = [(j + 1, y) for j, y in enumerate(ys) if _finite(y)]
                ax.plot([q[0] for q in pts], [q[1] for q in pts], "-o", ms=2.5, lw=1.2, color=COLORS[i], label=name)
            vals = [v for s in p["series"].values() for v in s if _finite(v)] + [0.0]
            ax.set_ylim(*(p.get("ylim") or span(min(vals), max(vals) * 1.1, 0.1)))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6, min_n_ticks=1))
            ax.set_title("\n".join(short(line) for line in str(p["title"]).split("\n")), loc="left")
            ax.set_xlabel(xlabel)
            if len(p["series"]) > 1:
                ax.legend(frameon=False, loc="best")
        return to_svg(fig)


def roc(panels: list[dict]) -> str:
    """ROC curves, one square panel each, on [0, 1]², with the chance diagonal.
    panels: [{"title", "curves": {name: [(false-positive rate, true-positive rate), ...]}}]."""
    panels = [p for p in panels if any(p["curves"].values())]
    if not panels:
        return ""
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with rc_context(STYLE):
        fig = Figure(figsize=(FIG_W * ncols / 4, 0.6 + 2.6 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        names = list(dict.fromkeys(n for p in panels for n in p["curves"]))
        for i, ax in enumerate(axes.flat):
            if i >= len(panels):
                ax.set_visible(False)
                continue
            ax.plot([0, 1], [0, 1], ls=":", color="#999", lw=0.8)
            for name, pts in panels[i]["curves"].items():
                if pts:
                    ax.plot([q[0] for q in pts], [q[1] for q in pts], color=COLORS[names.index(name) % len(COLORS)],
                            lw=1.4, drawstyle="steps-post")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_aspect("equal")
            ax.set_title(short(panels[i]["title"], 34), loc="left")
            ax.set_xlabel("false-alarm rate")
            if i % ncols == 0:
                ax.set_ylabel("detection rate")
        fig.legend(handles=[Line2D([], [], color=COLORS[j % len(COLORS)], lw=1.4, label=short(n, 30))
                            for j, n in enumerate(names)], loc="outside upper left", ncols=min(len(names), 5),
                   frameon=False)
        return to_svg(fig)


def histogram(counts: list[int], *, lo: float, hi: float, title: str, xlabel: str) -> str:
    """Bars of equal-width bins over [lo, hi]."""
    if not counts:
        return ""
    w = (hi - lo) / len(counts)
    with rc_context(STYLE):
        fig = Figure(figsize=(FIG_W * 0.34, 2.2), layout="constrained")
        ax = fig.subplots()
        ax.bar([lo + w * (i + 0.5) for i in range(len(counts))], counts, width=w * 0.9, color=COLORS[0])
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, max(max(counts), 1) * 1.1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.set_title(short(title), loc="left")
        ax.set_xlabel(xlabel)
        return to_svg(fig)
