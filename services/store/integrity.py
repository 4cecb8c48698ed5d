"""Checking a whole store against its own checksums (``circuitscan verify``), read-only.

Every object a reader trusts is checked: the layout document, each manifest
entry, every committed shard's bytes against its entry, the merged index
against its pointer, and each job result against its checksum. Each problem
is one line naming the object, with what repairs it; :func:`verify_store`
returns them all (it never stops at the first) and changes nothing.

The job record (``job.json``, :mod:`job_record`) is checked too: it holds a
copy of the layout document, so a layout document that is missing, damaged or
not the one the store was created with is reported against that copy, and it
lists the results the job wrote, so a deleted result document or array is
found (a store without a record cannot tell a deleted result from one never
written).

Problems have a kind so that ``circuitscan repair`` knows what it can do:
``index`` is rebuilt from the shards' own summaries and ``layout`` written
back from the record's copy, both without a model; ``record`` is rebuilt from
the layout document and the results that pass their own checksums;
``manifest``, ``shard`` and ``result`` need the job resumed (its model and
SAEs).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.errors import StoreCorruptionError
from circuitscan.services.store.backends import Backend, list_keys, open_location
from circuitscan.services.store.errors import CorruptLayoutError, CorruptRecordError
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.job_record import JobRecord, read_record
from circuitscan.services.store.results import RESULTS_PREFIX, read_result
from circuitscan.services.store.shard_io import checksum
from circuitscan.services.store.store_keys import LAYOUT_KEY, RECORD_KEY

ProblemKind = Literal["layout", "record", "manifest", "shard", "index", "result"]


class StoreProblem(BaseModel):
    """One thing wrong with a store."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ProblemKind = Field(description="Which kind of object is damaged.")
    message: str = Field(description="One line naming the object and what repairs it.")
    shard_id: int | None = Field(
        default=None, description="The shard concerned (manifest and shard problems)."
    )
    key: str | None = Field(
        default=None, description="The damaged object, relative to the store (result problems)."
    )
    repairable: bool = Field(
        default=True, description="Whether `circuitscan repair` can put it right."
    )


class StoreReport(BaseModel):
    """What ``circuitscan verify`` found."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    url: str = Field(description="The store checked.")
    shards_checked: int = Field(description="Committed shards whose bytes were read back.")
    results_checked: int = Field(description="Job result documents checked.")
    problems: list[StoreProblem] = Field(description="Everything wrong, one line each.")

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> list[str]:
        """The report as lines: each problem, or one line saying every check passed."""
        if self.ok:
            return [
                f"{self.url}: {self.shards_checked} shards, the index and "
                f"{self.results_checked} job results match their checksums"
            ]
        return [f"{p.kind}: {p.message}" for p in self.problems]


def result_kinds(store: FeatureStore) -> list[str]:
    """The kinds of job result the store holds (``results/<kind>.json``)."""
    return sorted(
        key.removeprefix(RESULTS_PREFIX).removesuffix(".json")
        for key in list_keys(store.backend, RESULTS_PREFIX)
        if key.endswith(".json") and "/" not in key.removeprefix(RESULTS_PREFIX)
    )


def verify_store(url: str, *, shard_data: bool = True) -> StoreReport:
    """Every problem of the store at ``url`` (``shard_data``: read every shard back too).

    Reading every shard back downloads the whole store from object storage;
    ``shard_data=False`` checks everything else.
    """
    location = open_location(url)
    try:
        record: JobRecord | None = read_record(location, url)
        record_problem = None if record is not None else _missing_record(url)
    except CorruptRecordError as exc:
        record, record_problem = None, StoreProblem(kind="record", message=str(exc))
    layout_problem = _layout_problem(location, url, record)
    if layout_problem is not None:  # nothing else can be read without the layout
        problems = [layout_problem] + ([record_problem] if record_problem else [])
        return StoreReport(url=url, shards_checked=0, results_checked=0, problems=problems)
    store = FeatureStore.open(url)
    problems = [
        StoreProblem(kind="manifest", message=message, shard_id=shard_id)
        for shard_id, message in sorted(store.manifest.damaged().items())
    ]
    if record_problem is not None:
        problems.append(record_problem)
    committed = store.committed_entries()
    checked = 0
    if shard_data:
        for shard_id, entry in sorted(committed.items()):
            bad = store.manifest.checksum_mismatches(entry)
            store.manifest.forget_recent()
            checked += 1
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                problems.append(
                    StoreProblem(
                        kind="shard",
                        shard_id=shard_id,
                        message=f"shard {shard_id} of {url} is corrupt (checksum mismatch in "
                        f"{bad[:3]}{more}); `circuitscan repair` recomputes it",
                    )
                )
    if not problems:  # the index is built from the shards: only worth checking over good ones
        problems += [StoreProblem(kind=k, message=m) for k, m in store.index.problems()]
    present = result_kinds(store)
    if record is not None:  # every result a job writes is recorded as it is written
        problems += [
            StoreProblem(
                kind="record",
                message=f"job record {RECORD_KEY} of {url} does not list the job result "
                f"{RESULTS_PREFIX}{kind}.json the store holds; `circuitscan repair` rebuilds "
                "the record",
            )
            for kind in present
            if kind not in record.kinds()
        ]
    kinds = sorted(set(present) | set(record.kinds() if record else []))
    for kind in kinds:
        try:
            read_result(store, kind)
        except StoreCorruptionError as exc:
            key = f"{RESULTS_PREFIX}{kind}.json"
            problems.append(StoreProblem(kind="result", message=str(exc), key=key))
    written = record.results if record is not None else {}
    arrays = {k: v for k, v in written.items() if "/" in k.removeprefix(RESULTS_PREFIX)}
    for key, raw in sorted(location.read_many(sorted(arrays)).items()):
        if raw is None or checksum(raw) != arrays[key]:
            state = "missing" if raw is None else "not the one the job wrote"
            problems.append(
                StoreProblem(
                    kind="result",
                    key=key,
                    message=f"job result array {key} of {url} is {state} ({RECORD_KEY} "
                    "records it); `circuitscan repair` recomputes it",
                )
            )
    return StoreReport(
        url=url, shards_checked=checked, results_checked=len(kinds), problems=problems
    )


def _missing_record(url: str) -> StoreProblem:
    return StoreProblem(
        kind="record",
        message=f"job record {RECORD_KEY} of {url} is missing (the layout's copy and the list "
        "of results the job wrote); `circuitscan repair` rebuilds it",
    )


def _layout_problem(location: Backend, url: str, record: JobRecord | None) -> StoreProblem | None:
    """The layout document's problem, if any: unreadable, missing, or not the recorded copy."""
    copy = record.layout if record is not None else None
    how = (
        f"`circuitscan repair` writes back the copy kept in {RECORD_KEY}"
        if copy is not None
        else f"the store keeps no copy of it ({RECORD_KEY} is missing or damaged): restore it "
        "from a copy of the store, or rerun the job into a new store"
    )
    try:
        FeatureStore.open(url)
    except CorruptLayoutError as exc:
        what = str(exc).split(";")[0]
        return StoreProblem(kind="layout", message=f"{what}; {how}", repairable=copy is not None)
    raw = location.read_bytes(LAYOUT_KEY)
    if copy is not None and raw != copy:
        return StoreProblem(
            kind="layout",
            message=f"layout document {LAYOUT_KEY} of {url} differs from the copy the store "
            f"was created with ({RECORD_KEY}); {how}",
        )
    return None
