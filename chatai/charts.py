"""Charts drawn by the app itself: a stacked bar chart as inline SVG, rendered on the server.

No chart library, no script, no CDN: the page's CSP holds and the chart is there without JS. Every
label (project and model names are chosen by admins and users) is escaped for XML, so a hostile
name is text, never markup; the result is well-formed XML (tests parse it). Colours are SVG
presentation attributes, text uses ``currentColor`` so both themes read it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

from django.utils.safestring import SafeString, mark_safe

# Distinguishable in light and dark themes (Okabe-Ito, colour-blind safe), then greys.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
           "#999999", "#666666"]
OTHER = "#bbbbbb"


def _attr(text: str) -> str:
    return escape(text, {'"': "&quot;"})


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ticks(top: float) -> list[float]:
    """Round values from 0 to at least ``top`` for the y axis (about 5 of them)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [step * i for i in range(math.ceil(top / step - 1e-9) + 1)]


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.3g}"


def stacked_bars(title: str, categories: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
                 unit: str, *, label_every: int = 1, max_series: int = 9) -> SafeString:
    """One bar per category, stacked by series (``(name, one value per category)``). Series past
    ``max_series`` are drawn as one "other". ``label_every``: label every n-th category (days)."""
    series = [(name, list(values)) for name, values in series if any(v > 0 for v in values)]
    if len(series) > max_series:
        keep, rest = series[: max_series - 1], series[max_series - 1:]
        series = [*keep, (f"other ({len(rest)})", [sum(v[i] for _, v in rest) for i in range(len(categories))])]
    colours = [PALETTE[i] if i < len(PALETTE) else OTHER for i in range(len(series))]
    if series and series[-1][0].startswith("other (") and len(series) == max_series:
        colours[-1] = OTHER
    totals = [sum(values[i] for _, values in series) for i in range(len(categories))]
    ticks = _ticks(max(totals, default=0.0))
    top = ticks[-1]

    rotate = max((len(c) for c in categories), default=0) > 6
    left, right, head = 64, 16, 34
    foot = 86 if rotate else 30
    slot = max(14.0, min(64.0, 720 / max(len(categories), 1)))
    plot_w, plot_h = slot * len(categories), 220
    legend_rows = math.ceil(len(series) / 3)
    width = int(left + plot_w + right)
    height = int(head + plot_h + foot + 18 * legend_rows + 8)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{max(width, 360)}" '
           f'height="{height}" viewBox="0 0 {max(width, 360)} {height}" font-family="sans-serif" font-size="11">',
           f"<title>{escape(title)}</title>",
           f'<text x="{left}" y="18" font-size="13" font-weight="bold" fill="currentColor">{escape(title)}</text>']

    def y(value: float) -> float:
        return head + plot_h - (value / top * plot_h if top else 0)

    for tick in ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w:.1f}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                   f'stroke="currentColor" stroke-opacity="0.15"/>')
        out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" fill="currentColor">'
                   f"{escape(_number(tick))}</text>")
    out.append(f'<text x="12" y="{head + plot_h / 2:.1f}" transform="rotate(-90 12 {head + plot_h / 2:.1f})" '
               f'text-anchor="middle" fill="currentColor">{escape(unit)}</text>')

    bar = slot * 0.7
    for i, category in enumerate(categories):
        x = left + slot * i + (slot - bar) / 2
        base = 0.0
        for (name, values), colour in zip(series, colours, strict=True):
            value = values[i]
            if value <= 0:
                continue
            out.append(f'<rect x="{x:.1f}" y="{y(base + value):.1f}" width="{bar:.1f}" '
                       f'height="{max(y(base) - y(base + value), 0.5):.1f}" fill="{colour}">'
                       f"<title>{escape(f'{category}, {name}: {_number(value)} {unit}')}</title></rect>")
            base += value
        if i % label_every == 0:
            cx, ly = x + bar / 2, head + plot_h + 14
            label = escape(_short(category, 22))
            if rotate:
                out.append(f'<text x="{cx:.1f}" y="{ly:.1f}" text-anchor="end" fill="currentColor" '
                           f'transform="rotate(-40 {cx:.1f} {ly:.1f})"><title>{escape(category)}</title>'
                           f"{label}</text>")
            else:
                out.append(f'<text x="{cx:.1f}" y="{ly:.1f}" text-anchor="middle" fill="currentColor">{label}</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w:.1f}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="currentColor"/>')

    legend_y = head + plot_h + foot
    for n, ((name, _), colour) in enumerate(zip(series, colours, strict=True)):
        lx, ly = left + (n % 3) * 220, legend_y + 18 * (n // 3)
        out.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly + 9}" fill="currentColor" data-series="{_attr(name)}">'
                   f"{escape(_short(name, 32))}</text>")
    if not series:
        out.append(f'<text x="{left + 8}" y="{head + plot_h / 2:.1f}" fill="currentColor">Nothing in this period.'
                   "</text>")
    out.append("</svg>")
    return mark_safe("".join(out))  # noqa: S308 - built above; every text and attribute value escaped
