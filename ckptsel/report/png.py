"""The report's charts as PNG files, drawn with matplotlib from the same specs as the SVGs.

For slides and papers. matplotlib is optional (``pip install 'ckptsel[report]'``); it is
imported only here, and its absence is one clear error.
"""

from __future__ import annotations

from pathlib import Path

from ckptsel.errors import CkptselError
from ckptsel.report.charts import PALETTE, STAGE_COLORS, Chart


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CkptselError("--png needs matplotlib: pip install 'ckptsel[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_pngs(charts: list[Chart], folder: Path, dpi: int = 150) -> list[Path]:
    """One ``<chart id>.png`` per chart in ``folder``; returns the paths written."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in charts:
        fig, ax = plt.subplots(figsize=(7.2, 3.6), layout="constrained")
        if chart.kind == "bars":
            _bars(ax, chart)
        else:
            _lines(ax, chart)
        ax.set_title(chart.title, fontsize=11, loc="left")
        ax.set_xlabel(chart.x_label)
        ax.set_ylabel(chart.y_label)
        ax.grid(True, color="#e6e6e6", linewidth=0.8)
        ax.set_axisbelow(True)
        if chart.note:
            fig.text(0.01, 0.005, chart.note, fontsize=7, color="#555555", va="bottom")
        path = folder / f"{chart.id}.png"
        tmp = path.with_suffix(".png.tmp")
        fig.savefig(tmp, dpi=dpi, format="png")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def _lines(ax, chart: Chart) -> None:
    for x0, x1, stage in chart.bands:
        ax.axvspan(x0, x1, color=STAGE_COLORS.get(stage, ("#eeeeee",))[0], zorder=0, linewidth=0)
    if chart.kind == "scatter":
        values = [v for s in chart.series for v in (*s.x, *s.y) if v is not None]
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 or 0.05
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], linestyle="--", color="#888888", linewidth=1)
    if chart.marker_x is not None:
        ax.axvline(chart.marker_x, color=PALETTE["recommended"][0], linestyle="--", linewidth=1.4,
                   label="recommended")
    for s in chart.series:
        color = PALETTE[s.role][0]
        pairs = [(x, y) for x, y in zip(s.x, s.y) if y is not None]
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        if s.lo is not None and s.hi is not None and s.style != "points" and chart.kind != "scatter":
            band = [(x, lo, hi) for x, lo, hi in zip(s.x, s.lo, s.hi) if lo is not None and hi is not None]
            if band:
                ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=color,
                                alpha=0.18, linewidth=0)
        if s.style == "points" or chart.kind == "scatter":
            yerr = _err(s.y, s.lo, s.hi)
            xerr = _err(s.x, s.x_lo, s.x_hi) if s.x_lo is not None else None
            ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, fmt="o", color=color, label=s.name, capsize=2, markersize=5)
            if chart.kind == "scatter" and s.labels:
                for x, y, text in zip(xs, ys, [t for t, y in zip(s.labels, s.y) if y is not None]):
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color="#555555")
        else:
            ax.plot(xs, ys, color=color, linestyle="--" if s.style == "dashed" else "-", marker="o", markersize=3,
                    linewidth=2, label=s.name)
    if chart.y_range is not None:
        ax.set_ylim(*chart.y_range)
    ax.legend(fontsize=7, frameon=False, loc="best")


def _err(center, lo, hi):
    """matplotlib's (below, above) error lengths; zero where an interval is missing."""
    if lo is None or hi is None:
        return None
    keep = [i for i, c in enumerate(center) if c is not None]
    below = [center[i] - lo[i] if lo[i] is not None else 0.0 for i in keep]
    above = [hi[i] - center[i] if hi[i] is not None else 0.0 for i in keep]
    return [below, above]


def _bars(ax, chart: Chart) -> None:
    s = chart.series[0]
    color = PALETTE[s.role][0]
    keep = [i for i, y in enumerate(s.y) if y is not None]
    ax.bar([s.x[i] for i in keep], [s.y[i] for i in keep], color=color, alpha=0.85,
           yerr=_err([s.y[i] for i in keep], [s.lo[i] for i in keep] if s.lo else None,
                     [s.hi[i] for i in keep] if s.hi else None))
    ax.set_xticks(range(len(chart.categories)), chart.categories, rotation=15, ha="right", fontsize=8)
    if chart.y_range is not None:
        ax.set_ylim(*chart.y_range)
