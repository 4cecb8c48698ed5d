"""Checks the driver makes before it creates a store, so bad input never leaves a half-made one.

Each raises :class:`JobError` naming the problem; ``position_notes`` only
warns about a choice that is valid but probably not what the user meant.
What a kind needs of its prompts, sites and positions it says itself
(:class:`~circuitscan.services.jobs.job_kind.JobKind`); these functions ask it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.jobs import JobSpec
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


def check_prompts(spec: JobSpec, records: list[PromptRecord]) -> None:
    if not records:
        raise JobError("the prompt set is empty: nothing to run")
    _check_labels(spec, records)
    try:
        job_kind(spec.job.kind).check_prompts(spec.job, records)
    except ValueError as exc:
        raise JobError(str(exc)) from exc


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
