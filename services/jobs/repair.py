"""``circuitscan repair STORE``: put right what ``circuitscan verify`` finds, then check again.

What needs no model is done in place, under the store's writer lease: a
layout document that is missing or damaged is written back from the copy the
job record keeps (``job.json``); a missing or damaged job record is rebuilt
from the layout document and the results that pass their own checksums; a
missing, stale or damaged merged index is rebuilt from the committed shards'
own summaries (the same bytes an undamaged run wrote). What needs the job's
model (a shard whose bytes or manifest entry are damaged, a job result that
is damaged or missing though the job wrote it) is the job resumed with every
committed shard read back (``resume --verify``): damaged result documents
are dropped first, the damaged shards are uncommitted and recomputed, the
result merged again and the index rebuilt. A layout document with no intact
copy cannot be repaired in place (one line says so).
"""

from __future__ import annotations

from collections.abc import Callable

from circuitscan.schemas.errors import StoreCorruptionError
from circuitscan.services.store.backends import open_location
from circuitscan.services.store.errors import CorruptLayoutError
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.integrity import (
    StoreProblem,
    StoreReport,
    result_kinds,
    verify_store,
)
from circuitscan.services.store.job_record import read_record, rebuild_record
from circuitscan.services.store.lease import StoreLease
from circuitscan.services.store.results import RESULTS_PREFIX, delete_job_result, read_result
from circuitscan.services.store.store_keys import LAYOUT_KEY

_NEEDS_THE_JOB = {"manifest", "shard", "result"}


def repair_store(
    url: str,
    *,
    address: str | None = None,
    echo: Callable[[str], None] | None = None,
    keep_actors: bool = False,
) -> StoreReport:
    """Repair the store at ``url`` and return a fresh verification (empty when all is well).

    ``keep_actors``: the resume leaves its workers alive for the next job of this process.
    """
    say = echo or (lambda _line: None)
    report = verify_store(url)
    if not report.problems:
        return report
    for line in report.render():
        say(f"found {line}")
    layout = [p for p in report.problems if p.kind == "layout"]
    if layout:
        if not layout[0].repairable:
            raise CorruptLayoutError(layout[0].message)
        with _lease(url, say):
            _restore_layout(url, say)
        report = verify_store(url)
    kinds = {problem.kind for problem in report.problems}
    if kinds & _NEEDS_THE_JOB:
        store = FeatureStore.open(url)
        if store.layout.job_spec is None:
            say("the store records no job spec: only what needs no model is repaired")
        else:
            from circuitscan.services.jobs.runner import resume_job

            with _lease(url, say):  # dropped results are recomputed by the resume
                _drop_damaged_results(store, report.problems, say)
            say("resuming the job to recompute what is damaged")
            resume_job(url, address=address, echo=say, verify=True, keep_actors=keep_actors)
        report = verify_store(url)
        kinds = {problem.kind for problem in report.problems}
    if kinds & {"record", "index"}:
        with _lease(url, say):
            if "record" in kinds:
                _rebuild_record(url, say)
            if "index" in kinds:
                _rebuild_index(url, say)
    return verify_store(url)


class _lease:
    """The store's writer lease, held as a job holds it (one writer per store)."""

    def __init__(self, url: str, say: Callable[[str], None]) -> None:
        self.lease = StoreLease(url, job="repair", say=say)

    def __enter__(self) -> None:
        self.lease.take()

    def __exit__(self, *_exc: object) -> None:
        self.lease.release()


def _restore_layout(url: str, say: Callable[[str], None]) -> None:
    location = open_location(url)
    record = read_record(location, url)
    assert record is not None and record.layout is not None  # verify said it is repairable
    location.write_bytes(LAYOUT_KEY, record.layout)
    say(f"wrote {LAYOUT_KEY} back from the job record's copy")


def _drop_damaged_results(
    store: FeatureStore, problems: list[StoreProblem], say: Callable[[str], None]
) -> None:
    kinds = set()
    for problem in problems:
        if problem.kind == "result" and problem.key is not None:
            rest = problem.key.removeprefix(RESULTS_PREFIX)
            kinds.add(rest.split("/")[0].removesuffix(".json"))
    for kind in sorted(kinds):
        delete_job_result(store, kind)
        say(f"dropped the damaged {kind} result to recompute it")


def _rebuild_record(url: str, say: Callable[[str], None]) -> None:
    store = FeatureStore.open(url)
    good = []
    for kind in result_kinds(store):
        try:
            read_result(store, kind)  # the damaged record is not consulted: its own check only
        except StoreCorruptionError:
            continue  # a result that fails its check is not recorded as the job's
        good.append(kind)
    rebuild_record(store.location, store.location.read_bytes(LAYOUT_KEY), good)
    say(f"rebuilt the job record from the layout document and {len(good)} job result(s)")


def _rebuild_index(url: str, say: Callable[[str], None]) -> None:
    store = FeatureStore.open(url)
    if store.layout.sites:
        store.index.rebuild()
        say(f"rebuilt the merged index from {len(store.committed_shard_ids())} shards")
