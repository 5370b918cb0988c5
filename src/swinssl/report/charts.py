"""Training curves as inline SVG: small line charts drawn here, so a report needs no plotting
library in the browser and stays crisp at any zoom."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any, Sequence

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
# metrics.csv names that are bookkeeping, not curves worth a panel
BOOKKEEPING = {"crops_per_s", "skipped_steps", "probe_s"}


@dataclass(frozen=True)
class Series:
    name: str
    x: Sequence[float]
    y: Sequence[float]
    dashed: bool = False


def run_panels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[Series]]]:
    """The panels of a run's ``metrics.csv`` rows (step, split, name, value): training losses,
    validation losses, validation Dice, the frozen-encoder probe and the learning rate; empty
    panels are left out."""
    series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for row in rows:
        xs, ys = series.setdefault((row["split"], row["name"]), ([], []))
        if math.isfinite(row["value"]):
            xs.append(row["step"])
            ys.append(row["value"])

    def pick(test) -> list[Series]:
        return [Series(f"{name}" if split == "train" else f"{name} ({split})", *xy)
                for (split, name), xy in series.items() if xy[0] and test(split, name)]

    probe = [Series("pre-trained encoder", *xy) for (_, name), xy in series.items() if name == "probe_dice" and xy[0]]
    if probe:  # the random encoder is measured once: a dashed line across the probe's steps
        span = [min(s.x[0] for s in probe), max(s.x[-1] for s in probe)]
        probe += [Series("random encoder", span, [xy[1][0]] * 2, dashed=True)
                  for (_, name), xy in series.items() if name == "probe_dice_random" and xy[0]]
    panels = [
        ("training losses", pick(lambda s, n: s == "train" and n not in BOOKKEEPING | {"lr"} and not _dice(n)
                                 and not n.startswith("probe"))),
        ("validation losses", pick(lambda s, n: s != "train" and n not in BOOKKEEPING and not _dice(n)
                                   and not n.startswith("probe"))),
        ("validation Dice", pick(lambda s, n: s != "train" and _dice(n))),
        ("frozen-encoder probe: mean Dice on held-out cases", probe),
        ("learning rate", pick(lambda s, n: n == "lr")),
    ]
    return [(title, lines) for title, lines in panels if lines]


def _dice(name: str) -> bool:
    return name == "dice" or name.startswith("dice_")


def line_chart(title: str, series: Sequence[Series], width: int = 420, height: int = 250) -> str:
    """An SVG line chart: one polyline per series (markers where points are few), axes with a few
    ticks, and a legend under the plot."""
    left, right, top, bottom = 52, 12, 24, 34
    legend_rows = math.ceil(len(series) / 3)
    total = height + 16 * legend_rows
    xs = [x for s in series for x in s.x]
    ys = [y for s in series for y in s.y]
    x0, x1 = _span(min(xs), max(xs))
    y0, y1 = _span(min(ys), max(ys))
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {total}" '
           f'width="{width}" height="{total}" role="img" aria-label="{escape(title)}">',
           f'<text x="{left}" y="15" class="chart-title">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="chart-frame"/>']
    for value in _ticks(y0, y1):
        y = py(value)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="chart-grid"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(value)}</text>')
    for value in _ticks(x0, x1):
        x = px(value)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(value)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 28}" text-anchor="middle">step</text>')
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.x, s.y))
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.6"{dash}/>')
        if len(s.x) <= 12 and not s.dashed:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{colour}"/>' for x, y in zip(s.x, s.y))
        lx, ly = left + (i % 3) * (pw / 3), height + 4 + 16 * (i // 3)
        out.append(f'<line x1="{lx:.1f}" x2="{lx + 16:.1f}" y1="{ly:.1f}" y2="{ly:.1f}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/><text x="{lx + 20:.1f}" y="{ly + 4:.1f}">{escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _span(lo: float, hi: float) -> tuple[float, float]:
    if hi > lo:
        pad = (hi - lo) * 0.04
        return lo - pad, hi + pad
    pad = abs(lo) * 0.05 or 0.5
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round values between lo and hi, about ``count`` of them."""
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.3g}"
