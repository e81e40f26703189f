"""Tokens per day per model as a stacked bar chart in plain SVG, drawn on the server.

Pure: data in, markup out (no script, no style attribute, so the page's CSP stays strict). The
chart has a title and a description for screen readers; the page shows the same numbers in a
table beside it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Colour-blind-safe (Okabe-Ito), dark enough on white for the 3:1 contrast graphics need.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#7A6A00", "#56B4E9", "#E69F00", "#000")


@dataclass(frozen=True, slots=True)
class Bar:
    day: dt.date
    model: str
    tokens: int


def _nice(n: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``n``."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= n:
                return step * m
        step *= 10


def stacked_bars(bars: Sequence[Bar], days: Sequence[dt.date], title: str) -> str:
    models = sorted({b.model for b in bars})
    colour = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}
    per: dict[tuple[dt.date, str], int] = {}
    for b in bars:
        per[(b.day, b.model)] = per.get((b.day, b.model), 0) + b.tokens
    totals = [sum(per.get((d, m), 0) for m in models) for d in days]
    step = _nice(-(-(max(totals, default=0) or 1) // 4))  # four even steps up the axis
    top = step * 4
    w, h, left, bottom, pad = 720, 260, 64, 36, 10
    plot_w, plot_h = w - left - pad, h - bottom - pad
    bw = plot_w / max(len(days), 1)
    out = [
        f'<svg class="chart" viewBox="0 0 {w} {h + 24 * ((len(models) + 3) // 4)}" '
        f'role="img" aria-labelledby="chart-title chart-desc" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="chart-title">{escape(title)}</title>',
        f'<desc id="chart-desc">Total tokens per day for {len(days)} days, stacked by model; '
        f'the table below lists the same numbers.</desc>',
    ]
    for i in range(5):  # grid lines and the axis labels
        v = step * i
        y = pad + plot_h - plot_h * i / 4
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - pad}" y2="{y:.1f}" '
                   f'stroke="#ccc" stroke-width="1"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="#333">{v:,}</text>')
    for i, d in enumerate(days):
        x = left + i * bw
        y = pad + plot_h
        for m in models:
            t = per.get((d, m), 0)
            if not t:
                continue
            bh = plot_h * t / top
            y -= bh
            out.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" '
                       f'height="{bh:.1f}" fill="{colour[m]}"><title>{escape(m)}, {d}: '
                       f'{t:,} tokens</title></rect>')
        if len(days) <= 10 or i % max(len(days) // 8, 1) == 0:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{h - bottom + 16}" text-anchor="middle" '
                       f'font-size="11" fill="#333">{d.strftime("%m-%d")}</text>')
    for i, m in enumerate(models):  # the legend, four to a row
        lx, ly = left + (i % 4) * 165, h + 8 + 24 * (i // 4)
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{colour[m]}"/>')
        out.append(f'<text x="{lx + 18}" y="{ly + 11}" font-size="12" fill="#111">'
                   f'{escape(m[:22])}</text>')
    out.append("</svg>")
    return "".join(out)
