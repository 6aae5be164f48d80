"""Small inline SVG charts (no plotting library): overlaid histograms, line charts, stacked
bars and a scatter map of linked points."""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple, Optional, Sequence

from monofast.site.text import escape, fmt

WIDTH, HEIGHT = 520, 190
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 22, 36
COLORS = ("#d9480f", "#1c7ed6", "#2b8a3e", "#862e9c", "#e67700", "#0b7285")


class Series(NamedTuple):
    label: str
    values: Sequence[float]
    """Bar heights (one per bin) or y values (one per x)."""


def _frame(title: str, xlabel: str, ylabel: str, y_max: float, legend: Sequence[str], body: list[str],
           y_min: float = 0.0, first_color: int = 0) -> str:
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f'<text x="{LEFT}" y="14" class="ct">{escape(title)}</text>',
             f'<line x1="{LEFT}" y1="{TOP + h}" x2="{LEFT + w}" y2="{TOP + h}" class="ax"/>',
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + h}" class="ax"/>',
             f'<text x="{LEFT - 4}" y="{TOP + 8}" class="yl">{escape(fmt(y_max))}</text>',
             f'<text x="{LEFT - 4}" y="{TOP + h}" class="yl">{escape(fmt(y_min))}</text>',
             f'<text x="{LEFT + w / 2}" y="{HEIGHT - 4}" class="xt">{escape(xlabel)}</text>',
             f'<text x="10" y="{TOP + h / 2}" class="xt" transform="rotate(-90 10 {TOP + h / 2})">'
             f'{escape(ylabel)}</text>']
    parts += body
    for i, name in enumerate(legend):
        x = LEFT + w - 120
        y = TOP + 4 + 14 * i
        parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{COLORS[(first_color + i) % len(COLORS)]}"/>'
                     f'<text x="{x + 14}" y="{y + 9}" class="lg">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _marks(marks: Sequence[tuple[float, str]], x0: float, x1: float) -> list[str]:
    """Dashed vertical lines at data values `x` (between x0 and x1), each with a label."""
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = []
    for x, label in marks:
        if not (math.isfinite(x) and x0 <= x <= x1) or x1 <= x0:
            continue
        px = LEFT + w * (x - x0) / (x1 - x0)
        out.append(f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{TOP + h}" class="mk"/>'
                   f'<text x="{px + 3:.1f}" y="{TOP + 10}" class="lg">{escape(label)}</text>')
    return out


def _bar(b: int, bw: float, y: float, bh: float, fill: str, label: str, value: float, edges: Sequence[float],
         opacity: float = 1.0) -> str:
    """Bin b's bar from y down bh, with a tooltip naming the series, the value and the bin."""
    see = f' fill-opacity="{opacity:g}"' if opacity < 1 else ""
    return (f'<rect x="{LEFT + b * bw:.1f}" y="{y:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}" '
            f'fill="{fill}"{see}><title>{escape(label)}: {escape(fmt(value))} in [{escape(fmt(edges[b]))}, '
            f'{escape(fmt(edges[b + 1]))})</title></rect>')


def _ticks(edges: Sequence[float], bw: float, h: float, every: int) -> list[str]:
    """Labels of every `every`-th bin edge under the x axis (bins `bw` wide, plot `h` high)."""
    return [f'<text x="{LEFT + b * bw:.1f}" y="{TOP + h + 12}" class="xl">{escape(fmt(edges[b], 2))}</text>'
            for b in range(0, len(edges), max(every, 1))]


def histogram(title: str, series: Sequence[Series], edges: Sequence[float], xlabel: str, ylabel: str,
              tick_every: int = 4, marks: Sequence[tuple[float, str]] = (), first_color: int = 0) -> str:
    """Overlaid bar histograms sharing the bins between `edges` (len = bins + 1); `marks` are
    labelled dashed lines at values on the x axis (a threshold); series i is drawn in
    COLORS[first_color + i] (charts side by side keep one colour per quantity)."""
    bins = len(edges) - 1
    y_max = max([max(s.values, default=0) for s in series] + [1e-12])
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bw = w / max(bins, 1)
    body = []
    for i, s in enumerate(series):
        color = COLORS[(first_color + i) % len(COLORS)]
        for b, v in enumerate(s.values):
            if v <= 0:
                continue
            bh = h * v / y_max
            body.append(_bar(b, bw, TOP + h - bh, bh, color, s.label, v, edges, opacity=0.6))
    body += _ticks(edges, bw, h, tick_every)
    if bins > 0 and len(set(round(edges[b + 1] - edges[b], 9) for b in range(bins))) == 1:  # equal bins only
        body += _marks(marks, edges[0], edges[-1])
    return _frame(title, xlabel, ylabel, y_max, [s.label for s in series], body, first_color=first_color)


