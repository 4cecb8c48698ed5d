"""Where circuit-analysis outputs go: JSON files, the HTML report, and a feature store.

Everything a store receives goes through the store's own API: a splice
evaluation becomes its ``splice_eval`` job result (what readers of splice jobs
expect), every other analysis its ``analyses/<kind>`` document.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from circuitscan.schemas.analyses import SpliceEvalOutput
from circuitscan.schemas.job_results import SpliceEvalJobResult
from circuitscan.services.reports import Section, write_report


def save_outputs(
    out_dir: Path, outputs: list[Any], sections: list[Section], title: str,
    store: str | None = None,
) -> Path:  # fmt: skip
    """Write each output as ``<kind>.json``, the HTML report, and (optionally) into a store."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for output in outputs:
        (out_dir / f"{output.kind}.json").write_text(output.model_dump_json(indent=1))
    index = write_report(out_dir, sections, title=title)
    if store is not None:
        save_to_store(store, outputs)
    return index


def splice_job_result(output: SpliceEvalOutput) -> SpliceEvalJobResult:
    """A splice evaluation as the job result a splice_eval job would have written.

    Its job hash names the analysis context (model, SAEs, prompts), so the same
    analysis saved twice is recognisably the same result.
    """
    digest = hashlib.sha256(output.context.model_dump_json().encode()).hexdigest()[:16]
    return SpliceEvalJobResult(
        job_hash=f"analyze-{digest}",
        n_prompts=output.context.n_prompts,
        reference_prompts=output.reference_prompts,
        rows=output.rows,
    )


def save_to_store(url: str, outputs: list[Any]) -> None:
    """Put outputs into an existing feature store (see the module docstring for where)."""
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.analyses import write_analysis
    from circuitscan.services.store.results import write_job_result

    opened = FeatureStore.open(url)
    for output in outputs:
        if isinstance(output, SpliceEvalOutput):
            write_job_result(opened, splice_job_result(output))
        else:
            write_analysis(opened, output)
