"""Breaking a job result down by a prompt field, from the per-prompt values in its shards.

A kind's ``breakdown`` walks the committed shards (:func:`shard_partials`:
each shard's prompt records beside its typed partial), labels every prompt
with its value of the field (:func:`field_values`) and feeds the per-prompt
values to :class:`GroupMeans`, which averages them per (item, group). The
shards are read in order, so group means are sums over the same stored
values that the job-level aggregates were computed from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from circuitscan.schemas.breakdown import (
    MISSING_GROUP,
    Breakdown,
    BreakdownCell,
    BreakdownRow,
    GroupInfo,
)
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.prompts import PromptRecord

if TYPE_CHECKING:
    from circuitscan.services.jobs.job_kind import ShardPartial
    from circuitscan.services.reports import Section
    from circuitscan.services.store import FeatureStore

RECORD_FIELDS = ("template", "answer", "wrong", "corrupted", "text")


class BreakdownFieldError(UserInputError):
    """A field no prompt of the store carries."""


class NoPerPromptValuesError(UserInputError):
    """A store written before its job kind kept per-prompt values (rerun the job to get them)."""


def field_values(records: Sequence[PromptRecord], field: str) -> list[str]:
    """Each prompt's value of ``field``: a record field or a ``meta`` key (``meta.`` optional).

    Prompts without the field fall in the group ``(missing)``; a field that no
    prompt has is refused, naming the fields the prompts do carry.
    """
    key = field.removeprefix("meta.")
    if field in RECORD_FIELDS:
        found: list[Any] = [getattr(record, field) for record in records]
    else:
        found = [record.meta.get(key) for record in records]
    if all(value is None for value in found):
        have = {f for f in RECORD_FIELDS if any(getattr(r, f) is not None for r in records)}
        meta = sorted({name for record in records for name in record.meta})
        raise BreakdownFieldError(
            f"no prompt of this store has a field {field!r}; the prompts carry "
            f"{', '.join(sorted(have)) or 'no record fields'}"
            + (f" and meta keys {', '.join(meta)}" if meta else " and no meta keys")
            + " (a JSONL key or dataset column beyond the record fields is kept, and can be "
            "grouped by, when the job's prompts list it in meta_columns)"
        )
    return [MISSING_GROUP if value is None else str(value) for value in found]


def grouped_partials(
    store: FeatureStore, partial: type[ShardPartial], field: str, means: GroupMeans
) -> Iterator[tuple[int, list[str], Any]]:
    """(first prompt, each prompt's group, partial) of every committed shard, in prompt order.

    Every prompt is labelled first (a field is refused only when no prompt of
    the whole store has it) and counted into ``means``' group sizes.
    """
    from circuitscan.services.store.results import read_shard_outputs

    store.refresh()
    shard_ids = sorted(store.committed_shard_ids())
    sizes = [len(store.prompt_records(shard_id)) for shard_id in shard_ids]
    labels = field_values(
        [record for shard_id in shard_ids for record in store.prompt_records(shard_id)], field
    )
    means.prompts(labels)
    start = 0
    for shard_id, size in zip(shard_ids, sizes, strict=True):
        outputs = read_shard_outputs(store, shard_id)
        groups = labels[start : start + size]
        yield start, groups, partial.from_outputs(outputs.arrays, outputs.documents)
        start += size


def no_per_prompt(kind: str) -> NoPerPromptValuesError:
    return NoPerPromptValuesError(
        f"this {kind} store was written before per-prompt values were kept in its shards, so "
        "it cannot be broken down by a prompt field; rerun the job (run --overwrite) to keep them"
    )


class GroupMeans:
    """Per (item, group, quantity) sums and counts of per-prompt values (NaN: undefined)."""

    def __init__(self, quantities: dict[str, str]) -> None:
        self.quantities = quantities
        self.sums: dict[tuple[str, str, str], float] = defaultdict(float)
        self.counts: dict[tuple[str, str, str], int] = defaultdict(int)
        self.group_sizes: dict[str, int] = defaultdict(int)
        self.n_prompts = 0

    def prompts(self, groups: Sequence[str]) -> None:
        """Count the prompts of each group (once per prompt of the job)."""
        for group in groups:
            self.group_sizes[group] += 1
        self.n_prompts += len(groups)

    def add(self, item: str, quantity: str, groups: Sequence[str], values: np.ndarray) -> None:
        """Per-prompt ``values`` of one item (aligned with ``groups``) into the group sums."""
        values = np.asarray(values, dtype=np.float64)
        for group, value in zip(groups, values.tolist(), strict=True):
            if value == value:  # NaN: the item does not exist on that prompt
                self.sums[(item, group, quantity)] += value
                self.counts[(item, group, quantity)] += 1

    def breakdown(self, kind: str, field: str, items: Sequence[str]) -> Breakdown:
        groups = sorted(self.group_sizes)
        first = next(iter(self.quantities))
        rows = []
        for item in items:
            cells = []
            for group in groups:
                values: dict[str, float | None] = {}
                for quantity in self.quantities:
                    n = self.counts.get((item, group, quantity), 0)
                    values[quantity] = self.sums[(item, group, quantity)] / n if n else None
                cells.append(
                    BreakdownCell(
                        group=group,
                        n_prompts=self.counts.get((item, group, first), 0),
                        values=values,
                    )
                )
            rows.append(BreakdownRow(item=item, cells=cells))
        return Breakdown(
            kind=kind,
            field=field,
            n_prompts=self.n_prompts,
            groups=[GroupInfo(value=g, n_prompts=self.group_sizes[g]) for g in groups],
            quantities=self.quantities,
            rows=rows,
        )


def breakdown_table(breakdown: Breakdown) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Columns and rows of a breakdown as one table: item, then quantity[group] (prompts)."""
    columns = ["item"]
    for group in breakdown.groups:
        columns += [f"{q}[{group.value}]" for q in breakdown.quantities]
        columns.append(f"n[{group.value}]")
    rows: list[tuple[Any, ...]] = []
    for row in breakdown.rows:
        cells: list[Any] = [row.item]
        for cell in row.cells:
            cells += [cell.values[q] for q in breakdown.quantities]
            cells.append(cell.n_prompts)
        rows.append(tuple(cells))
    return columns, rows


def breakdown_section(breakdown: Breakdown) -> Section:
    """A breakdown as a report section: one table, a line per quantity saying what it is."""
    from circuitscan.services.reports import Section, Table

    columns, rows = breakdown_table(breakdown)
    sizes = ", ".join(f"{g.value} ({g.n_prompts} prompts)" for g in breakdown.groups)
    return Section(
        title=f"{breakdown.kind} by {breakdown.field}",
        paragraphs=[
            f"Per-group means of the per-prompt values over {breakdown.n_prompts} prompts, "
            f"grouped by {breakdown.field}: {sizes}; n = prompts of the group where the "
            "item exists.",
            *(f"{name}: {meaning}." for name, meaning in breakdown.quantities.items()),
        ],
        tables=[Table(columns, [list(row) for row in rows])],
    )
