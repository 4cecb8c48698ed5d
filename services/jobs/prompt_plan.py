"""The driver's view of a job's prompts: counts and ranges, never the whole set in memory.

The driver reads a prompt set in chunks to check it and digest it, applies
the token cap (which prompts ``overlong: reject`` drops: their source
indices are all it keeps), and hands each shard a :class:`PromptSlice`, the
source ranges of its prompts; the worker builds those records itself from
the spec. Generated sources (IOI, templates) are checked on their first
prompts only: every prompt of one carries the same labels and named
positions by construction, and building them all would cost the driver
more than the job's start-up may.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.input_digest import (
    InputsRecord,
    generator_record,
    streamed_record,
)
from circuitscan.services.jobs.kinds import job_kind
from circuitscan.services.jobs.planning import PromptSlice
from circuitscan.services.jobs.prompt_sources import PromptSet, slice_records
from circuitscan.services.jobs.spec_checks import (
    JobError,
    check_named_positions,
    check_prompts,
    position_notes,
)

# Prompts read at a time: a chunk's records are all the driver holds (~4 KB a
# prompt at most, so ~70 MB), and checks over sets that fit one chunk name
# prompts exactly as they always did.
CHUNK = 16384
# Prompts of a generated source the driver builds to check and digest it.
GENERATED_SAMPLE = 64


class KeptPrompts(Sequence[PromptRecord]):
    """The prompts left after the token cap: the set less its rejected source indices.

    Indexing and ``len`` are in kept order (the store's prompt numbers);
    ``kept[a:b]`` builds those records, ``ranges(a, b)`` only names them.
    """

    def __init__(self, prompts: PromptSet, rejected: np.ndarray | None = None) -> None:
        self.prompts = prompts
        self.rejected = np.sort(np.asarray([] if rejected is None else rejected, dtype=np.int64))
        # Kept prompts before each rejected one: the k-th kept prompt sits after
        # every rejected one whose count of kept predecessors is <= k.
        self._before = self.rejected - np.arange(len(self.rejected), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.prompts) - len(self.rejected)

    def ranges(self, start: int, stop: int) -> PromptSlice:
        stop = min(stop, len(self))
        if not len(self.rejected):
            return PromptSlice(ranges=[(start, stop)] if start < stop else [])
        kept = np.arange(start, stop, dtype=np.int64)
        source = kept + np.searchsorted(self._before, kept, side="right")
        breaks = np.flatnonzero(np.diff(source) != 1) + 1
        return PromptSlice(
            ranges=[(int(run[0]), int(run[-1]) + 1) for run in np.split(source, breaks) if len(run)]
        )

    @overload
    def __getitem__(self, which: int) -> PromptRecord: ...
    @overload
    def __getitem__(self, which: slice) -> list[PromptRecord]: ...
    def __getitem__(self, which: int | slice) -> PromptRecord | list[PromptRecord]:
        if isinstance(which, int):
            index = which + len(self) if which < 0 else which
            if not 0 <= index < len(self):
                raise IndexError(which)
            return slice_records(self.prompts, self.ranges(index, index + 1))[0]
        start, stop, step = which.indices(len(self))
        if step != 1:
            raise ValueError("kept prompts are read by contiguous range")
        return slice_records(self.prompts, self.ranges(start, stop))

    def __iter__(self) -> Iterator[PromptRecord]:
        for chunk in self.chunks():
            yield from chunk

    def chunks(self, size: int = CHUNK) -> Iterator[list[PromptRecord]]:
        for start in range(0, len(self), size):
            yield self[start : start + size]


def _chunked(
    check: Callable[[list[PromptRecord]], None], start: int, stop: int, chunk: list[PromptRecord]
) -> None:
    """Run a check on one chunk; past the first, its message says which prompts it counted."""
    try:
        check(chunk)
    except JobError as exc:
        if start == 0:
            raise
        raise JobError(f"prompts {start}-{stop - 1}: {exc} (counted within these prompts)") from exc


def check_source(spec: JobSpec, prompts: PromptSet) -> InputsRecord:
    """Labels and the kind's needs of every prompt (a sample of a generated source), and the
    record of the prompts for the store (see ``input_digest``). Before Ray starts."""
    if not len(prompts):
        raise JobError("the prompt set is empty: nothing to run")
    if prompts.generated:
        first = prompts.records(0, GENERATED_SAMPLE)
        check_prompts(spec, first)
        return generator_record(spec, len(prompts), first)

    def checked() -> Iterator[list[PromptRecord]]:
        for start, chunk in prompts.chunks(CHUNK):
            _chunked(lambda c: check_prompts(spec, c), start, start + len(chunk), chunk)
            yield chunk

    return streamed_record(spec, checked())


def every_prompt_record(spec: JobSpec, prompts: PromptSet) -> InputsRecord:
    """The record digesting every prompt (a store written before generated sources had their own)."""
    return streamed_record(spec, (chunk for _, chunk in prompts.chunks(CHUNK)))


# An ASCII text of c characters makes at most c + 1 tokens (every token covers
# at least one character; a SentencePiece-style prefix space may add one), so
# with BOS at most c + 2: a text that short cannot exceed the cap and is not
# tokenized to find out (on a million short prompts, minutes of the driver's time).
_ASCII_SLACK = 2


def _fits_unseen(text: str, cap: int) -> bool:
    return len(text) + _ASCII_SLACK <= cap and text.isascii()


def _over_cap(tokenizer: Any, texts: list[str], cap: int) -> np.ndarray:
    """Indices of the texts longer than ``cap`` tokens (BOS counted)."""
    unsure = [i for i, text in enumerate(texts) if not _fits_unseen(text, cap)]
    if not unsure:
        return np.zeros(0, dtype=np.int64)
    encoded = tokenizer([texts[i] for i in unsure], add_special_tokens=False)["input_ids"]
    over = [i for i, ids in zip(unsure, encoded, strict=True) if len(ids) + 1 > cap]  # + BOS
    return np.asarray(over, dtype=np.int64)


def select(
    spec: JobSpec, prompts: PromptSet, n_ctx: int, tokenizer: Callable[[], Any]
) -> tuple[KeptPrompts, int]:
    """Apply the token cap: (kept prompts, rejected count).

    Only ``overlong: reject`` counts tokens here, because it decides which
    prompts the store numbers; truncation is counted by the workers, where
    the tokens are made.
    """
    if spec.overlong != "reject":
        return KeptPrompts(prompts), 0
    cap = min(n_ctx, spec.max_prompt_tokens) if spec.max_prompt_tokens else n_ctx
    longest = prompts.longest_ascii()
    if longest is not None and longest + _ASCII_SLACK <= cap:
        return KeptPrompts(prompts), 0  # no prompt of the source can reach the cap
    loaded = tokenizer()
    rejected: list[np.ndarray] = []
    for start in range(0, len(prompts), CHUNK):
        over = _over_cap(loaded, prompts.texts(start, start + CHUNK), cap)
        if len(over):
            rejected.append(over + start)
    dropped = np.concatenate(rejected) if rejected else np.zeros(0, dtype=np.int64)
    return KeptPrompts(prompts, dropped), len(dropped)


def check_kept(spec: JobSpec, kept: KeptPrompts, say: Callable[[str], None]) -> None:
    """Named positions on every kept prompt (a sample of a generated source); notes on the first."""
    first = kept[:CHUNK] if not kept.prompts.generated else kept[:GENERATED_SAMPLE]
    for note in position_notes(spec, first):
        say(note)
    if kept.prompts.generated or not job_kind(spec.job.kind).position_names(spec.job):
        check_named_positions(spec, first)
        return
    for index, chunk in enumerate(kept.chunks(CHUNK)):
        start = index * CHUNK
        _chunked(lambda c: check_named_positions(spec, c), start, start + len(chunk), chunk)
