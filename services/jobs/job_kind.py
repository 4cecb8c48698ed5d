"""What a job kind is: one object that the runner, checks, readers, CLI, report and API all ask.

A kind (``services/jobs/kinds/<kind>.py``) subclasses :class:`JobKind` and is
registered once in ``services/jobs/kinds/__init__.py``. It carries

- its params model (in ``schemas/jobs.py``) and job-level result model (in
  ``schemas/job_results.py``; ``None`` for a kind that leaves no result);
- a typed per-shard partial (:class:`ShardPartial`, the worker → driver
  contract, stored under the shard's prefix) and ``merge`` (driver:
  partials → result);
- ``runner`` (worker side: a :class:`~circuitscan.services.jobs.shard_runner.ShardRunner`);
- the driver-side checks and reference prompts it needs;
- how it is shown: CLI text (:class:`CliView`), an HTML report section, its
  HTTP results route (:class:`ApiView`) and the browser's table of that
  route's payload (:class:`BrowserView`).

This module and the kind modules import neither torch nor Ray at module
level (worker-side code imports them when it runs), so store commands that
only read results stay light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.breakdown import Breakdown, PerPromptArray
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.prompts import PromptRecord

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from circuitscan.schemas.store import StoreLayout
    from circuitscan.services.jobs.shard_runner import ShardRunner
    from circuitscan.services.jobs.worker import WorkerInfo
    from circuitscan.services.reports import Section
    from circuitscan.services.sae_loading import LoadedSAE
    from circuitscan.services.store import FeatureStore


class KindCheckError(UserInputError):
    """A job that its kind cannot run as specified (the driver reports it as a JobError)."""


class ShardPartial(BaseModel):
    """One shard's partial result, as a worker writes it and the driver reads it back.

    Stored under the shard's prefix, field by field: a numpy-array field is
    the array ``arrays/<field>``, any other field the JSON document
    ``docs/<field>.json`` (its JSON form). The field names are therefore the
    store layout of a kind's shard outputs: renaming one breaks old stores.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def _array_fields(cls) -> list[str]:
        return [
            name
            for name, info in cls.model_fields.items()
            if info.annotation is np.ndarray or info.annotation == (np.ndarray | None)
        ]

    def to_outputs(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON documents) to write under the shard's prefix (None arrays: not written)."""
        arrays = self._array_fields()
        dumped = self.model_dump(mode="json", exclude=set(arrays))
        return {
            name: getattr(self, name) for name in arrays if getattr(self, name) is not None
        }, dumped

    @classmethod
    def from_outputs(cls, arrays: dict[str, np.ndarray], documents: dict[str, Any]) -> Any:
        """The partial a committed shard holds (``arrays``/``documents`` as read back).

        An optional field (``np.ndarray | None``, default None) that a shard
        lacks reads as None: stores written before the field existed still open.
        """
        names = set(cls._array_fields())
        values = {name: arrays[name] for name in names if name in arrays} | {
            name: documents[name]
            for name in cls.model_fields
            if name not in names and (name in documents or cls.model_fields[name].is_required())
        }
        return cls.model_validate(values)


@dataclass(frozen=True)
class ComputedShard:
    """What a kind's worker computed for one shard, before the shared write tail stores it."""

    token_lists: list[list[int]]
    partial: ShardPartial | None = None
    site_caches: dict[str, Any] = field(default_factory=dict)
    pairs: Any = None  # a paired cache's named and paired positions (paired_io.ShardPairs)


@dataclass(frozen=True)
class MergeContext:
    """What the driver knows when it merges the committed shards of a job."""

    spec: JobSpec
    n_prompts: int  # prompts in the store
    # The job's prompts after the token cap: a lazy sequence on the driver
    # (prompt_plan.KeptPrompts); read-only passes send shard_prompts(...) instead.
    kept: Sequence[PromptRecord]
    site: str | None  # the SAE site the kind's checks resolved (None: the kind has none)
    say: Callable[[str], None]
    # Runs ``worker.<method>(*args)`` on the actors for each args tuple (read-only passes).
    fan_out: Callable[[str, list[tuple[Any, ...]]], list[Any]]
    # Stores a per-prompt array the driver computed (name, values, column names) beside the
    # job result and returns its reference; None where nothing is stored (e.g. unit tests).
    write_array: Callable[[str, np.ndarray, list[str]], PerPromptArray] | None = None

    def shard_prompts(self, start: int, stop: int) -> Any:
        """Kept prompts ``[start, stop)`` as a worker call takes them: their source ranges
        (the worker builds the records) where the driver holds them lazily, else the records."""
        ranges = getattr(self.kept, "ranges", None)
        return ranges(start, stop) if ranges is not None else list(self.kept[start:stop])


@dataclass(frozen=True)
class CliView:
    """A result as ``circuitscan results`` prints it: a header line, then a table."""

    header: str
    columns: list[str]
    rows: list[tuple[Any, ...]]


