"""Charts as inline SVG: no JavaScript, no fonts, no network; the page's CSS gives the colours.

Every data point is an element that carries its numbers (``data-x``, ``data-y``) and a
``<title>`` tooltip, and the ``<svg>`` states its plot box and domains (``data-plot``,
``data-x-domain``, ``data-y-domain``), so a test can check that a point's position encodes
its value, and a reader can hover for exact numbers. Colours are CSS classes (``s-<role>``)
resolved by the page, which is how one SVG serves the light and the dark theme.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from ckptsel.report.charts import Chart, Series

WIDTH, HEIGHT = 720, 330
MARGIN = {"left": 64, "right": 18, "top": 14, "bottom": 52}
MAX_POINT_LABELS = 12


def nice_step(span: float, target: int = 5) -> float:
    """A 1/2/5 x 10^k tick step giving about ``target`` intervals over ``span``."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values inside [lo, hi]."""
    step = nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def padded_domain(values: Sequence[float], fixed: tuple[float, float] | None = None,
                  pad: float = 0.05) -> tuple[float, float]:
    """The data's range padded by ``pad`` of its span (a flat series gets ±1 or ±10%); ``fixed`` wins."""
    if fixed is not None:
        return fixed
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return (0.0, 1.0)
    lo, hi = min(finite), max(finite)
    if hi == lo:
        half = abs(lo) * 0.1 or 1.0
        return (lo - half, hi + half)
    span = hi - lo
    return (lo - pad * span, hi + pad * span)


class Frame:
    """Maps data coordinates to the SVG's pixel box (y grows downwards on screen)."""

    def __init__(self, x_domain: tuple[float, float], y_domain: tuple[float, float]):
        self.x0, self.x1 = x_domain
        self.y0, self.y1 = y_domain
        self.left, self.top = MARGIN["left"], MARGIN["top"]
        self.right, self.bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def clamp_y(self, y: float) -> float:
        return min(max(y, self.y0), self.y1)


