"""Small inline SVG charts (no plotting library): overlaid histograms and line charts."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from monofast.site.text import escape, fmt

WIDTH, HEIGHT = 520, 190
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 22, 36
COLORS = ("#d9480f", "#1c7ed6", "#2b8a3e", "#862e9c", "#e67700", "#0b7285")


class Series(NamedTuple):
    label: str
    values: Sequence[float]
    """Bar heights (one per bin) or y values (one per x)."""


def _frame(title: str, xlabel: str, ylabel: str, y_max: float, legend: Sequence[str], body: list[str],
           y_min: float = 0.0) -> str:
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
        parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>'
                     f'<text x="{x + 14}" y="{y + 9}" class="lg">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(title: str, series: Sequence[Series], edges: Sequence[float], xlabel: str, ylabel: str,
              tick_every: int = 4) -> str:
    """Overlaid bar histograms sharing the bins between `edges` (len = bins + 1)."""
    bins = len(edges) - 1
    y_max = max([max(s.values, default=0) for s in series] + [1e-12])
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bw = w / max(bins, 1)
    body = []
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        for b, v in enumerate(s.values):
            if v <= 0:
                continue
            bh = h * v / y_max
            body.append(f'<rect x="{LEFT + b * bw:.1f}" y="{TOP + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                        f'height="{bh:.1f}" fill="{color}" fill-opacity="0.6"><title>{escape(s.label)}: '
                        f'{escape(fmt(v))} in [{escape(fmt(edges[b]))}, {escape(fmt(edges[b + 1]))})</title></rect>')
    for b in range(0, bins + 1, max(tick_every, 1)):
        body.append(f'<text x="{LEFT + b * bw:.1f}" y="{TOP + h + 12}" class="xl">{escape(fmt(edges[b], 2))}</text>')
    return _frame(title, xlabel, ylabel, y_max, [s.label for s in series], body)


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