def stacked_bars(title: str, stacks: Sequence[Sequence[float]], edges: Sequence[float], labels: Sequence[str],
                 xlabel: str, ylabel: str, tick_every: int = 2) -> str:
    """One bar per bin between `edges` (len = bins + 1), stacked by part: `stacks` is
    (bins, parts), part p drawn in COLORS[p] and named `labels[p]`. Every bin is a
    `<g class="stack">`, empty bins included."""
    bins = len(stacks)
    y_max = max([sum(v for v in stack if v > 0) for stack in stacks] + [1e-12])
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bw = w / max(bins, 1)
    body = []
    for b, stack in enumerate(stacks):
        rects, base = [], 0.0
        for p, v in enumerate(stack):
            if v <= 0:
                continue
            bh = h * v / y_max
            rects.append(_bar(b, bw, TOP + h - base - bh, bh, COLORS[p % len(COLORS)], labels[p], v, edges))
            base += bh
        body.append(f'<g class="stack">{"".join(rects)}</g>')
    body += _ticks(edges, bw, h, tick_every)
    return _frame(title, xlabel, ylabel, y_max, list(labels), body)


class Point(NamedTuple):
    """One point of a scatter map."""

    x: float
    y: float
    cls: str
    """CSS classes (its colours in each view of the map)."""
    href: Optional[str]
    """Where a click goes (None: not a link)."""
    tip: str
    """Tooltip text (escaped here)."""


MAP_SIZE = 600


def scatter(title: str, points: Sequence[Point], legends: Sequence[tuple[str, Sequence[tuple[str, str]]]],
            radius: float = 2.2) -> str:
    """Points scaled into a square (axes carry no meaning: a 2-D layout), each a link with a
    tooltip; coloured by CSS through their classes. `legends` are (group class, [(label,
    swatch class)]): one legend per view, shown or hidden by the page's stylesheet."""
    pad = 12
    size = MAP_SIZE
    if points:
        xs, ys = [p.x for p in points], [p.y for p in points]
        x0, y0 = min(xs), min(ys)
        span = max(max(xs) - x0, max(ys) - y0) or 1.0
    else:
        x0 = y0 = 0.0
        span = 1.0
    scale = (size - 2 * pad) / span
    body = [f'<svg class="map" viewBox="0 0 {size} {size + 18}" role="img" aria-label="{escape(title)}">',
            f'<text x="4" y="13" class="ct">{escape(title)}</text>']
    for p in points:
        dot = (f'<circle cx="{pad + (p.x - x0) * scale:.1f}" cy="{18 + pad + (p.y - y0) * scale:.1f}" r="{radius}" '
               f'class="{p.cls}"><title>{escape(p.tip)}</title></circle>')
        body.append(f'<a href="{escape(p.href)}">{dot}</a>' if p.href else dot)
    for group, items in legends:
        parts = []
        for i, (label, cls) in enumerate(items):
            y = 24 + 14 * i
            parts.append(f'<circle cx="{size - 110}" cy="{y}" r="5" class="{cls}"/>'
                         f'<text x="{size - 100}" y="{y + 4}" class="lg">{escape(label)}</text>')
        body.append(f'<g class="{group}">{"".join(parts)}</g>')
    body.append("</svg>")
    return "".join(body)


