"""The demo's HTML report: its jobs, then each job result as its kind shows it."""

from __future__ import annotations

from pathlib import Path

from circuitscan.schemas.job_results import AblationJobResult, AttributionJobResult, JobResult
from circuitscan.schemas.jobs import JobSpec
from circuitscan.services.jobs.kinds import job_kind
from circuitscan.services.reports import Section, Table, write_report


def write_demo_report(
    out_dir: Path,
    specs: dict[str, JobSpec],
    attribution: AttributionJobResult,
    ablation: AblationJobResult,
    splice: JobResult,
    dfa: JobResult | None = None,
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
    return write_report(out_dir, sections, title="circuitscan — IOI on the default model")
