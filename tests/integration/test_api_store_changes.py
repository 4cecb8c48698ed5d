"""The HTTP API's open stores see new commits without re-listing the manifest every second.

A real store on local disk under a StoreRegistry (the API's store access) with
``refresh_seconds=0``, so every query looks for changes. Its location records
the listings and reads it is asked for. Queries of a store nobody writes list
nothing; a commit shows once the writer flushes its index (or takes, renews or
releases its lease), with one listing and a read of the new entry only; a
writer that does neither is seen at the next periodic listing, and an entry
removed meanwhile too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from circuitscan.services.api import store_access
from circuitscan.services.api.store_access import StoreRegistry
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.lease import StoreLease
from circuitscan.services.store.manifest import MANIFEST_PREFIX, manifest_key
from circuitscan.testing.many_shards import PROMPT, TOKEN_IDS, commit_many_shards

pytestmark = pytest.mark.integration


def _spy(location: Any) -> list[tuple[str, str]]:
    """Record the location's listings and manifest reads (the real calls still run; every
    read, one object's too, goes through ``read_many``)."""
    calls: list[tuple[str, str]] = []
    list_keys, read_many = location.list_keys, location.read_many

    def listed(prefix: str) -> list[str]:
        calls.append(("list", prefix))
        return list_keys(prefix)

    def many(keys: Iterable[str]) -> dict[str, bytes | None]:
        keys = list(keys)
        calls.extend(("read", key) for key in keys if key.startswith(MANIFEST_PREFIX))
        return read_many(keys)

    location.list_keys, location.read_many = listed, many
    return calls


def _commit(url: str, shard_id: int) -> FeatureStore:
    """Another writer commits one more shard (no index flush)."""
    writer = FeatureStore.open(url)
    entry = writer.write_shard(shard_id, [PROMPT], [TOKEN_IDS], {})
    writer.commit_shard(entry, verify=False)
    return writer


def _seen(registry: StoreRegistry) -> set[int]:
    with registry.reading("s") as entry:
        return entry.store.committed_shard_ids()


def test_open_stores_list_the_manifest_only_when_a_writer_moved(tmp_path: Path) -> None:
    url = commit_many_shards(str(tmp_path / "s"), 3).url
    registry = StoreRegistry(tmp_path, refresh_seconds=0)
    assert _seen(registry) == {0, 1, 2}
    with registry.reading("s") as entry:
        calls = _spy(entry.store.location)
    for _ in range(5):
        assert _seen(registry) == {0, 1, 2}
    assert calls == []  # nothing changed: no listing, no entry read

    writer = _commit(url, 3)
    assert _seen(registry) == {0, 1, 2}  # not flushed yet: shown at the writer's next flush
    writer.flush_index()
    assert _seen(registry) == {0, 1, 2, 3}
    assert calls == [("list", MANIFEST_PREFIX), ("read", manifest_key(3))]

    calls.clear()
    _commit(url, 4)
    with StoreLease(url, job="test"):  # a job's driver takes the lease (and heartbeats it)
        assert _seen(registry) == {0, 1, 2, 3, 4}
    assert calls == [("list", MANIFEST_PREFIX), ("read", manifest_key(4))]
    calls.clear()
    assert _seen(registry) == set(range(5))  # the lease's release moved the token: listed again
    assert calls == [("list", MANIFEST_PREFIX)]


def test_a_silent_writer_is_seen_at_the_periodic_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = commit_many_shards(str(tmp_path / "s"), 2).url
    registry = StoreRegistry(tmp_path, refresh_seconds=0)
    assert _seen(registry) == {0, 1}
    _commit(url, 2)
    assert _seen(registry) == {0, 1}
    monkeypatch.setattr(store_access, "RELIST_SECONDS", 0.0)
    assert _seen(registry) == {0, 1, 2}
    FeatureStore.open(url).uncommit(1)  # an entry gone: everything is read again
    assert _seen(registry) == {0, 2}