def lines(title: str, x: Sequence[float], series: Sequence[Series], xlabel: str, ylabel: str,
          log_y: bool = False) -> str:
    """Line chart of each series against x (NaN / missing values leave gaps)."""
    def tf(v: float) -> float:
        return math.log10(v) if log_y else v

    finite = [tf(v) for s in series for v in s.values
              if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
    if not finite or not x:
        return ""
    lo, hi = min(finite + [0.0] if not log_y else finite), max(finite)
    hi = hi if hi > lo else lo + 1.0
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    x0, x1 = min(x), max(x)
    span = (x1 - x0) or 1.0
    body = []
    for i, s in enumerate(series):
        points = []
        for xv, v in zip(x, s.values):
            if v is None or not math.isfinite(v) or (log_y and v <= 0):
                continue
            points.append(f"{LEFT + w * (xv - x0) / span:.1f},{TOP + h - h * (tf(v) - lo) / (hi - lo):.1f}")
        if points:
            body.append(f'<polyline fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="1.5" '
                        f'points="{" ".join(points)}"/>')
    body.append(f'<text x="{LEFT}" y="{TOP + h + 12}" class="xl">{escape(fmt(x0))}</text>'
                f'<text x="{LEFT + w}" y="{TOP + h + 12}" class="xl">{escape(fmt(x1))}</text>')
    labels = (10 ** hi, 10 ** lo) if log_y else (hi, lo)
    return _frame(title, xlabel, ylabel + (" (log)" if log_y else ""), labels[0], [s.label for s in series], body,
                  y_min=labels[1])


class XYSeries(NamedTuple):
    label: str
    points: Sequence[tuple[float, float, str]]
    """(x, y, tooltip) of each point; joined by a line in order of x."""


@functools.cache
def standalone_style() -> str:
    """The site stylesheet's chart rules (`svg .ax { ... }`), for an SVG file read on its own
    (`monofast report`): one set of styles for both, read from the stylesheet once."""
    from importlib import resources

    css = (resources.files("monofast.site") / "assets" / "style.css").read_text(encoding="utf-8")
    rules = re.findall(r"svg (\.[\w-]+(?:, svg \.[\w-]+)*) (\{[^}]*\})", css)
    return "<style>text{font-family:sans-serif}" + "".join(sel.replace("svg ", "") + body for sel, body in rules) \
        + "</style>"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between lo and hi (both > 0)."""
    out = []
    for decade in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        out += [m * 10.0 ** decade for m in (1, 2, 5) if lo <= m * 10.0 ** decade <= hi]
    return out


def xy(title: str, series: Sequence[XYSeries], xlabel: str, ylabel: str, log_x: bool = False,
       marked: Sequence[tuple[float, float, str]] = (), hlines: Sequence[tuple[float, str]] = (),
       y_range: Optional[tuple[float, float]] = None, standalone: bool = False) -> str:
    """Points of each series against numeric axes (x on a log scale with `log_x`), joined in
    order of x; `marked` points get a ring and a label, `hlines` a dashed line at a y value.
    `standalone`: a file of its own (namespace and styles inside)."""
    def drawable(x: float, y: float) -> bool:
        return math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x)

    pts = [(x, y) for s in series for x, y, _ in s.points if drawable(x, y)]
    if not pts:
        return ""
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    tf = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x_lo, x_hi = min(tf(x) for x, _ in pts), max(tf(x) for x, _ in pts)
    pad = 0.05 * ((x_hi - x_lo) or 1.0)
    x_lo, x_hi = x_lo - pad, x_hi + pad
    ys = [y for _, y in pts] + [y for y, _ in hlines]
    y_lo, y_hi = y_range or (min(ys), max(ys))
    y_hi = y_hi if y_hi > y_lo else y_lo + 1.0
    if y_range is None:  # headroom: the legend sits in the top right corner; no point on the axis
        span = y_hi - y_lo
        y_hi, y_lo = y_hi + (0.12 * len(series) + 0.05) * span, y_lo - 0.08 * span

    def px(x: float) -> float:
        return LEFT + w * (tf(x) - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return TOP + h - h * (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo)

    body = []
    ticks = _log_ticks(10 ** x_lo, 10 ** x_hi) if log_x else []
    if len(ticks) < 3:  # a narrow range: label the points' own x values
        ticks = sorted({float(f"{x:.3g}") for x, _ in pts})
    for t in ticks:
        body.append(f'<line x1="{px(t):.1f}" y1="{TOP}" x2="{px(t):.1f}" y2="{TOP + h}" class="gd"/>'
                    f'<text x="{px(t):.1f}" y="{TOP + h + 12}" class="xl">{escape(fmt(t))}</text>')
    for y, label in hlines:
        body.append(f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + w}" y2="{py(y):.1f}" class="mk"/>'
                    f'<text x="{LEFT + w - 4}" y="{py(y) - 3:.1f}" class="lg" text-anchor="end">'
                    f'{escape(label)}</text>')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        inside = sorted((x, y, tip) for x, y, tip in s.points if drawable(x, y))
        if len(inside) > 1:
            line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in inside)
            body.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
        body += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>{escape(tip)}</title></circle>'
                 for x, y, tip in inside]
    for x, y, label in marked:
        if drawable(x, y):
            body.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="6.5" fill="none" stroke="#222" '
                        f'stroke-width="1.5"/><text x="{px(x) + 9:.1f}" y="{py(y) - 8:.1f}" class="lg">'
                        f'{escape(label)}</text>')
    chart = _frame(title, xlabel + (" (log)" if log_x else ""), ylabel, y_hi, [s.label for s in series], body,
                   y_min=y_lo)
    if standalone:
        chart = chart.replace('<svg class="chart"', '<svg xmlns="http://www.w3.org/2000/svg" class="chart"', 1)
        chart = chart.replace(">", ">" + standalone_style() + f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>', 1)
    return chart
