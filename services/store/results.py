"""Job outputs in a feature store: per-shard partial results and the job-level result.

Per-shard outputs live under the shard's own prefix (``shards/<s>/results/``),
written by the worker that computed the shard right after ``write_shard``;
:func:`write_shard_outputs` returns the shard's manifest entry with checksums
that cover them, so they become visible exactly when the driver commits the
entry, and a retry (``write_shard`` deletes leftovers first) rewrites them.

The job-level result (``results/<kind>.json``) is written by the driver in
one put after every shard is committed; readers trust only it, and only once
it passes its checksum: the document carries ``circuitscan_checksum``, a
digest of the rest of it and of the store's job hash, so an edited value, a
truncated file or another store's result copied in is a CorruptResultError
naming the file (a resume writes it again). The job record (``job.json``,
:mod:`job_record`) keeps the checksum of every result the job wrote: a result
that is missing though the job wrote it, or an older one of the same job put
back, is damage too, not "no result". Documents written before results
carried checksums are read unverified.

Readers for the CLI and HTTP API::

    list_results(store) -> list[JobResultInfo]
    read_result(store, kind=None) -> JobResult
    top_nodes(store, k=20) -> list[NodeEffect]          # attribute jobs
    splice_eval_rows(store) -> list[SpliceEvalRow]      # splice_eval jobs
    ablation_deltas(store, limit=None) -> list[FeatureDelta]   # ablation_scan jobs
    dfa_features(store) -> DFAJobResult                 # dfa jobs: means by head and role
    dfa_tables(store, feature, limit=None) -> list[dict]  # dfa jobs: per-prompt tables

``store`` is a FeatureStore or a store URL.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from circuitscan.schemas.analyses import SpliceEvalRow
from circuitscan.schemas.breakdown import PerPromptArray
from circuitscan.schemas.job_results import (
    AblationJobResult,
    AttributionJobResult,
    DFAJobResult,
    FeatureDelta,
    JobResult,
    NodeEffect,
    SpliceEvalJobResult,
)
from circuitscan.schemas.store import ShardEntry
from circuitscan.services.store.backends import list_keys, read_bytes, write_bytes
from circuitscan.services.store.encoding import open_array, write_array
from circuitscan.services.store.errors import (
    CorruptRecordError,
    CorruptResultError,
    ResultNotFoundError,
    StoreError,
)
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.job_record import (
    JobRecord,
    forget_result,
    read_record,
    record_result,
)
from circuitscan.services.store.shard_io import checksum, object_checksums, shard_prefix
from circuitscan.services.store.store_keys import RECORD_KEY

RESULTS_PREFIX = "results/"
CHECKSUM_FIELD = "circuitscan_checksum"
_RESULT = TypeAdapter(JobResult)


class JobResultInfo(BaseModel):
    """One job result a store holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str = Field(description="Result kind (attribute, ablation_scan, splice_eval, dfa).")
    job_hash: str = Field(description="JobSpec.content_hash() of the job that wrote it.")
    n_prompts: int = Field(description="Prompts the result aggregates.")


@dataclass
class ShardOutputs:
    """A committed shard's partial results: named arrays and JSON documents."""

    arrays: dict[str, np.ndarray]
    documents: dict[str, Any]


def _outputs_prefix(shard_id: int) -> str:
    return f"{shard_prefix(shard_id)}results/"


def _open(store: FeatureStore | str) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore.open(store)


# --- per-shard outputs (worker writes, driver commits) ---------------------------


def write_shard_outputs(
    store: FeatureStore,
    entry: ShardEntry,
    *,
    arrays: dict[str, np.ndarray] | None = None,
    documents: dict[str, Any] | None = None,
) -> ShardEntry:
    """Write a shard's outputs next to its data; return the entry covering them, to commit.

    Call right after ``store.write_shard`` returned ``entry`` for an uncommitted
    shard (``write_shard`` cleared any leftovers of an earlier attempt).
    """
    prefix = _outputs_prefix(entry.shard_id)
    for name, data in (arrays or {}).items():
        write_array(store.backend, f"{prefix}arrays/{name}", np.ascontiguousarray(data))
    for name, document in (documents or {}).items():
        write_bytes(store.backend, f"{prefix}docs/{name}.json", json.dumps(document).encode())
    # The outputs are objects of their own beside the shard's data (its pack, or
    # the objects of a shard written before packs): the entry gains their checksums.
    outputs = object_checksums(store.backend, prefix)
    checksums = {
        key: value for key, value in entry.checksums.items() if not key.startswith("results/")
    }
    checksums.update({f"results/{key}": value for key, value in outputs.items()})
    return entry.model_copy(update={"checksums": checksums})


