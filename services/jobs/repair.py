"""``circuitscan repair STORE``: put right what ``circuitscan verify`` finds, then check again.

What needs no model is done in place: a missing, stale or damaged merged
index is rebuilt from the committed shards' own summaries (the same bytes an
undamaged run wrote). What needs the job's model (a shard whose bytes or
manifest entry are damaged, a job result that fails its checksum) is the
job resumed with every committed shard read back (``resume --verify``):
the damaged shards are uncommitted and recomputed, the result merged again
and the index rebuilt. A damaged layout document cannot be repaired in place.
"""

from __future__ import annotations

from collections.abc import Callable

from circuitscan.services.store.errors import CorruptLayoutError
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.integrity import StoreReport, verify_store
from circuitscan.services.store.lease import StoreLease


def repair_store(
    url: str,
    *,
    address: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> StoreReport:
    """Repair the store at ``url`` and return a fresh verification (empty when all is well)."""
    say = echo or (lambda _line: None)
    report = verify_store(url)
    kinds = {problem.kind for problem in report.problems}
    if "layout" in kinds:
        raise CorruptLayoutError(report.problems[0].message)
    if not kinds:
        return report
    for line in report.render():
        say(f"found {line}")
    if kinds & {"manifest", "shard", "result"}:
        store = FeatureStore.open(url)
        if store.layout.job_spec is None:
            say("the store records no job spec: only its index can be rebuilt")
            _rebuild_index(url, say)
        else:
            from circuitscan.services.jobs.runner import resume_job

            say("resuming the job to recompute what is damaged")
            resume_job(url, address=address, echo=say, verify=True)
    else:
        _rebuild_index(url, say)
    return verify_store(url)


def _rebuild_index(url: str, say: Callable[[str], None]) -> None:
    # One writer per store: the rebuild takes the writer lease as a job does.
    lease = StoreLease(url, job="repair", say=say).take()
    try:
        store = FeatureStore.open(url)
        if store.layout.sites:
            store.index.rebuild()
            say(f"rebuilt the merged index from {len(store.committed_shard_ids())} shards")
    finally:
        lease.release()
