"""A feature page drawn: its SVG figures and its examples with per-token highlighting.

The figures (histogram, promoted / suppressed tokens, reading heads) are the
same markup in the report and the browser; the report also renders the
examples here, the browser from the same payload in JavaScript.
"""

from __future__ import annotations

import html

from circuitscan.schemas.feature_page import FeaturePage, PageExample
from circuitscan.services.reports.result_figures import SvgFigure, head_node
from circuitscan.services.reports.svg import Link, bar_chart, histogram


def _token_label(token: str | None, token_id: int) -> str:
    return repr(token)[1:-1] if token is not None else f"[{token_id}]"


def feature_page_figures(page: FeaturePage, link: Link | None = None) -> list[SvgFigure]:
    """Histogram, logit effects and reading heads of a feature page (those it has)."""
    where = f"{page.site} #{page.feature}"
    title = f"{where}: activations over the store ({page.histogram.covered} counted)"
    figures = [
        SvgFigure(
            kind="feature",
            name="histogram",
            title=title,
            svg=histogram("histogram", title, page.histogram.edges, page.histogram.counts),
        )
    ]
    if page.promoted is not None and page.suppressed is not None:
        effects = page.promoted + list(reversed(page.suppressed))
        title = f"{where}: logit effects W_U·norm(d̂), top ±{len(page.promoted)} tokens"
        svg = bar_chart(
            "logit-effects",
            title,
            [_token_label(e.token, e.token_id) for e in effects],
            [e.logit for e in effects],
        )
        figures.append(SvgFigure(kind="feature", name="logit-effects", title=title, svg=svg))
    if page.reading_heads:
        keys = [head_node(h.layer, h.head) for h in page.reading_heads]
        title = f"{where}: heads reading the direction (‖norm(d̂)·W_V W_O‖)"
        svg = bar_chart(
            "reading-heads",
            title,
            [f"L{h.layer}.H{h.head}" for h in page.reading_heads],
            [h.gain for h in page.reading_heads],
            nodes=keys,
            link=link,
        )
        figures.append(SvgFigure(kind="feature", name="reading-heads", title=title, svg=svg))
    return figures


def example_html(example: PageExample, scale: float) -> str:
    """One example as token spans, each shaded by the feature's value there."""
    spans = []
    for i, (token_id, value) in enumerate(zip(example.token_ids, example.values, strict=True)):
        token = example.tokens[i] if example.tokens is not None else None
        alpha = 0.0 if scale <= 0 else min(1.0, max(value, 0.0) / scale)
        hit = " hit" if i == example.hit_index else ""
        spans.append(
            f"<span class='tok{hit}' data-value='{value:.4g}' title='{value:.4g}' "
            f"style='background: rgba(247,144,9,{alpha:.2f})'>"
            f"{html.escape(token if token is not None else f'[{token_id}]')}</span>"
        )
    return (
        f"<li class='example' data-prompt='{example.prompt}'><span class='context'>"
        + "".join(spans)
        + f"</span> <small>prompt {example.prompt} pos {example.position} · "
        f"{example.activation:.4g}</small></li>"
    )


def feature_page_html(page: FeaturePage, anchor: str, link: Link | None = None) -> str:
    """The whole feature page as one HTML block (``id=anchor``) for the report."""
    s = page.summary
    scale = max([s.max, *(e.activation for e in page.top)], default=0.0)
    parts = [
        f"<div class='feature-page' id='{html.escape(anchor)}'>",
        f"<h3>Feature {page.feature} · {html.escape(page.site)}</h3>",
        f"<p>{s.count} activations, density {page.density:.3g}, max {s.max:.4g}, "
        f"mean when active {s.mean_when_active:.4g}.</p>",
    ]
    parts += [f.svg for f in feature_page_figures(page, link)]
    parts.append("<h4>Top examples</h4><ol class='examples'>")
    parts += [example_html(e, scale) for e in page.top]
    parts.append("</ol>")
    if page.sampled:
        parts.append("<h4>Weaker examples (sampled)</h4><ol class='examples'>")
        parts += [example_html(e, scale) for e in page.sampled]
        parts.append("</ol>")
    if page.pushes:
        rows = "".join(
            f"<tr><td>{p.prompt}</td><td>{p.position}</td><td>{p.attribution:.4g}</td></tr>"
            for p in page.pushes
        )
        parts.append(
            "<h4>Where it pushes the metric most (a·∂m/∂a)</h4><table class='pushes'>"
            f"<tr><th>prompt</th><th>position</th><th>a·g</th></tr>{rows}</table>"
        )
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in page.notes]
    parts.append("</div>")
    return "".join(parts)
