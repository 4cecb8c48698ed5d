"""Checking a whole store against its own checksums (``circuitscan verify``), read-only.

Every object a reader trusts is checked: the layout document, each manifest
entry, every committed shard's bytes against its entry, the merged index
against its pointer, and each job result against its checksum. Each problem
is one line naming the object, with what repairs it; :func:`verify_store`
returns them all (it never stops at the first) and changes nothing.

Problems have a kind so that ``circuitscan repair`` knows what it can do:
``index`` is rebuilt from the shards' own summaries without a model;
``manifest``, ``shard`` and ``result`` need the job resumed (its model and
SAEs); ``layout`` cannot be repaired in place (the layout document is what
says what the store is).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.errors import StoreCorruptionError
from circuitscan.services.store.backends import list_keys
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.results import RESULTS_PREFIX, read_result

ProblemKind = Literal["layout", "manifest", "shard", "index", "result"]


class StoreProblem(BaseModel):
    """One thing wrong with a store."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ProblemKind = Field(description="Which kind of object is damaged.")
    message: str = Field(description="One line naming the object and what repairs it.")
    shard_id: int | None = Field(
        default=None, description="The shard concerned (manifest and shard problems)."
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
    try:
        store = FeatureStore.open(url)
    except StoreCorruptionError as exc:
        problem = StoreProblem(kind="layout", message=str(exc))
        return StoreReport(url=url, shards_checked=0, results_checked=0, problems=[problem])
    problems = [
        StoreProblem(kind="manifest", message=message, shard_id=shard_id)
        for shard_id, message in sorted(store.manifest.damaged().items())
    ]
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
    kinds = result_kinds(store)
    for kind in kinds:
        try:
            read_result(store, kind)
        except StoreCorruptionError as exc:
            problems.append(StoreProblem(kind="result", message=str(exc)))
    return StoreReport(
        url=url, shards_checked=checked, results_checked=len(kinds), problems=problems
    )