class ApiPage(BaseModel):
    """Base of a paged results payload: the result's summary fields and one page of its rows.

    A page declares ``offset``, ``limit`` and ``total`` itself (the payload's
    field order is part of the HTTP interface); every other field but the
    rows is copied from the result by name.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class ApiView:
    """The kind's route ``/api/stores/{store}/results/<path>``.

    With ``page`` the route is paged (``offset``/``limit``): the result's
    list ``rows_from`` becomes the page's ``rows_to`` and the page's other
    fields are copied from the result; without it the whole result is returned.
    """

    path: str
    name: str  # the endpoint's name (FastAPI's operation id is built from it)
    summary: str
    page: type[ApiPage] | None = None
    rows_from: str = ""
    rows_to: str = ""


CellFormat = Literal["text", "num", "num3", "joined", "ratio", "largest_index", "largest_entry"]


class BrowserColumn(BaseModel):
    """One column of the browser's result table: a field of each row and how to show it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="Column heading.")
    field: str = Field(description="Dotted path into a row (a missing value shows '—').")
    cell: CellFormat = Field(
        default="text",
        description="text: the value; num / num3: 4 / 3 significant digits; joined: a list "
        "joined with '+' ('—' when empty); ratio: field/over; largest_index: prefix + the "
        "index of the list entry of largest magnitude and its value; largest_entry: the "
        "same for a mapping's entries.",
    )
    over: str = Field(default="", description="ratio: the denominator's field.")
    prefix: str = Field(default="", description="largest_index: text before the index.")


class BrowserView(BaseModel):
    """How the browser shows a kind's result: what to fetch, a title, a table of rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    query: str = Field(description="The results route and query to fetch, under /results/.")
    title: str = Field(
        description="Title template: {field} from the payload, {field:num} formatted as a "
        "number, {#field} a list's length."
    )
    rows: str = Field(description="The payload's field holding the table's rows.")
    columns: list[BrowserColumn] = Field(description="The table's columns.")
    breakdown: bool = Field(
        default=False,
        description="The kind can be broken down by a prompt field (/results/breakdown?by=); "
        "the browser shows that table under this one when a field is chosen.",
    )
    notes: list[str] = Field(
        default_factory=list,
        description="Payload fields holding one line of text each (e.g. a certificate), shown "
        "under the title when present.",
    )


P = TypeVar("P", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)


class JobKind(Generic[P, R]):
    """Base of every job kind; a subclass overrides what its kind needs."""

    name: ClassVar[str]
    params: ClassVar[type[BaseModel]]
    result: ClassVar[type[BaseModel] | None] = None
    partial: ClassVar[type[ShardPartial] | None] = None
    api: ClassVar[ApiView | None] = None
    browser: ClassVar[BrowserView | None] = None

    # --- worker side -------------------------------------------------------------

    def runner(
        self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]
    ) -> ShardRunner:
        """The object that computes this kind's shards inside a worker."""
        raise NotImplementedError

    # --- driver side -------------------------------------------------------------

    def store_layout(self, spec: JobSpec, info: WorkerInfo) -> StoreLayout:
        """The store's layout: by default the prompts and the kind's own outputs, no SAE sites."""
        from circuitscan.schemas.store import StoreLayout

        return StoreLayout(
            sites=[],
            gradients=False,
            shard_size=spec.shard_size,
            model_fingerprint=info.model_fingerprint,
            job_hash=spec.content_hash(),
            job_spec=spec.model_dump(mode="json"),
        )

    def reads_metric(self, params: P) -> bool:
        """Whether the job evaluates the metric (then prompts need its labels)."""
        return True

    def check_prompts(self, params: P, records: list[PromptRecord]) -> None:
        """Refuse prompts the kind cannot use (raise :class:`KindCheckError`)."""

    def check_sites(self, spec: JobSpec, info: WorkerInfo) -> str | None:
        """The SAE site the kind works on, checked against the loaded SAEs."""
        return None

    def position_names(self, params: P) -> list[str]:
        """The named positions the job asks for (each prompt must have them)."""
        return []

    def position_notes(self, params: P, kept: list[PromptRecord]) -> list[str]:
        """Warnings about valid but probably unintended choices."""
        return []

    def context(self, params: P, kept: Sequence[PromptRecord]) -> list[PromptRecord] | None:
        """Reference prompts every shard needs (one job-wide reference), or None."""
        return None

    def merge(self, params: P, partials: Iterable[Any], ctx: MergeContext) -> R:
        """The job-level result of the committed shards' partials (kinds with a result)."""
        raise NotImplementedError

    # --- presentation ------------------------------------------------------------

    def cli_view(self, result: R, top: int) -> CliView:
        raise NotImplementedError

    def report_section(self, result: R, plots: Path) -> Section:
        raise NotImplementedError

    def breakdown(self, store: FeatureStore, result: R, field: str, top: int) -> Breakdown:
        """The result's first ``top`` items averaged per value of a prompt field.

        Read from the per-prompt values the kind keeps in its shards
        (``services/jobs/breakdown.py``); a kind without them refuses.
        """
        raise UserInputError(f"{self.name} results cannot be broken down by a prompt field")


def committed_partials(store: FeatureStore, partial: type[ShardPartial]) -> Iterator[Any]:
    """The partials of every committed shard, in shard order (each checked against the manifest)."""
    from circuitscan.services.store.results import read_shard_outputs

    store.refresh()
    for shard_id in sorted(store.committed_shard_ids()):
        outputs = read_shard_outputs(store, shard_id)
        yield partial.from_outputs(outputs.arrays, outputs.documents)
