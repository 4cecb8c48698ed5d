"""Prompts identified by content: a digest of the job's prompts, kept in the store.

The job hash covers a prompt file's path, not what it holds, so an edited
file would otherwise be resumed as the same job and leave shards of the old
and the new prompts side by side. The driver records a digest of the prompts
it loaded (``inputs.json``, beside the layout) when it creates the store, and
a later ``run`` or ``resume`` into that store is refused when its prompts
digest differently, naming the file and both digests. The digest is of the
prompt records as loaded (text and labels, in order), so any change a job
would see is caught and nothing it would not see (a blank line) is.

Kept out of the job hash and the layout so that stores written before it
still resume: a store without the record gets one on its next run.

A generated source (IOI, templates) is a function of its spec, which the job
hash already covers; building a million prompts on the driver only to digest
them would cost more than the job's start-up may, so its record
(``scope: generator``) digests the source's spec and its first prompts, which
catch a changed generator or tokenizer. A store whose record digests every
prompt of a generated source (written before) is checked the same way again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from circuitscan.schemas.errors import ConflictError, StoreCorruptionError
from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.store.backends import Backend, open_location
from circuitscan.services.store.store_keys import INPUTS_KEY


class PromptsChangedError(ConflictError):
    """The job's prompts differ from those the store was written with."""


class CorruptInputsError(StoreCorruptionError):
    """The store's record of its prompts cannot be read back."""


class InputsRecord(BaseModel):
    """What a store's prompts were when its job started."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="Where the prompts came from (a file path, or the kind).")
    prompts: int = Field(ge=0, description="Prompts loaded from it.")
    digest: str = Field(description="sha256 of the prompt records, in order.")
    scope: Literal["records", "generator"] = Field(
        default="records",
        description="records: the digest covers every prompt; generator: the source's spec "
        "and its first prompts (generated sources).",
    )


class _Digest:
    """sha256 of records fed in any number of pieces (a prompt set is read in chunks)."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0

    def update(self, records: Iterable[PromptRecord]) -> None:
        for record in records:
            self.hash.update(json.dumps(record.model_dump(mode="json"), sort_keys=True).encode())
            self.hash.update(b"\n")
            self.count += 1


def prompts_digest(records: Iterable[PromptRecord]) -> str:
    """sha256 over the records' fields, in order (independent of how the file is laid out)."""
    digest = _Digest()
    digest.update(records)
    return digest.hash.hexdigest()


def streamed_record(spec: JobSpec, chunks: Iterable[list[PromptRecord]]) -> InputsRecord:
    """The record of every prompt, read chunk by chunk (nothing kept)."""
    digest = _Digest()
    for chunk in chunks:
        digest.update(chunk)
    return InputsRecord(source=_source(spec), prompts=digest.count, digest=digest.hash.hexdigest())


def generator_record(spec: JobSpec, n_prompts: int, first: list[PromptRecord]) -> InputsRecord:
    """The record of a generated source: its spec and its first prompts."""
    head = json.dumps(spec.prompts.model_dump(mode="json"), sort_keys=True)
    digest = hashlib.sha256(head.encode() + b"\n" + prompts_digest(first).encode())
    return InputsRecord(
        source=_source(spec), prompts=n_prompts, digest=digest.hexdigest(), scope="generator"
    )


def _source(spec: JobSpec) -> str:
    path = getattr(spec.prompts, "path", None)
    return str(path) if path is not None else f"{spec.prompts.kind} prompts"


def inputs_record(spec: JobSpec, records: list[PromptRecord]) -> InputsRecord:
    """The record of ``records`` as loaded for ``spec``."""
    return InputsRecord(source=_source(spec), prompts=len(records), digest=prompts_digest(records))


def _stored(location: Backend, url: str) -> InputsRecord | None:
    raw = location.read_bytes(INPUTS_KEY)
    if raw is None:
        return None
    try:
        return InputsRecord.model_validate_json(raw)
    except ValidationError as exc:
        raise CorruptInputsError(
            f"{INPUTS_KEY} of {url} (the record of its prompts) is unreadable; delete it to "
            "record the prompts of the next run"
        ) from exc


def _current(spec: JobSpec, current: list[PromptRecord] | InputsRecord) -> InputsRecord:
    return current if isinstance(current, InputsRecord) else inputs_record(spec, current)


def check_inputs(
    spec: JobSpec,
    current: list[PromptRecord] | InputsRecord,
    every_prompt: Callable[[], InputsRecord] | None = None,
) -> None:
    """PromptsChangedError when the store at ``spec.store`` was written with other prompts.

    ``current``: the prompts, or their record; ``every_prompt`` digests every
    prompt, for a store whose record covers every prompt when ``current`` does not.
    """
    location = open_location(spec.store)
    stored = _stored(location, spec.store)
    if stored is None:
        return
    current = _current(spec, current)
    if stored.scope != current.scope and every_prompt is not None:
        current = every_prompt()
    if stored.digest != current.digest:
        raise PromptsChangedError(
            f"the prompts of {current.source} changed since store {spec.store} was written "
            f"from them ({stored.prompts} prompts, sha256 {stored.digest[:16]}; now "
            f"{current.prompts} prompts, sha256 {current.digest[:16]}): restore the file, or "
            "write the new prompts to another store (or replace this one with --overwrite)"
        )


def record_inputs(spec: JobSpec, current: list[PromptRecord] | InputsRecord) -> None:
    """Keep the record of the prompts (or ``current`` itself) in the store, when it holds none yet."""
    location = open_location(spec.store)
    if _stored(location, spec.store) is None:
        location.write_bytes(INPUTS_KEY, _current(spec, current).model_dump_json().encode())
