"""The demo's HTML report: its jobs, each job result as its kind shows it, then the figures.

The figures are those ``circuitscan report`` draws (``store_visuals``): the
attribution heatmaps per node kind and position with exact beside estimate,
the AtP-vs-exact scatter, feature bars, ablation Δm per prompt and DFA by
head and source role, taken from every job's store, with the cache store's
feature pages and the heads' pages they link to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from circuitscan.schemas.job_results import AblationJobResult, AttributionJobResult, JobResult
from circuitscan.schemas.jobs import JobSpec
from circuitscan.services.jobs.kinds import job_kind
from circuitscan.services.reports import Section, Table, write_report
from circuitscan.services.reports.store_visuals import visual_sections
from circuitscan.services.store import FeatureStore

Decode = Callable[[Sequence[int]], list[str]]


def write_demo_report(
    out_dir: Path,
    specs: dict[str, JobSpec],
    attribution: AttributionJobResult,
    ablation: AblationJobResult,
    splice: JobResult,
    dfa: JobResult | None = None,
    decode: Decode | None = None,
) -> Path:
    plots = out_dir / "plots"
    sections = [
        Section(
            title="Jobs",
            tables=[
                Table(
                    ["step", "job", "store"],
                    [[step, spec.name, spec.store] for step, spec in specs.items()],
                )
            ],
        ),
    ]
    for result in (attribution, ablation, splice, dfa):
        if result is not None:
            sections.append(job_kind(result.kind).report_section(result, plots))
    if "cache" in specs:
        stores = [FeatureStore.open(spec.store) for spec in specs.values()]
        pages = stores[list(specs).index("cache")]
        sections += visual_sections(pages, decode, result_stores=stores)
    return write_report(out_dir, sections, title="circuitscan — IOI on the default model")
