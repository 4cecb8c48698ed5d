"""Checks the driver makes before it creates a store, so bad input never leaves a half-made one.

Each raises :class:`JobError` naming the problem; ``position_notes`` only
warns about a choice that is valid but probably not what the user meant.
What a kind needs of its prompts, sites and positions it says itself
(:class:`~circuitscan.services.jobs.job_kind.JobKind`); these functions ask it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from circuitscan.pipelines.tokens import NotSingleTokenError, encode_plain, single_token_id
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.models import ModelSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.kinds import job_kind

if TYPE_CHECKING:
    from circuitscan.services.jobs.worker import WorkerInfo


class JobError(UserInputError):
    """A job that cannot run as specified (empty prompt set, store conflict...)."""


def _check_labels(spec: JobSpec, records: list[PromptRecord]) -> None:
    """Answer-reading metrics need their labels on every prompt (else every shard would fail)."""
    kind = spec.metric.kind
    if kind == "next_token_loss" or not job_kind(spec.job.kind).reads_metric(spec.job):
        return
    needed = ["answer", "wrong"] if kind == "logit_diff" else ["answer"]
    for label in needed:
        missing = [i for i, r in enumerate(records) if getattr(r, label) is None]
        if missing:
            raise JobError(
                f"metric {kind} needs the {label!r} label on every prompt; {len(missing)} of "
                f"{len(records)} have none (first: prompt {missing[0]}). Label the prompts "
                "(jsonl fields answer/wrong) or use metric: {kind: next_token_loss}"
            )


def check_prompts(spec: JobSpec, records: list[PromptRecord], tokenizer: Any = None) -> None:
    """Labels, the kind's needs and the tokens of every prompt (``tokenizer``: the model's,
    loaded once per driver when not given and only when the job reads tokens here)."""
    if not records:
        raise JobError("the prompt set is empty: nothing to run")
    _check_labels(spec, records)
    try:
        job_kind(spec.job.kind).check_prompts(spec.job, records)
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    check_tokens(spec, records, tokenizer)
    from circuitscan.services.jobs.preflight import check_batch_memory

    check_batch_memory(spec, len(records), lambda: _longest_prompts(spec, records, tokenizer))


def _longest_prompts(
    spec: JobSpec, records: list[PromptRecord], tokenizer: Any, sample: int = 8
) -> list[tuple[int, int]]:
    """(index, tokens with BOS) of the prompts with the longest texts: only those are tokenized."""
    order = sorted(range(len(records)), key=lambda i: len(records[i].text), reverse=True)
    chosen = order[:sample]
    tokenizer = tokenizer or driver_tokenizer(spec.model)
    ids = tokenizer([records[i].text for i in chosen], add_special_tokens=False)["input_ids"]
    return [(i, len(row) + 1) for i, row in zip(chosen, ids, strict=True)]


@functools.lru_cache(maxsize=4)
def driver_tokenizer(model: ModelSpec) -> Any:
    """The model's tokenizer on the driver (no weights), loaded once per process and model."""
    from circuitscan.services.model_loading import load_tokenizer

    return load_tokenizer(model)


def _read_labels(spec: JobSpec) -> list[str]:
    """The labels the job's metric reads as single tokens (none when the metric is not read)."""
    kind = spec.metric.kind
    if kind == "next_token_loss" or not job_kind(spec.job.kind).reads_metric(spec.job):
        return []
    return ["answer", "wrong"] if kind == "logit_diff" else ["answer"]


def _pairs_by_position(spec: JobSpec, records: list[PromptRecord]) -> bool:
    # Kinds that pair clean and corrupted prompts (attribute jobs, paired
    # caches) do it token by token unless told to align them from the end;
    # a cache that is not paired never reads the corrupted text.
    pairs = getattr(spec.job, "align", None) == "same" and getattr(spec.job, "paired", True)
    return bool(pairs) and any(r.corrupted is not None for r in records)


def check_tokens(spec: JobSpec, records: list[PromptRecord], tokenizer: Any = None) -> None:
    """Answers of exactly one token, clean and corrupted prompts of equal token length.

    A shard would find either only after the store exists, with one shard
    failed and the others written; here nothing has been created yet.
    """
    labels = _read_labels(spec)
    paired = _pairs_by_position(spec, records)
    if not labels and not paired:
        return
    tokenizer = tokenizer or driver_tokenizer(spec.model)
    counts: dict[str, int] = {}  # answers repeat across prompts: tokenize each once
    for label in labels:
        for index, record in enumerate(records):
            text = getattr(record, label)
            if text is None:
                continue
            if text not in counts:
                counts[text] = len(encode_plain(tokenizer, text))
            if counts[text] == 1:
                continue
            if not text:
                raise JobError(f"prompt {index}: the {label} is empty; it must be one token")
            try:
                single_token_id(tokenizer, text)
            except NotSingleTokenError as exc:
                raise JobError(f"prompt {index}: {label} {exc}") from exc
    if paired:
        _check_equal_lengths(records, tokenizer)


def _check_equal_lengths(records: list[PromptRecord], tokenizer: Any) -> None:
    rows = [(i, r) for i, r in enumerate(records) if r.corrupted is not None]
    clean = tokenizer([r.text for _, r in rows], add_special_tokens=False)["input_ids"]
    corrupt = tokenizer([str(r.corrupted) for _, r in rows], add_special_tokens=False)["input_ids"]
    for (index, _), a, b in zip(rows, clean, corrupt, strict=True):
        if len(a) != len(b):
            raise JobError(
                f"prompt {index}: the clean and corrupted prompts have different token lengths "
                f"({len(a) + 1} vs {len(b) + 1} with BOS); they are paired position by "
                "position, so give them equal lengths or set align: end in the job"
            )


def check_sites(spec: JobSpec, info: WorkerInfo) -> str | None:
    """The SAE site a kind works on, checked against the loaded SAEs before any shard runs."""
    try:
        return job_kind(spec.job.kind).check_sites(spec, info)
    except ValueError as exc:
        raise JobError(str(exc)) from exc


def check_named_positions(spec: JobSpec, kept: list[PromptRecord]) -> None:
    """Every asked-for position name must be one the prompt source gave every prompt."""
    for name in job_kind(spec.job.kind).position_names(spec.job):
        missing = [i for i, record in enumerate(kept) if name not in record.positions]
        if missing:
            raise JobError(
                f"{spec.job.kind} position {name!r} is not a named position of {len(missing)} "
                f"of {len(kept)} prompts (first: prompt {missing[0]}); use 'last', an index, or "
                "a name the prompt source gives (IOI: IO, S1, S2, END)"
            )


def position_notes(spec: JobSpec, kept: list[PromptRecord]) -> list[str]:
    """Warnings about the job's positions on these prompts (see the kind's ``position_notes``)."""
    return job_kind(spec.job.kind).position_notes(spec.job, kept)
