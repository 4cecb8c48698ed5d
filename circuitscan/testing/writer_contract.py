"""The writer side of the store contract: conditional writes, the writer lease, replacing.

Mixed into :class:`circuitscan.testing.store_contract.StoreContract`, so every
backend's test class runs it against its own medium (``store_url``,
``shards``, ``raw_read`` and ``raw_write`` come from there).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from circuitscan.schemas.store import StoreLayout
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.backends import open_location
from circuitscan.services.store.errors import (
    NotAStoreError,
    StoreLayoutMismatchError,
    StoreLeaseHeldError,
    StoreLeaseLostError,
)
from circuitscan.services.store.job_record import read_record
from circuitscan.services.store.lease import LeaseRecord, StoreLease, read_lease
from circuitscan.services.store.results import write_job_result
from circuitscan.services.store.store_keys import LEASE_KEY, is_store_key


def _layout(**overrides: object) -> StoreLayout:
    from circuitscan.testing.store_contract import make_layout

    return make_layout(**overrides)


def _record(**fields: object) -> bytes:
    """A lease document as another driver would have written it."""
    now = time.time()
    base: dict[str, object] = {
        "owner": "other",
        "host": "elsewhere.example",
        "pid": 1,
        "job": "theirs",
        "started": now - 5,
        "heartbeat": now - 1,
        "ttl_s": 60.0,
    }
    return LeaseRecord.model_validate(base | fields).model_dump_json().encode()


class WriterContract:
    """Conditional writes, the lease and ``overwrite`` on the backend under test."""

    def raw_read(self, url: str, key: str) -> bytes | None:
        raise NotImplementedError

    def raw_write(self, url: str, key: str, data: bytes) -> None:
        raise NotImplementedError

    # --- conditional writes ---------------------------------------------------------

    def test_create_object_writes_only_when_absent(self, store_url: str) -> None:
        location = open_location(store_url)
        assert location.create_object("lease.json", b"first") is True
        assert location.create_object("lease.json", b"second") is False
        assert self.raw_read(store_url, "lease.json") == b"first"

    def test_swap_object_replaces_only_what_was_read(self, store_url: str) -> None:
        location = open_location(store_url)
        assert location.swap_object("lease.json", b"x", b"y") is False  # absent
        self.raw_write(store_url, "lease.json", b"mine")
        assert location.swap_object("lease.json", b"not mine", b"y") is False
        assert self.raw_read(store_url, "lease.json") == b"mine"
        assert location.swap_object("lease.json", b"mine", b"renewed") is True
        assert self.raw_read(store_url, "lease.json") == b"renewed"
        assert location.swap_object("lease.json", b"mine", None) is False  # stale view
        assert location.swap_object("lease.json", b"renewed", None) is True
        assert self.raw_read(store_url, "lease.json") is None

    # --- the writer lease -----------------------------------------------------------

    def test_a_live_lease_refuses_a_second_writer_naming_the_holder(self, store_url: str) -> None:
        with StoreLease(store_url, job="first") as lease:
            held = json.loads(self.raw_read(store_url, LEASE_KEY) or b"{}")
            assert (held["pid"], held["host"], held["job"]) == (
                os.getpid(),
                socket.gethostname(),
                "first",
            )
            with pytest.raises(StoreLeaseHeldError, match=rf"job 'first', pid {os.getpid()}"):
                StoreLease(store_url, job="second").take()
            assert lease.renew() is True
            lease.check()
            assert self.raw_read(store_url, LEASE_KEY) != json.dumps(held).encode()
        assert self.raw_read(store_url, LEASE_KEY) is None  # released
        StoreLease(store_url).take().release()  # and free again

    def test_a_live_lease_on_another_host_refuses(self, store_url: str) -> None:
        theirs = _record()
        self.raw_write(store_url, LEASE_KEY, theirs)
        with pytest.raises(StoreLeaseHeldError, match=r"job 'theirs', pid 1 on elsewhere.example"):
            StoreLease(store_url).take()
        assert self.raw_read(store_url, LEASE_KEY) == theirs  # refusing changed nothing

    @pytest.mark.parametrize("stale", ["expired", "dead_pid", "unreadable"])
    def test_a_stale_lease_is_taken_over_with_a_note(self, store_url: str, stale: str) -> None:
        if stale == "expired":
            old = _record(heartbeat=time.time() - 600)
        elif stale == "dead_pid":  # this host, a process that has exited
            exited = subprocess.Popen([sys.executable, "-c", "pass"])
            exited.wait()
            old = _record(host=socket.gethostname(), pid=exited.pid)
        else:
            old = b'{"owner": "torn'
        self.raw_write(store_url, LEASE_KEY, old)
        notes: list[str] = []
        lease = StoreLease(store_url, say=notes.append).take()
        try:
            assert notes and "took over the stale writer lease" in notes[0]
            held = read_lease(open_location(store_url))
            assert held is not None and held.pid == os.getpid()
        finally:
            lease.release()
        assert self.raw_read(store_url, LEASE_KEY) is None

    def test_a_lease_taken_over_is_lost_and_not_released(self, store_url: str) -> None:
        lease = StoreLease(store_url).take()
        theirs = _record()
        self.raw_write(store_url, LEASE_KEY, theirs)  # someone took it over meanwhile
        lease.check()  # not noticed before the next renewal
        assert lease.renew() is False
        with pytest.raises(StoreLeaseLostError, match="taken over by job 'theirs'"):
            lease.check()
        lease.release()
        assert self.raw_read(store_url, LEASE_KEY) == theirs  # theirs stays

    # --- replacing a store ------------------------------------------------------------

    def test_overwrite_never_replaces_a_location_that_is_not_a_store(self, store_url: str) -> None:
        self.raw_write(store_url, "notes.txt", b"my notes")
        self.raw_write(store_url, "data/a.csv", b"1,2")
        self.raw_write(store_url, "data/b.csv", b"3,4")
        for overwrite in (False, True):
            with pytest.raises(NotAStoreError, match=r"data/ \(2 files\), notes\.txt") as caught:
                FeatureStore.create(store_url, _layout(), overwrite=overwrite)
            assert store_url in str(caught.value) and "never replaced" in str(caught.value)
        assert self.raw_read(store_url, "notes.txt") == b"my notes"
        assert self.raw_read(store_url, "data/b.csv") == b"3,4"
        assert self.raw_read(store_url, "zarr.json") is None

    def test_overwrite_replaces_only_the_old_stores_own_objects(
        self, store_url: str, shards: dict
    ) -> None:
        from circuitscan.schemas.job_results import SpliceEvalJobResult
        from circuitscan.testing.store_contract import fill_store

        old = fill_store(store_url, {0: shards[0], 1: shards[1]})
        result = SpliceEvalJobResult(job_hash="job0", n_prompts=5, reference_prompts=5, rows=[])
        write_job_result(old, result)
        self.raw_write(store_url, "notes.txt", b"kept")
        before = open_location(store_url).list_keys("")
        assert {key.split("/")[0] for key in before if is_store_key(key)} >= {
            "zarr.json",
            "shards",
            "manifest",
            "index",
            "results",
        }
        with pytest.raises(StoreLayoutMismatchError, match=r"job_hash.*--overwrite"):
            FeatureStore.create(store_url, _layout(job_hash="new"))
        with StoreLease(store_url):  # a driver replacing the store holds the lease
            new = FeatureStore.create(store_url, _layout(job_hash="new"), overwrite=True)
            after = open_location(store_url).list_keys("")
            assert LEASE_KEY in after
        assert new.committed_shard_ids() == set()
        assert FeatureStore.open(store_url).layout.job_hash == "new"
        assert self.raw_read(store_url, "notes.txt") == b"kept"
        # Nothing of the old store survives but the objects any new store has (its
        # layout, its shard group and its job record, which lists no result yet).
        assert sorted(set(after) - {LEASE_KEY}) == [
            "job.json",
            "notes.txt",
            "shards/zarr.json",
            "zarr.json",
        ]
        record = read_record(open_location(store_url), store_url)
        assert record is not None and record.results == {}
