"""``circuitscan report STORE``: an offline HTML report of whatever a store holds.

Each job result gets its kind's section (the same as in the demo's report);
a cache store gets, per SAE site, its most active features with their top
example in context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from circuitscan.services.jobs.kinds import job_kind
from circuitscan.services.reports import Figure, Section, Table, attribution_bars, write_report
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.errors import ResultNotFoundError
from circuitscan.services.store.queries import top_examples
from circuitscan.services.store.results import list_results, read_result

Decode = Callable[[Sequence[int]], list[str]]


def cache_sections(
    store: FeatureStore, plots: Path, decode: Decode | None, top: int = 15
) -> list[Section]:
    """Per site: features by firing count, with summaries and each one's top hit."""
    sections = []
    tokens = max(store.n_tokens(), 1)
    for site in store.layout.sites:
        index = store.feature_index(site.label)
        by_count = np.argsort(-index.count, kind="stable")[:top]
        order = [int(f) for f in by_count if index.count[f] > 0]
        rows: list[list[object]] = []
        for feature in order:
            hits = top_examples(store, site.label, feature, 1, context=6, decode=decode)
            context = ""
            if hits:
                hit = hits[0]
                pieces = hit.context or [str(t) for t in hit.context_token_ids]
                pieces = [f"[{p}]" if i == hit.hit_index else p for i, p in enumerate(pieces)]
                context = "".join(pieces)
            count = int(index.count[feature])
            rows.append(
                [
                    feature,
                    count,
                    count / tokens,
                    float(index.total[feature]) / count,
                    float(index.max[feature]),
                    context,
                ]
            )
        figures = []
        if order:
            bars = attribution_bars(
                [f"#{f}" for f in order],
                [float(index.count[f]) / tokens for f in order],
                plots / f"firing_{site.label}.png",
                title=f"{site.label}: most frequent features",
                xlabel="firing frequency (fraction of tokens)",
            )
            figures.append(Figure(bars, "Most frequently active features."))
        sections.append(
            Section(
                title=f"Site {site.label} ({site.hook_name}, d_sae {site.d_sae})",
                paragraphs=[f"{store.n_prompts()} prompts, {store.n_tokens()} tokens cached."],
                tables=[
                    Table(
                        ["feature", "count", "frequency", "mean when active", "max", "top hit"],
                        rows,
                    )
                ],
                figures=figures,
            )
        )
    return sections


def write_store_report(
    store_url: str, out_dir: Path, decode: Decode | None = None, by: str | None = None
) -> Path:
    """Write ``out_dir/index.html`` for the store at ``store_url``; returns its path.

    ``by``: also a grouped table of each job result per value of that prompt field.
    """
    from circuitscan.services.jobs.breakdown import breakdown_section

    store = FeatureStore.open(store_url)
    plots = out_dir / "plots"
    sections = cache_sections(store, plots, decode) if store.layout.sites else []
    for info in list_results(store):
        result = read_result(store, info.kind)
        kind = job_kind(result.kind)
        sections.append(kind.report_section(result, plots))
        if by is not None:
            sections.append(breakdown_section(kind.breakdown(store, result, by, 25)))
    from circuitscan.services.reports.store_visuals import visual_sections

    sections += visual_sections(store, decode)  # figures, feature and head pages
    if not sections:
        raise ResultNotFoundError(
            f"{store_url} holds no committed data or job result to report on yet"
        )
    spec = store.layout.job_spec or {}
    title = f"circuitscan — {spec.get('name', 'store')} ({store_url})"
    return write_report(out_dir, sections, title=title)