def read_shard_outputs(store: FeatureStore, shard_id: int) -> ShardOutputs:
    """The outputs of a committed shard, each object checked against its manifest checksum.

    Only the outputs are read (keys from the manifest, no listing), not the
    rest of the shard: merging a job's partials reads each shard's results,
    not its site data. A missing or altered object is a CorruptShardError.
    """
    if shard_id not in store.committed_shard_ids():
        raise StoreError(f"shard {shard_id} is not committed")
    prefix = _outputs_prefix(shard_id)
    source = store.manifest.read_verified(shard_id, ["results/"])
    arrays: dict[str, np.ndarray] = {}
    documents: dict[str, Any] = {}
    for key in sorted(store.manifest.entry(shard_id).checksums):
        if not key.startswith("results/"):
            continue
        rest = key.removeprefix("results/")
        if rest.startswith("docs/") and rest.endswith(".json"):
            raw = read_bytes(source, prefix + rest)
            assert raw is not None
            documents[rest.removeprefix("docs/").removesuffix(".json")] = json.loads(raw)
        elif rest.startswith("arrays/") and rest.count("/") == 2 and rest.endswith("/zarr.json"):
            name = rest.split("/")[1]
            arrays[name] = open_array(source, f"{prefix}arrays/{name}")[...]
    return ShardOutputs(arrays, documents)


# --- job-level results (driver writes after all shards commit) -------------------


def _result_key(kind: str) -> str:
    return f"{RESULTS_PREFIX}{kind}.json"


def _result_digest(document: dict[str, Any], job_hash: str) -> str:
    """The checksum of a result document (without its checksum field) in a store of ``job_hash``."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    payload = json.dumps([job_hash, text]).encode()
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def result_bytes(store: FeatureStore, result: JobResult) -> bytes:
    """The stored form of ``result`` in ``store``: its JSON with its checksum."""
    document = json.loads(result.model_dump_json())
    document[CHECKSUM_FIELD] = _result_digest(document, store.layout.job_hash)
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def write_job_result(store: FeatureStore, result: JobResult) -> None:
    """Store the aggregated result of a job (one put: readers see all of it or none),
    and record in the job record that the job wrote it (with its arrays' checksums)."""
    write_bytes(store.backend, _result_key(result.kind), result_bytes(store, result))
    record_result(store.location, store.url, result.kind)


def _recorded(store: FeatureStore) -> JobRecord | None:
    """The job record, None when there is none or it is damaged (``verify`` reports that)."""
    try:
        return read_record(store.location, store.url)
    except CorruptRecordError:
        return None


def parse_result(store: FeatureStore, kind: str, raw: bytes) -> JobResult:
    """A stored result document checked and parsed; CorruptResultError naming it otherwise."""
    key = _result_key(kind)
    where = f"job result {key} of {store.url}"
    fix = "resume the job (or `circuitscan repair`) to write it again"
    try:
        document = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptResultError(f"{where} is unreadable (not JSON); {fix}") from exc
    if isinstance(document, dict) and CHECKSUM_FIELD in document:
        claimed = document.pop(CHECKSUM_FIELD)
        if claimed != _result_digest(document, store.layout.job_hash):
            raise CorruptResultError(f"{where} fails its checksum; {fix}")
    wrote = record.results.get(key) if (record := _recorded(store)) is not None else None
    if wrote is not None and wrote != checksum(raw):  # an older result of this job put back
        raise CorruptResultError(f"{where} is not the one the job wrote ({RECORD_KEY}); {fix}")
    try:
        result = _RESULT.validate_json(json.dumps(document))
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"] if exc.errors() else "invalid"
        raise CorruptResultError(f"{where} is unreadable ({reason}); {fix}") from exc
    if result.kind != kind:
        raise CorruptResultError(f"{where} holds a {result.kind} result; {fix}")
    return result


def delete_job_result(store: FeatureStore, kind: str) -> None:
    """Drop a job result (before recomputing shards it aggregated)."""
    from circuitscan.services.store.backends import delete_keys

    forget_result(store.location, store.url, kind)  # first: a record never claims a lost result
    delete_keys(store.backend, [_result_key(kind)])


def write_job_array(
    store: FeatureStore, kind: str, name: str, values: np.ndarray, columns: list[str]
) -> PerPromptArray:
    """Store a per-prompt array of a job result (before the result that references it).

    One object, ``results/<kind>/<name>.npy.zst`` (NumPy's .npy bytes, Zstd
    level 3); the reference returned carries its checksum, so a reader of the
    result trusts exactly the bytes this job wrote.
    """
    import io

    from numcodecs import Zstd

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(values), allow_pickle=False)
    data = bytes(Zstd(level=3).encode(buffer.getvalue()))
    key = f"{RESULTS_PREFIX}{kind}/{name}.npy.zst"
    write_bytes(store.backend, key, data)
    return PerPromptArray(
        key=key,
        checksum=checksum(data),
        shape=list(values.shape),
        dtype=str(values.dtype),
        columns=columns,
    )


