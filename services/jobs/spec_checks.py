"""Checks the driver makes before it creates a store, so bad input never leaves a half-made one.

Each raises :class:`JobError` naming the problem; ``position_notes`` only
warns about a choice that is valid but probably not what the user meant.
"""

from __future__ import annotations

from collections import defaultdict

from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.jobs import (
    AblationScanParams,
    AttributeParams,
    CacheParams,
    DFAParams,
    JobSpec,
)
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.kind_ablation import scanned_site
from circuitscan.services.jobs.kind_dfa import dfa_site
from circuitscan.services.jobs.worker import WorkerInfo


class JobError(RuntimeError):
    """A job that cannot run as specified (empty prompt set, store conflict...)."""


def _reads_metric(spec: JobSpec) -> bool:
    job = spec.job
    if isinstance(job, CacheParams):
        return job.gradients
    return not isinstance(job, DFAParams)


def _check_labels(spec: JobSpec, records: list[PromptRecord]) -> None:
    """Answer-reading metrics need their labels on every prompt (else every shard would fail)."""
    kind = spec.metric.kind
    if kind == "next_token_loss" or not _reads_metric(spec):
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
    if isinstance(spec.job, AttributeParams):
        missing = [i for i, r in enumerate(records) if r.corrupted is None]
        if missing:
            raise JobError(
                f"attribute jobs need a corrupted prompt for every prompt; {len(missing)} of "
                f"{len(records)} have none (first: prompt {missing[0]})"
            )


def check_sites(spec: JobSpec, info: WorkerInfo) -> str | None:
    """The SAE site a kind works on, checked against the loaded SAEs before any shard runs."""
    labels = list(info.sae_hooks)
    try:
        if isinstance(spec.job, AblationScanParams):
            return scanned_site(spec, labels)
        if isinstance(spec.job, DFAParams):
            site = dfa_site(spec.job, [HookSite.parse(label) for label in labels]).label
            width = info.sae_widths[site]
            too_big = [f for f in spec.job.features or [] if f >= width]
            if too_big:
                raise JobError(f"dfa features {too_big} out of range: the {site} SAE has {width}")
            return site
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    return None


def _named_positions(spec: JobSpec) -> list[str]:
    """The position names a job asks for ('last' and indices are not names)."""
    job = spec.job
    if isinstance(job, DFAParams):
        return [job.position] if isinstance(job.position, str) and job.position != "last" else []
    if isinstance(job, AttributeParams | AblationScanParams) and isinstance(job.positions, list):
        return [name for name in job.positions if name != "last"]
    return []


def check_named_positions(spec: JobSpec, kept: list[PromptRecord]) -> None:
    """Every asked-for position name must be one the prompt source gave every prompt."""
    for name in _named_positions(spec):
        missing = [i for i, record in enumerate(kept) if name not in record.positions]
        if missing:
            raise JobError(
                f"{spec.job.kind} position {name!r} is not a named position of {len(missing)} "
                f"of {len(kept)} prompts (first: prompt {missing[0]}); use 'last', an index, or "
                "a name the prompt source gives (IOI: IO, S1, S2, END)"
            )


def position_notes(spec: JobSpec, kept: list[PromptRecord]) -> list[str]:
    """Warnings for ``positions: all`` on prompts whose named roles sit at different indices.

    Attribution nodes are keyed by token index, so with mixed templates a node
    ``@15`` pools different tokens (END in one prompt, a name in another).
    """
    if not isinstance(spec.job, AttributeParams) or spec.job.positions != "all":
        return []
    indices: dict[str, set[int]] = defaultdict(set)
    for record in kept:
        for name, index in record.positions.items():
            indices[name].add(index)
    spread = {name: len(found) for name, found in indices.items() if len(found) > 1}
    if not spread:
        return []
    where = ", ".join(f"{name} at {n} indices" for name, n in sorted(spread.items()))
    return [
        f"note: positions: all keys nodes by token index, but these prompts put {where}; "
        f"nodes at one index pool different tokens. Name the positions instead "
        f"(positions: {sorted(indices)}) to compare like with like."
    ]
