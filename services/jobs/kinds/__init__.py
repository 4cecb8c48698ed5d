"""The job kinds, registered once: everything that depends on a job's kind reads this table.

The runner, the workers, the driver's checks, the results reader, the CLI's
``results``, the HTML report, the HTTP results routes and the browser (through
``GET /api/result-views``) all look a kind up here. A new kind is a module
under this package (a :class:`~circuitscan.services.jobs.job_kind.JobKind`)
plus one line below; importing this table imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import Any

from circuitscan.services.jobs.job_kind import JobKind
from circuitscan.services.jobs.kinds.ablation_scan import AblationScanKind
from circuitscan.services.jobs.kinds.attribute import AttributeKind
from circuitscan.services.jobs.kinds.cache import CacheKind
from circuitscan.services.jobs.kinds.dfa import DFAKind
from circuitscan.services.jobs.kinds.splice_eval import SpliceEvalKind

JOB_KINDS: dict[str, JobKind[Any, Any]] = {
    kind.name: kind
    for kind in (
        CacheKind(),
        AttributeKind(),
        SpliceEvalKind(),
        AblationScanKind(),
        DFAKind(),
    )
}


def job_kind(name: str) -> JobKind[Any, Any]:
    """The registered kind called ``name`` (a job's ``spec.job.kind``, a result's ``kind``)."""
    try:
        return JOB_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown job kind {name!r}; known: {sorted(JOB_KINDS)}") from None