def fmt(value: float) -> str:
    """A number for a tick or tooltip: integers bare, others to 3 significant decimals."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}".rstrip("0").rstrip(".")


def render(chart: Chart) -> str:
    """One chart as an ``<svg>`` element (a string)."""
    if chart.kind == "bars":
        return _render_bars(chart)
    xs = [v for s in chart.series for v in (*s.x, *(s.x_lo or []), *(s.x_hi or []))]
    ys = [v for s in chart.series for v in (*s.y, *(s.lo or []), *(s.hi or []))]
    if chart.kind == "scatter":
        both = padded_domain([*xs, *ys], pad=0.08)
        both = (max(0.0, both[0]), min(1.0, both[1])) if all(0 <= v <= 1 for v in xs + ys if v is not None) else both
        frame = Frame(both, both)
    else:
        frame = Frame(padded_domain(xs, pad=0.03), padded_domain(ys, chart.y_range))
    parts = [_open(chart, frame)]
    parts += [_band(frame, *band) for band in chart.bands]
    parts.append(_axes(chart, frame))
    if chart.kind == "scatter":
        lo, hi = frame.x0, frame.x1
        parts.append(f'<line class="identity" x1="{frame.px(lo):.2f}" y1="{frame.py(lo):.2f}" '
                     f'x2="{frame.px(hi):.2f}" y2="{frame.py(hi):.2f}"/>')
    if chart.marker_x is not None:
        x = frame.px(chart.marker_x)
        # The label goes left of the line when the line is near the right edge, so it is never cut off.
        near_right = x > frame.left + 0.75 * (frame.right - frame.left)
        text_x, anchor = (x - 4, "end") if near_right else (x + 4, "start")
        parts.append(f'<g class="marker s-recommended">'
                     f'<line x1="{x:.2f}" y1="{frame.top}" x2="{x:.2f}" y2="{frame.bottom}"/>'
                     f'<text x="{text_x:.2f}" y="{frame.top + 12}" text-anchor="{anchor}">★ recommended</text></g>')
    for n, s in enumerate(chart.series):
        # Scatter labels (checkpoint steps) for the first series only, and only while they stay legible.
        label = chart.kind == "scatter" and n == 0 and len(s.x) <= MAX_POINT_LABELS
        parts.append(_series(s, frame, scatter=chart.kind == "scatter", label_points=label))
    parts.append("</svg>")
    return "".join(parts)


def _open(chart: Chart, frame: Frame) -> str:
    return (f'<svg class="chart" id="svg-{escape(chart.id)}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(chart.title)}" '
            f'data-plot="{frame.left},{frame.top},{frame.right},{frame.bottom}" '
            f'data-x-domain="{frame.x0!r},{frame.x1!r}" data-y-domain="{frame.y0!r},{frame.y1!r}">'
            f"<title>{escape(chart.title)}</title>")


def _band(frame: Frame, x0: float, x1: float, stage: str) -> str:
    left, right = max(frame.px(x0), frame.left), min(frame.px(x1), frame.right)
    if x0 == x1:  # a single checkpoint in its stage: a narrow band around it
        left, right = frame.px(x0) - 4, frame.px(x0) + 4
    cls = "band band-" + stage.replace(" ", "-")
    return (f'<rect class="{escape(cls)}" x="{left:.2f}" y="{frame.top}" width="{max(right - left, 1):.2f}" '
            f'height="{frame.bottom - frame.top}"><title>{escape(stage)}</title></rect>')


def _plot_and_y_grid(frame: Frame) -> list[str]:
    """The plot area and the horizontal gridlines with their y tick labels, shared by every chart kind."""
    out = [f'<rect class="plot" x="{frame.left}" y="{frame.top}" width="{frame.right - frame.left}" '
           f'height="{frame.bottom - frame.top}"/>']
    for v in ticks(frame.y0, frame.y1):
        y = frame.py(v)
        out.append(f'<line class="gridline" x1="{frame.left}" y1="{y:.2f}" x2="{frame.right}" y2="{y:.2f}"/>'
                   f'<text class="tick" x="{frame.left - 6}" y="{y + 4:.2f}" text-anchor="end">{fmt(v)}</text>')
    return out


def _axes(chart: Chart, frame: Frame) -> str:
    out = _plot_and_y_grid(frame)
    for v in ticks(frame.x0, frame.x1, target=7):
        x = frame.px(v)
        out.append(f'<line class="gridline" x1="{x:.2f}" y1="{frame.top}" x2="{x:.2f}" y2="{frame.bottom}"/>'
                   f'<text class="tick" x="{x:.2f}" y="{frame.bottom + 16}" text-anchor="middle">{fmt(v)}</text>')
    mid_x, mid_y = (frame.left + frame.right) / 2, (frame.top + frame.bottom) / 2
    out.append(f'<text class="axis-label" x="{mid_x:.1f}" y="{HEIGHT - 10}" text-anchor="middle">'
               f"{escape(chart.x_label)}</text>")
    out.append(f'<text class="axis-label" transform="translate(16 {mid_y:.1f}) rotate(-90)" text-anchor="middle">'
               f"{escape(chart.y_label)}</text>")
    return "".join(out)


# Width of one character of a point label at the chart's 12px font, a little generous.
LABEL_CHAR_PX = 6.5


def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether two boxes (x0, y0, x1, y1) intersect."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _runs(values: Sequence[float | None]) -> list[list[int]]:
    """Indices of consecutive non-missing values: a line is broken where a value is missing."""
    runs, current = [], []
    for i, v in enumerate(values):
        if v is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(i)
    if current:
        runs.append(current)
    return runs


def _series(s: Series, frame: Frame, scatter: bool, label_points: bool = False) -> str:
    role = f"s-{escape(s.role)}"
    out = [f'<g class="series {role}" data-series="{escape(s.name)}">']
    if s.lo is not None and s.hi is not None and s.style != "points":
        both = [None if lo is None or hi is None else 1 for lo, hi in zip(s.lo, s.hi)]
        for run in _runs(both):
            upper = [f"{frame.px(s.x[i]):.2f},{frame.py(frame.clamp_y(s.hi[i])):.2f}" for i in run]
            lower = [f"{frame.px(s.x[i]):.2f},{frame.py(frame.clamp_y(s.lo[i])):.2f}" for i in reversed(run)]
            out.append(f'<polygon class="ci" points="{" ".join(upper + lower)}"/>')
    if s.style in ("line", "dashed"):
        for run in _runs(s.y):
            points = " ".join(f"{frame.px(s.x[i]):.2f},{frame.py(s.y[i]):.2f}" for i in run)
            out.append(f'<polyline class="line {s.style}" points="{points}"/>')
    placed: list[tuple[float, float, float, float]] = []  # scatter label boxes drawn so far
    for i, (x, y) in enumerate(zip(s.x, s.y)):
        if y is None:
            continue
        cx, cy = frame.px(x), frame.py(y)
        if s.style == "points" or scatter:
            out.append(_error_bars(s, i, frame, cx, cy))
        label = s.labels[i] if s.labels else fmt(x)
        tip = f"{label} · {s.name}: {fmt(y)}" + _ci_text(s, i)
        r = 4.5 if s.style == "points" or scatter else 3
        out.append(f'<circle class="pt" cx="{cx:.2f}" cy="{cy:.2f}" r="{r}" data-x="{x!r}" data-y="{y!r}">'
                   f"<title>{escape(tip)}</title></circle>")
        if scatter and s.labels and label_points:
            box = (cx + 7, cy - 16, cx + 7 + LABEL_CHAR_PX * len(s.labels[i]), cy - 4)
            if not any(overlaps(box, other) for other in placed):  # a crowded point keeps its tooltip only
                placed.append(box)
                out.append(f'<text class="pt-label" x="{cx + 7:.2f}" y="{cy - 6:.2f}">{escape(s.labels[i])}</text>')
    out.append("</g>")
    return "".join(out)


def _ci_text(s: Series, i: int) -> str:
    if s.lo is None or s.hi is None or s.lo[i] is None or s.hi[i] is None:
        return ""
    return f" [{fmt(s.lo[i])}, {fmt(s.hi[i])}]"


def _error_bars(s: Series, i: int, frame: Frame, cx: float, cy: float) -> str:
    out = []
    if s.lo is not None and s.hi is not None and s.lo[i] is not None and s.hi[i] is not None:
        y0, y1 = frame.py(frame.clamp_y(s.lo[i])), frame.py(frame.clamp_y(s.hi[i]))
        out.append(f'<line class="err" x1="{cx:.2f}" y1="{y0:.2f}" x2="{cx:.2f}" y2="{y1:.2f}"/>')
    if s.x_lo is not None and s.x_hi is not None and s.x_lo[i] is not None and s.x_hi[i] is not None:
        x0, x1 = frame.px(max(s.x_lo[i], frame.x0)), frame.px(min(s.x_hi[i], frame.x1))
        out.append(f'<line class="err" x1="{x0:.2f}" y1="{cy:.2f}" x2="{x1:.2f}" y2="{cy:.2f}"/>')
    return "".join(out)


def _render_bars(chart: Chart) -> str:
    s = chart.series[0]
    ys = [v for v in (*s.y, *(s.hi or [])) if v is not None]
    y_domain = chart.y_range or (0.0, padded_domain(ys)[1])
    frame = Frame((-0.5, len(chart.categories) - 0.5), y_domain)
    parts = [_open(chart, frame), _axes_bars(chart, frame)]
    width = 0.6 * (frame.right - frame.left) / max(len(chart.categories), 1)
    parts.append(f'<g class="series s-{escape(s.role)}" data-series="{escape(s.name)}">')
    for i, (x, y) in enumerate(zip(s.x, s.y)):
        if y is None:
            continue
        cx, top = frame.px(x), frame.py(y)
        tip = f"{chart.categories[i]} · {s.name}: {fmt(y)}" + _ci_text(s, i)
        parts.append(f'<rect class="bar" x="{cx - width / 2:.2f}" y="{top:.2f}" width="{width:.2f}" '
                     f'height="{frame.bottom - top:.2f}" data-x="{x!r}" data-y="{y!r}"><title>{escape(tip)}</title></rect>')
        parts.append(_error_bars(s, i, frame, cx, top))
        parts.append(f'<text class="bar-value" x="{cx:.2f}" y="{top - 5:.2f}" text-anchor="middle">{fmt(y)}</text>')
    parts.append("</g></svg>")
    return "".join(parts)


def _axes_bars(chart: Chart, frame: Frame) -> str:
    out = _plot_and_y_grid(frame)
    for i, name in enumerate(chart.categories):
        short = name if len(name) <= 24 else name[:23] + "…"
        out.append(f'<text class="tick" x="{frame.px(i):.2f}" y="{frame.bottom + 16}" text-anchor="middle">'
                   f"{escape(short)}<title>{escape(name)}</title></text>")
    mid_y = (frame.top + frame.bottom) / 2
    out.append(f'<text class="axis-label" transform="translate(16 {mid_y:.1f}) rotate(-90)" text-anchor="middle">'
               f"{escape(chart.y_label)}</text>")
    return "".join(out)
