"""A shard's bookkeeping does not grow with the number of committed shards.

Real stores on local disk (circuitscan.testing.many_shards) with 10 and 200
committed shards, opened through a LocalBackend that records every object
read, listing, write and delete (its own file I/O and the zarr store's).
The worker's "already committed?" check, its whole shard tail (check, write,
outputs) and the driver's commit make the same requests in both stores,
shard ids aside, and never list or read the manifest as a whole. Resume
without ``verify`` reads no shard data.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore

from circuitscan.schemas.jobs import AttributeParams, IOISource, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import ShardEntry
from circuitscan.services.jobs.job_kind import ComputedShard, ShardPartial
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.jobs.shard_runner import ShardRunner, already_committed
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.backends import LocalBackend
from circuitscan.services.store.manifest import MANIFEST_PREFIX, manifest_key
from circuitscan.services.store.results import read_shard_outputs
from circuitscan.testing.corruption import damage, member_key
from circuitscan.testing.many_shards import PROMPT, TOKEN_IDS, commit_many_shards
from circuitscan.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.integration

Calls = list[tuple[str, str]]


class _CountingLocalStore(LocalStore):
    """zarr's LocalStore, recording what zarr reads and lists through it."""

    calls: Calls

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        self.calls.append(("read", key))
        return await super().get(key, prototype, byte_range)

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        self.calls.append(("list", prefix))
        async for key in super().list_prefix(prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        self.calls.append(("list", prefix))
        async for key in super().list_dir(prefix):
            yield key

    async def list(self) -> AsyncIterator[str]:
        self.calls.append(("list", ""))
        async for key in super().list():
            yield key


class CountingBackend(LocalBackend):
    """A local store location that records every request made to it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: Calls = []

    def _make_store(self) -> LocalStore:
        store = _CountingLocalStore(self.path)
        store.calls = self.calls
        return store

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        keys = list(keys)
        self.calls += [("read", key) for key in keys]
        return super().read_many(keys)

    def write_many(self, objects: Mapping[str, bytes]) -> None:
        self.calls += [("write", key) for key in objects]
        super().write_many(objects)

    def list_keys(self, prefix: str) -> list[str]:
        self.calls.append(("list", prefix))
        return super().list_keys(prefix)

    def delete_keys(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.calls += [("delete", key) for key in keys]
        super().delete_keys(keys)


def _counted(url: str) -> tuple[FeatureStore, CountingBackend]:
    opened = FeatureStore.open(url)
    backend = CountingBackend(Path(url))
    return FeatureStore(url, backend, opened.layout), backend


def _as_shard(calls: Calls, shard_id: int) -> list[tuple[str, str]]:
    """The calls with shard ``shard_id``'s own id written as S (any other id stays)."""
    mine = re.escape(f"{shard_id:06d}")
    return [(op, re.sub(mine, "S", key)) for op, key in calls]


def _whole_manifest_or_store(calls: Calls) -> list[tuple[str, str]]:
    return [(op, key) for op, key in calls if op == "list" and key in ("", MANIFEST_PREFIX)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("bookkeeping")
    return {n: commit_many_shards(str(root / f"n{n}"), n).url for n in (10, 200)}


def test_committed_check_reads_one_key(stores: dict[int, str]) -> None:
    for n, url in stores.items():
        listed = FeatureStore.open(url).committed_entries()
        assert set(listed) >= set(range(n))
        store, backend = _counted(url)
        shard_id = n - 3
        assert already_committed(store, shard_id) == listed[shard_id]
        assert backend.calls == [("read", manifest_key(shard_id))]
        backend.calls.clear()
        free = max(listed) + 1
        assert already_committed(store, free) is None  # not committed
        assert backend.calls == [("read", manifest_key(free))]


class _PartialOf(ShardPartial):
    """A partial with an array field and a document field, like a kind's."""

    values: np.ndarray
    note: dict[str, Any]


class _PromptRunner(ShardRunner):
    """A shard runner whose compute is fixed token ids and a partial: the shared tail is real."""

    def compute(
        self, plan: ShardPlan, records: list[PromptRecord], context: list[PromptRecord] | None
    ) -> ComputedShard:
        partial = _PartialOf(values=np.arange(3.0) + plan.shard_id, note={"s": plan.shard_id})
        return ComputedShard([TOKEN_IDS for _ in records], partial=partial)


def _runner(url: str) -> _PromptRunner:
    spec = JobSpec(
        prompts=IOISource(kind="ioi", n=1),
        job=AttributeParams(kind="attribute", nodes=["head_z"]),
        store=url,
    )
    return _PromptRunner(spec, build_tiny_model(n_layers=1))


def _shard_tail(url: str) -> dict[str, Calls]:
    """Requests of a worker's new shard, its retry, and the driver's commit of it."""
    n = len(FeatureStore.open(url).committed_entries())
    plan = ShardPlan(shard_id=n, start=n, stop=n + 1)
    runner = _runner(url)
    worker, worker_backend = _counted(url)
    runner._store = worker  # the runner's store handle, as _open would make it for this URL
    result = runner.run_shard(url, plan, [PROMPT])
    new = list(worker_backend.calls)
    driver, driver_backend = _counted(url)
    driver.committed_shard_ids()  # the driver reads the manifest once, at its start
    driver_backend.calls.clear()
    entry = ShardEntry.model_validate(result.entry)
    assert driver.commit_shard(entry) is True
    commit = list(driver_backend.calls)
    worker_backend.calls.clear()
    retry = runner.run_shard(url, plan, [PROMPT])
    assert retry.entry == result.entry  # the retry short-cut: the committed entry, nothing redone
    outputs = read_shard_outputs(FeatureStore.open(url), n)
    assert outputs.arrays["values"].tolist() == [n, n + 1.0, n + 2.0]
    assert outputs.documents["note"] == {"s": n}
    # zarr writes a group's chunks concurrently, so the order of requests within a phase is
    # not fixed; what must not change with the store's size is which requests, and how many.
    return {
        "new": sorted(_as_shard(new, n)),
        "commit": sorted(_as_shard(commit, n)),
        "retry": sorted(_as_shard(list(worker_backend.calls), n)),
    }


def test_shard_tail_requests_do_not_grow_with_committed_shards(stores: dict[int, str]) -> None:
    small, large = (_shard_tail(stores[n]) for n in (10, 200))
    assert small == large
    for phase, calls in large.items():
        assert not _whole_manifest_or_store(calls), (phase, calls)
        others = [key for _, key in calls if re.search(r"(?<!\d)\d{6}(?!\d)", key)]
        assert not others, (phase, others)  # nothing of any other shard is touched
    assert large["retry"] == [("read", "manifest/S.json")]
    assert ("write", "manifest/S.json") in large["commit"]
    assert not [key for op, key in large["new"] if op == "write" and key.startswith("manifest/")]


def test_resume_trusts_entries_and_verify_reads_every_shard_back(
    tmp_path: Path,
) -> None:
    url = commit_many_shards(str(tmp_path / "store"), 12).url
    damage(Path(url), member_key(5, "prompts/records/c/0"), "flip")

    store, backend = _counted(url)
    assert store.uncommitted(range(14), verify=False) == [12, 13]
    assert store.corrupt_shards == []
    assert not [key for _, key in backend.calls if key.startswith("shards/")], backend.calls

    checked, checked_backend = _counted(url)
    assert checked.uncommitted(range(14)) == [5, 12, 13]  # verify is the store API's default
    assert checked.corrupt_shards == [5]
    read = {key.split("/")[1] for op, key in checked_backend.calls if key.startswith("shards/")}
    assert read == {f"{s:06d}" for s in range(12)}
    assert FeatureStore.open(url).committed_shard_ids() == set(range(12)) - {5}
