"""The report's figures of a store: result maps, feature pages and head pages, linked together.

The same SVG figures the browser shows (``result_figures``,
``feature_page_html``), inline in ``index.html``; a node in a figure links to
its feature page or head section further down the report when the report
has one (feature pages need the feature's site cached in this store). The
results may come from other stores than the pages (the demo's report: one
store per job, pages from its cache store).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import numpy as np

from circuitscan.schemas.attribution import Node
from circuitscan.schemas.job_results import AblationJobResult, AttributionJobResult, DFAJobResult
from circuitscan.services.reports.feature_page_html import feature_page_html
from circuitscan.services.reports.html_report import Section
from circuitscan.services.reports.result_figures import (
    HEAD_KINDS,
    feature_node,
    head_node,
    head_rows,
    result_figures,
)
from circuitscan.services.store.feature_page import feature_page
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.results import list_results, read_result

Decode = Callable[[Sequence[int]], list[str]]
PAGES_PER_SITE = 5
MAX_PAGES = 24
MAX_HEADS = 24

_STYLE = """<style>
svg.figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
.feature-page { border-top: 1px solid #ccc; margin-top: 1.5em; }
.context { font-family: monospace; white-space: pre-wrap; }
.tok { white-space: pre; border-radius: 2px; }
.tok.hit { outline: 1px solid #b54708; font-weight: bold; }
.note { color: #667085; }
</style>"""


def _anchor(key: str) -> str:
    return "page-" + "".join(c if c.isalnum() else "-" for c in key)


def _referenced(
    stores: Sequence[FeatureStore],
) -> tuple[list[tuple[str, int]], list[tuple[int, int]]]:
    """Features (site, id) and heads (layer, head) the stores' results name, best first."""
    features: list[tuple[str, int]] = []
    heads: list[tuple[int, int]] = []
    results = [read_result(store, info.kind) for store in stores for info in list_results(store)]
    for result in results:
        if isinstance(result, AttributionJobResult):
            for effect in result.top:
                try:
                    node = Node.parse(effect.node)
                except ValueError:
                    continue
                if node.kind == "feature" and node.index is not None:
                    features.append((node.site.label, node.index))
                elif node.kind in HEAD_KINDS and node.index is not None:
                    heads.append((node.layer, node.index))
        elif isinstance(result, (AblationJobResult, DFAJobResult)):
            features += [(result.site, f.feature) for f in result.features[:PAGES_PER_SITE]]
    return list(dict.fromkeys(features)), list(dict.fromkeys(heads))


def visual_sections(
    store: FeatureStore,
    decode: Decode | None = None,
    *,
    result_stores: Sequence[FeatureStore] | None = None,
) -> list[Section]:
    """Result figures, feature pages and head pages for the report (those the store has).

    ``result_stores``: where the job results come from (default: ``store``
    itself); feature pages always come from ``store``'s cached sites.
    """
    sources = [store] if result_stores is None else list(result_stores)
    widths = {site.label: site.d_sae for site in store.layout.sites}
    named_features, named_heads = _referenced(sources)
    # Pages only for features this store caches (a result may name another store's SAE).
    pages = [(site, f) for site, f in named_features if 0 <= f < widths.get(site, 0)]
    for site in store.layout.sites:  # and the most active features of every cached site
        index = store.feature_index(site.label)
        busiest = np.argsort(-index.count, kind="stable")[:PAGES_PER_SITE]
        pages += [(site.label, int(f)) for f in busiest if index.count[f] > 0]
    pages = list(dict.fromkeys(pages))[:MAX_PAGES]
    heads = named_heads[:MAX_HEADS]
    targets = {feature_node(s, f) for s, f in pages} | {head_node(la, h) for la, h in heads}

    def link(key: str) -> str | None:
        return f"#{_anchor(key)}" if key in targets else None

    sections = []
    figures = [figure for source in sources for figure in result_figures(source, link)]
    if figures:
        sections.append(
            Section(
                title="Result maps",
                paragraphs=[
                    "Attribution heatmaps per node kind and position (estimate beside exact Δm "
                    "where verified), the estimate-vs-exact scatter, feature bars, ablation Δm "
                    "per prompt and DFA splits. Cells, points and bars link to their page below."
                ],
                raw_html=[_STYLE, *(f.svg for f in figures)],
            )
        )
    if pages:
        blocks = [
            feature_page_html(
                feature_page(store, site, feature, decode=decode),
                _anchor(feature_node(site, feature)),
                link,
            )
            for site, feature in pages
        ]
        sections.append(
            Section(
                title="Feature pages",
                paragraphs=[
                    "Activation histogram over the store, density, top and sampled weaker "
                    "examples (each token shaded by the feature's value there), the tokens the "
                    "decoder direction promotes and suppresses through the unembedding, the "
                    "heads that read it, and where it pushes the metric most."
                ],
                raw_html=[_STYLE, *blocks],
            )
        )
    if heads:
        blocks = []
        for layer, head in heads:
            found = [row for source in sources for row in head_rows(source, layer, head)]
            rows = sorted(found, key=lambda r: -abs(r[1]))
            cells = "".join(
                f"<tr><td class='text'>{html.escape(node)}</td><td>{estimate:.4g}</td>"
                f"<td>{'—' if exact is None else f'{exact:.4g}'}</td></tr>"
                for node, estimate, exact in rows
            )
            blocks.append(
                f"<div id='{_anchor(head_node(layer, head))}'><h3>Head L{layer}.{head}</h3>"
                f"<table><tr><th>node</th><th>estimate</th><th>exact Δm</th></tr>{cells}"
                "</table></div>"
            )
        sections.append(Section(title="Heads", raw_html=blocks))
    return sections
