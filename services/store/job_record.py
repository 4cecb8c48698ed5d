"""The job record (``job.json``): what a store must hold, so that a loss is seen and undone.

Two things a store cannot tell from its own objects are kept here:

- a copy of the layout document (``zarr.json``, byte for byte), written when
  the store is created: the layout is what says what the store is, so a
  deleted or damaged one is otherwise beyond repair; with the copy,
  ``circuitscan repair`` writes it back without a model;
- which job results the job wrote (``results/<kind>.json`` and the arrays
  under ``results/<kind>/``) with their checksums, recorded when the job
  writes them and dropped when it deletes them (before recomputing shards):
  a result document that is missing although the job wrote it is damage
  (``verify`` reports it, ``repair`` recomputes it), not "a job that wrote
  none", and an older valid result put back in its place fails its checksum.

The record carries its own checksum (``circuitscan_checksum``). It is written
only by the store's writer (the lease holder). A damaged or missing record is
rebuilt from the layout document and the results that pass their own checksums
(:func:`rebuild_record`): each half of the pair can be restored from the other.
Stores written before the record existed get one the next time a job opens
them for writing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from circuitscan.services.store.backends import Backend
from circuitscan.services.store.errors import CorruptRecordError
from circuitscan.services.store.shard_io import checksum
from circuitscan.services.store.store_keys import LAYOUT_KEY, RECORD_KEY

RESULTS_PREFIX = "results/"
_CHECKSUM = "circuitscan_checksum"


@dataclass
class JobRecord:
    """The layout document's bytes and the job results written, key -> checksum."""

    layout: bytes | None
    results: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        document: dict[str, object] = {
            "layout": None if self.layout is None else self.layout.decode("utf-8"),
            "results": dict(sorted(self.results.items())),
        }
        document[_CHECKSUM] = _digest(document)
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()

    def kinds(self) -> list[str]:
        """Result kinds whose document the job wrote."""
        return sorted(
            key.removeprefix(RESULTS_PREFIX).removesuffix(".json")
            for key in self.results
            if key.endswith(".json") and "/" not in key.removeprefix(RESULTS_PREFIX)
        )


def _digest(document: dict[str, object]) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def read_record(location: Backend, where: str) -> JobRecord | None:
    """The store's job record; None when it has none, CorruptRecordError when it is damaged."""
    raw = location.read_bytes(RECORD_KEY)
    if raw is None:
        return None
    fix = "`circuitscan repair` rebuilds it"
    try:
        document = json.loads(raw)
        if not isinstance(document, dict):
            raise ValueError("not an object")
        claimed = document.pop(_CHECKSUM, None)
        if claimed != _digest(document):
            raise CorruptRecordError(
                f"job record {RECORD_KEY} of {where} fails its checksum; {fix}"
            )
        layout, results = document["layout"], document["results"]
        if not (layout is None or isinstance(layout, str)) or not isinstance(results, dict):
            raise ValueError("fields of the wrong type")
        return JobRecord(
            None if layout is None else layout.encode("utf-8"),
            {str(k): str(v) for k, v in results.items()},
        )
    except (ValueError, KeyError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptRecordError(
            f"job record {RECORD_KEY} of {where} is unreadable ({type(exc).__name__}); {fix}"
        ) from exc


def _readable(location: Backend, where: str) -> JobRecord | None:
    try:
        return read_record(location, where)
    except CorruptRecordError:
        return None


def record_layout(location: Backend, where: str) -> None:
    """Record the layout document as it is now (a new store, or one without a record yet)."""
    record = _readable(location, where) or JobRecord(None)
    record.layout = location.read_bytes(LAYOUT_KEY)
    location.write_bytes(RECORD_KEY, record.to_bytes())


def _result_objects(location: Backend, kind: str) -> dict[str, str]:
    """Checksums of result ``kind``'s document and of the arrays stored under it."""
    keys = [f"{RESULTS_PREFIX}{kind}.json"]
    keys += [key for key in location.list_keys(f"{RESULTS_PREFIX}{kind}/")]
    found = location.read_many(keys)
    return {key: checksum(raw) for key, raw in found.items() if raw is not None}


def record_result(location: Backend, where: str, kind: str) -> None:
    """Record that the job wrote result ``kind`` (its document and arrays, as stored now)."""
    record = _readable(location, where) or JobRecord(location.read_bytes(LAYOUT_KEY))
    record.results = {k: v for k, v in record.results.items() if not _of_kind(k, kind)}
    record.results |= _result_objects(location, kind)
    location.write_bytes(RECORD_KEY, record.to_bytes())


def forget_result(location: Backend, where: str, kind: str) -> None:
    """Record that result ``kind`` is gone on purpose (deleted before recomputing shards)."""
    record = _readable(location, where)
    if record is None or not any(_of_kind(key, kind) for key in record.results):
        return
    record.results = {k: v for k, v in record.results.items() if not _of_kind(k, kind)}
    location.write_bytes(RECORD_KEY, record.to_bytes())


def _of_kind(key: str, kind: str) -> bool:
    return key in (f"{RESULTS_PREFIX}{kind}.json",) or key.startswith(f"{RESULTS_PREFIX}{kind}/")


def rebuild_record(location: Backend, layout: bytes | None, kinds: list[str]) -> None:
    """Write a fresh record: ``layout`` (the intact layout document) and results ``kinds``
    (those whose documents pass their own checksums), as stored now."""
    record = JobRecord(layout)
    for kind in kinds:
        record.results |= _result_objects(location, kind)
    location.write_bytes(RECORD_KEY, record.to_bytes())
