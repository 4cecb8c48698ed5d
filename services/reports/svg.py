"""Inline SVG figures as strings: the same markup in the HTML report and the browser.

No scripts and nothing fetched: each figure is one ``<svg class="figure">``
whose data elements (bars, cells, points) carry ``data-value`` (and
``data-node`` where they stand for a node) so that tests and readers can
check a figure holds data, and whose nodes are ``<a href>`` links when the
caller gives an address for them. Widths are fixed in the viewBox and the
figure scales to its container (``max-width: 100%``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

Link = Callable[[str], str | None]

_POS, _NEG, _GRID = "#c4320a", "#1849a9", "#d0d5dd"
_FONT = "font-family='system-ui,sans-serif' font-size='11'"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    return f"{x:.3g}"


def _svg(kind: str, width: int, height: int, title: str, body: list[str]) -> str:
    return (
        f"<svg class='figure' data-figure='{_esc(kind)}' viewBox='0 0 {width} {height}' "
        f"width='{width}' style='max-width:100%;height:auto' role='img' "
        f"xmlns='http://www.w3.org/2000/svg' {_FONT}>"
        f"<title>{_esc(title)}</title>"
        f"<text x='4' y='14' font-weight='600'>{_esc(title)}</text>" + "".join(body) + "</svg>"
    )


def _linked(element: str, node: str | None, link: Link | None) -> str:
    href = link(node) if (link is not None and node is not None) else None
    return f"<a href='{_esc(href)}'>{element}</a>" if href else element


def _color(value: float, scale: float) -> str:
    """Red for positive, blue for negative, white at 0; saturation by |value| / scale."""
    t = 0.0 if scale <= 0 else min(1.0, abs(value) / scale)
    base = (196, 50, 10) if value >= 0 else (24, 73, 169)
    r, g, b = (round(255 + (c - 255) * t) for c in base)
    return f"rgb({r},{g},{b})"


def bar_chart(
    kind: str,
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    nodes: Sequence[str | None] | None = None,
    link: Link | None = None,
    width: int = 620,
    unit: str = "",
) -> str:
    """Horizontal bars (one per label, signed), largest |value| first as given."""
    label_w, row_h, top = 230, 16, 24
    height = top + row_h * max(len(values), 1) + 20
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    zero = label_w + (width - label_w - 60) / 2 if min(values, default=0) < 0 else label_w
    span = (width - label_w - 60) / (2 if zero > label_w else 1)
    body = [f"<line x1='{zero:.1f}' y1='{top}' x2='{zero:.1f}' y2='{height - 18}' stroke='#888'/>"]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * row_h
        length = abs(value) / scale * span
        x = zero if value >= 0 else zero - length
        node = nodes[i] if nodes is not None else None
        bar = (
            f"<rect class='bar' data-value='{value:.6g}' data-label='{_esc(label)}'"
            + (f" data-node='{_esc(node)}'" if node else "")
            + f" x='{x:.1f}' y='{y + 2}' width='{max(length, 0.5):.1f}' height='{row_h - 4}' "
            f"fill='{_POS if value >= 0 else _NEG}'><title>{_esc(label)}: {_num(value)}"
            f"{_esc(unit)}</title></rect>"
        )
        body.append(_linked(bar, node, link))
        body.append(
            f"<text x='{label_w - 6}' y='{y + row_h - 4}' text-anchor='end'>{_esc(label[:38])}</text>"
        )
        # Negative values are labelled right of the zero line, clear of the row labels.
        tx = x + length + 4 if value >= 0 else zero + 4
        anchor = "start"
        body.append(
            f"<text x='{tx:.1f}' y='{y + row_h - 4}' text-anchor='{anchor}'>{_num(value)}</text>"
        )
    return _svg(kind, width, height, title, body)


def histogram(
    kind: str, title: str, edges: Sequence[float], counts: Sequence[int], *, width: int = 620
) -> str:
    """Vertical bars of counts per bin (log-spaced edges shown under the axis)."""
    left, top, plot_h = 40, 24, 120
    height = top + plot_h + 34
    used = [i for i, c in enumerate(counts) if c > 0]
    lo, hi = (used[0], used[-1] + 1) if used else (0, len(counts))
    lo, hi = max(0, lo - 1), min(len(counts), hi + 1)
    shown = list(range(lo, hi))
    bar_w = (width - left - 10) / max(len(shown), 1)
    peak = max(counts, default=0) or 1
    body = [
        f"<line x1='{left}' y1='{top + plot_h}' x2='{width - 8}' y2='{top + plot_h}' stroke='#888'/>"
    ]
    for j, i in enumerate(shown):
        h = counts[i] / peak * plot_h
        x = left + j * bar_w
        body.append(
            f"<rect class='bar' data-value='{counts[i]}' data-bin='{i}' x='{x:.1f}' "
            f"y='{top + plot_h - h:.1f}' width='{max(bar_w - 1, 1):.1f}' height='{h:.1f}' "
            f"fill='#f79009'><title>[{_num(edges[i])}, {_num(edges[i + 1])}): {counts[i]}</title></rect>"
        )
        if j % 2 == 0:
            body.append(
                f"<text x='{x:.1f}' y='{top + plot_h + 14}' font-size='9'>{_num(edges[i])}</text>"
            )
    body.append(f"<text x='4' y='{top + 10}' font-size='9'>{peak}</text>")
    body.append(
        f"<text x='{left}' y='{height - 4}' font-size='10'>activation (log-spaced bins)</text>"
    )
    return _svg(kind, width, height, title, body)


def heatmap(
    kind: str,
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    values: Sequence[Sequence[float | None]],
    *,
    nodes: Sequence[Sequence[str | None]] | None = None,
    link: Link | None = None,
    cell: int = 22,
) -> str:
    """Cells coloured by signed value (None: not scored), rows × columns, with a legend."""
    left, top = 70, 40
    width = left + cell * max(len(columns), 1) + 90
    height = top + cell * max(len(rows), 1) + 14
    finite = [abs(v) for row in values for v in row if v is not None]
    scale = max(finite, default=0.0) or 1.0
    body = []
    for j, name in enumerate(columns):
        body.append(
            f"<text x='{left + j * cell + cell / 2:.1f}' y='{top - 6}' text-anchor='middle' "
            f"font-size='10'>{_esc(name)}</text>"
        )
    for i, name in enumerate(rows):
        y = top + i * cell
        body.append(
            f"<text x='{left - 6}' y='{y + cell / 2 + 4:.1f}' text-anchor='end' font-size='10'>"
            f"{_esc(name)}</text>"
        )
        for j, value in enumerate(values[i]):
            x = left + j * cell
            if value is None:
                body.append(
                    f"<rect x='{x}' y='{y}' width='{cell - 1}' height='{cell - 1}' fill='#f2f4f7'/>"
                )
                continue
            node = nodes[i][j] if nodes is not None else None
            rect = (
                f"<rect class='cell' data-value='{value:.6g}'"
                + (f" data-node='{_esc(node)}'" if node else "")
                + f" x='{x}' y='{y}' width='{cell - 1}' height='{cell - 1}' "
                f"fill='{_color(value, scale)}' stroke='{_GRID}' stroke-width='0.5'>"
                f"<title>{_esc(node or f'{name} {columns[j]}')}: {_num(value)}</title></rect>"
            )
            body.append(_linked(rect, node, link))
    lx = left + cell * max(len(columns), 1) + 12
    body.append(f"<rect x='{lx}' y='{top}' width='12' height='12' fill='{_POS}'/>")
    body.append(f"<text x='{lx + 16}' y='{top + 10}' font-size='10'>+{_num(scale)}</text>")
    body.append(f"<rect x='{lx}' y='{top + 18}' width='12' height='12' fill='{_NEG}'/>")
    body.append(f"<text x='{lx + 16}' y='{top + 28}' font-size='10'>−{_num(scale)}</text>")
    return _svg(kind, width, height, title, body)


def scatter(
    kind: str,
    title: str,
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    nodes: Sequence[str | None] | None = None,
    link: Link | None = None,
    xlabel: str = "",
    ylabel: str = "",
    size: int = 360,
) -> str:
    """Points (x, y) with the y = x line; each point a node when ``nodes`` is given."""
    pad, top = 44, 24
    lo = min([0.0, *xs, *ys])
    hi = max([0.0, *xs, *ys])
    if hi - lo <= 0:
        hi = lo + 1.0
    plot = size - pad - 10

    def px(v: float) -> float:
        return pad + (v - lo) / (hi - lo) * plot

    def py(v: float) -> float:
        return top + plot - (v - lo) / (hi - lo) * plot

    body = [
        f"<rect x='{pad}' y='{top}' width='{plot}' height='{plot}' fill='none' stroke='{_GRID}'/>",
        f"<line x1='{px(lo):.1f}' y1='{py(lo):.1f}' x2='{px(hi):.1f}' y2='{py(hi):.1f}' "
        "stroke='#888' stroke-dasharray='4 3'/>",
        f"<text x='{pad}' y='{size + 8}' font-size='10'>{_esc(xlabel)} ({_num(lo)} … {_num(hi)})</text>",
        f"<text x='10' y='{top + plot / 2:.0f}' font-size='10' transform='rotate(-90 10 "
        f"{top + plot / 2:.0f})' text-anchor='middle'>{_esc(ylabel)}</text>",
    ]
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        node = nodes[i] if nodes is not None else None
        dot = (
            f"<circle class='point' data-x='{x:.6g}' data-y='{y:.6g}' data-value='{y:.6g}'"
            + (f" data-node='{_esc(node)}'" if node else "")
            + f" cx='{px(x):.1f}' cy='{py(y):.1f}' r='4' fill='{_POS}' fill-opacity='0.7'>"
            f"<title>{_esc(node or '')} {xlabel} {_num(x)}, {ylabel} {_num(y)}</title></circle>"
        )
        body.append(_linked(dot, node, link))
    return _svg(kind, size + 10, size + 14, title, body)


def strips(
    kind: str,
    title: str,
    labels: Sequence[str],
    samples: Sequence[Sequence[float]],
    *,
    nodes: Sequence[str | None] | None = None,
    link: Link | None = None,
    width: int = 620,
) -> str:
    """One row per label: every sample a tick, the mean a diamond (a distribution per row)."""
    label_w, row_h, top = 170, 18, 24
    values = [v for row in samples for v in row if math.isfinite(v)]
    lo, hi = min([0.0, *values]), max([0.0, *values])
    if hi - lo <= 0:
        hi = lo + 1.0
    span = width - label_w - 20

    def px(v: float) -> float:
        return label_w + (v - lo) / (hi - lo) * span

    height = top + row_h * max(len(labels), 1) + 22
    body = [
        f"<line x1='{px(0):.1f}' y1='{top}' x2='{px(0):.1f}' y2='{height - 20}' stroke='#888'/>"
    ]
    for i, (label, row) in enumerate(zip(labels, samples, strict=True)):
        y = top + i * row_h + row_h / 2
        finite = [v for v in row if math.isfinite(v)]
        node = nodes[i] if nodes is not None else None
        body.append(
            f"<text x='{label_w - 6}' y='{y + 4:.1f}' text-anchor='end'>{_esc(label[:28])}</text>"
        )
        ticks = "".join(
            f"<line class='sample' data-value='{v:.6g}' x1='{px(v):.1f}' y1='{y - 5:.1f}' "
            f"x2='{px(v):.1f}' y2='{y + 5:.1f}' stroke='{_NEG if v < 0 else _POS}' "
            "stroke-opacity='0.6'/>"
            for v in finite
        )
        if finite:
            mean = sum(finite) / len(finite)
            ticks += (
                f"<path class='mean' data-value='{mean:.6g}' d='M{px(mean):.1f} {y - 6:.1f} l5 6 "
                f"l-5 6 l-5 -6 z' fill='#101828'><title>{_esc(label)}: mean {_num(mean)} over "
                f"{len(finite)}</title></path>"
            )
        body.append(_linked(f"<g class='row'>{ticks}</g>", node, link))
    body.append(f"<text x='{label_w}' y='{height - 6}' font-size='10'>{_num(lo)}</text>")
    body.append(
        f"<text x='{width - 10}' y='{height - 6}' font-size='10' text-anchor='end'>{_num(hi)}</text>"
    )
    return _svg(kind, width, height, title, body)