def read_job_array(store: FeatureStore | str, ref: PerPromptArray) -> np.ndarray:
    """The per-prompt array a job result references, checked against its checksum."""
    import io

    from numcodecs import Zstd

    opened = _open(store)
    raw = read_bytes(opened.backend, ref.key)
    if raw is None or checksum(raw) != ref.checksum:
        raise CorruptResultError(
            f"{ref.key} of {opened.url} is "
            + ("missing" if raw is None else "damaged (its checksum differs from the result's)")
            + "; resume the job to write it again"
        )
    values = np.load(io.BytesIO(bytes(Zstd().decode(raw))), allow_pickle=False)
    assert isinstance(values, np.ndarray)
    return values


def list_results(store: FeatureStore | str) -> list[JobResultInfo]:
    """Every job result the store holds, by kind."""
    opened = _open(store)
    out = []
    for key in list_keys(opened.backend, RESULTS_PREFIX):
        if key.endswith(".json"):
            result = read_result(opened, key.removeprefix(RESULTS_PREFIX).removesuffix(".json"))
            out.append(
                JobResultInfo(
                    kind=result.kind, job_hash=result.job_hash, n_prompts=result.n_prompts
                )
            )
    return out


def read_result(store: FeatureStore | str, kind: str | None = None) -> JobResult:
    """The job result of ``kind`` (default: the only one the store holds)."""
    opened = _open(store)
    if kind is None:
        kinds = [
            key.removeprefix(RESULTS_PREFIX).removesuffix(".json")
            for key in list_keys(opened.backend, RESULTS_PREFIX)
            if key.endswith(".json")
        ]
        if not kinds and (record := _recorded(opened)) is not None and record.kinds():
            kinds = record.kinds()  # the job wrote results that are gone: say so below
        if len(kinds) != 1:
            raise ResultNotFoundError(
                f"{opened.url} holds job results {kinds}; name one"
                if kinds
                else f"{opened.url} holds no job result (a cache job, or the job is unfinished)"
            )
        kind = kinds[0]
    raw = read_bytes(opened.backend, _result_key(kind))
    if raw is None:
        record = _recorded(opened)
        if record is not None and _result_key(kind) in record.results:
            raise CorruptResultError(
                f"job result {_result_key(kind)} of {opened.url} is missing, though the job "
                f"wrote it ({RECORD_KEY} records it); resume the job (or `circuitscan repair`) "
                "to write it again"
            )
        raise ResultNotFoundError(f"{opened.url} holds no {kind} result")
    return parse_result(opened, kind, raw)


def _typed(store: FeatureStore | str, kind: str, cls: type) -> Any:
    result = read_result(store, kind)
    assert isinstance(result, cls)
    return result


def top_nodes(store: FeatureStore | str, k: int = 20) -> list[NodeEffect]:
    """The k highest mean-|effect| nodes of an attribute job, with verification status."""
    result: AttributionJobResult = _typed(store, "attribute", AttributionJobResult)
    return result.top[:k]


def splice_eval_rows(store: FeatureStore | str) -> list[SpliceEvalRow]:
    """The pooled rows of a splice-eval job (clean first, then each site set's variants)."""
    result: SpliceEvalJobResult = _typed(store, "splice_eval", SpliceEvalJobResult)
    return result.rows


def ablation_deltas(store: FeatureStore | str, limit: int | None = None) -> list[FeatureDelta]:
    """Per-feature Δm of an ablation scan, largest mean |Δm| first."""
    result: AblationJobResult = _typed(store, "ablation_scan", AblationJobResult)
    return result.features[:limit]


def dfa_features(store: FeatureStore | str) -> DFAJobResult:
    """A DFA job's features, averaged by head and by source role."""
    result: DFAJobResult = _typed(store, "dfa", DFAJobResult)
    return result


def dfa_tables(
    store: FeatureStore | str, feature: int, limit: int | None = None
) -> list[dict[str, Any]]:
    """A DFA job's per-prompt rows of one feature, in prompt order (``limit``: the first N).

    Each row: ``prompt``, ``dest_pos``, ``activation``, ``pre_activation``,
    ``bias``, ``contributions`` ([head][source 0..dest_pos]) and ``roles``
    (each source position's role). Only committed shards of a finished job are read.
    """
    opened = _open(store)
    dfa_features(opened)  # the job is finished: every shard is committed
    rows: list[dict[str, Any]] = []
    for shard_id in sorted(opened.committed_shard_ids()):
        for row in read_shard_outputs(opened, shard_id).documents["rows"]:
            if row["feature"] == feature:
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    return rows
    return rows
