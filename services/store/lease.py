"""One writer per store: the driver's lease, ``lease.json`` in the store.

A job's driver takes the lease before it touches the store (before the
store is created, replaced or any shard is checked or written), renews it
from a heartbeat thread while the job runs and releases it when the job
ends, on an error and on Ctrl-C alike. A second ``run`` or ``resume`` into
the store meanwhile is refused before it starts anything, naming the
holder. Workers never take it (they write only the shards their driver
hands them), and readers never need it.

The lease document records who holds it (a random owner id, host, pid,
job), since when, and its last heartbeat. It is live while its heartbeat is
younger than its ``ttl_s`` and, when it was taken on this host, its process
is still running; a stale lease (a driver killed without releasing it) is
taken over with a note. Across hosts staleness is only the heartbeat age,
read on this host's clock: clocks that disagree by more than the TTL make
a lease expire early or late.

Every change is a conditional write of the backend (``create_object``,
``swap_object``): taking is create-if-absent, renewing and taking over a
stale lease replace exactly the document that was read, releasing deletes
only our own. The guarantee is the backend's: atomic on local disks
(flock and link) and in memory, atomic on S3 servers that honour
conditional requests (AWS S3, MinIO), a read-compare-write elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from circuitscan.services.store.backends import Backend, open_location
from circuitscan.services.store.errors import StoreLeaseHeldError, StoreLeaseLostError
from circuitscan.services.store.store_keys import LEASE_KEY

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 120.0
"""How long a lease lives without a heartbeat: a killed driver on another host
blocks its store this long at most (on its own host, only until its pid is gone)."""

_TAKE_ATTEMPTS = 5


class LeaseRecord(BaseModel):
    """The lease document: who writes the store, since when, and whether it is alive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    owner: str = Field(description="Random id of this holding (unique per take).")
    host: str = Field(description="Host name of the driver holding the lease.")
    pid: int = Field(description="Process id of that driver on its host.")
    job: str = Field(default="", description="Name of the job it runs.")
    started: float = Field(description="When the lease was taken (Unix time, s).")
    heartbeat: float = Field(description="Last renewal (Unix time, s).")
    ttl_s: float = Field(gt=0, description="Seconds after the last heartbeat it expires.")

    def stale_reason(self, now: float) -> str | None:
        """Why the lease no longer protects a writer, None while it is live."""
        age = now - self.heartbeat
        if age > self.ttl_s:
            return f"no heartbeat for {age:.0f}s (ttl {self.ttl_s:.0f}s)"
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"process {self.pid} is no longer running"
        return None

    def describe(self, now: float) -> str:
        since = datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        job = f"job {self.job!r}, " if self.job else ""
        return (
            f"{job}pid {self.pid} on {self.host}, since {since}, "
            f"last heartbeat {max(now - self.heartbeat, 0.0):.0f}s ago"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def read_lease(location: Backend) -> LeaseRecord | None:
    """The lease document as stored now (None when absent or unreadable)."""
    raw = location.read_bytes(LEASE_KEY)
    return None if raw is None else _parse(raw)


def _parse(raw: bytes) -> LeaseRecord | None:
    try:
        return LeaseRecord.model_validate_json(raw)
    except ValidationError:
        return None  # a torn or foreign document protects nobody: taken over


class StoreLease:
    """The writer lease of one store, held by this process (a context manager).

    ``take`` it, then ``check`` before each commit (it raises once the lease
    was lost), ``release`` at the end.
    """

    def __init__(
        self,
        url: str,
        *,
        job: str = "",
        ttl_s: float = DEFAULT_TTL_S,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.location = open_location(url)
        self.job = job
        self.ttl_s = ttl_s
        self.say = say or (lambda _line: None)
        self._held: bytes | None = None  # the document as we last wrote it
        self._lost: str | None = None
        self._lock = threading.Lock()  # the heartbeat thread and the driver share _held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_folder = False

    # --- taking and releasing ---------------------------------------------------------

    def take(self) -> StoreLease:
        """Take the lease (StoreLeaseHeldError naming the holder when a live one exists)."""
        local = self.location.local_path
        self._made_folder = local is not None and not local.exists()
        started = time.time()
        record = LeaseRecord(
            owner=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            job=self.job,
            started=started,
            heartbeat=started,
            ttl_s=self.ttl_s,
        )
        data = record.model_dump_json().encode()
        for _ in range(_TAKE_ATTEMPTS):
            if self.location.create_object(LEASE_KEY, data):
                break
            raw = self.location.read_bytes(LEASE_KEY)
            if raw is None:
                continue  # released meanwhile: try again
            held = _parse(raw)
            now = time.time()
            reason = "its lease document is unreadable" if held is None else held.stale_reason(now)
            if reason is None:
                assert held is not None
                raise StoreLeaseHeldError(
                    f"store {self.url} is being written by another job ({held.describe(now)}); "
                    f"wait for it to finish: one writer per store (its lease {LEASE_KEY} "
                    f"expires {held.ttl_s:.0f}s after its last heartbeat)"
                )
            if self.location.swap_object(LEASE_KEY, raw, data):
                holder = "" if held is None else f" ({held.describe(now)})"
                note = f"took over the stale writer lease of {self.url}{holder}: {reason}"
                log.warning(note)
                self.say(note)
                break
        else:
            raise StoreLeaseHeldError(
                f"store {self.url}: its writer lease changed hands {_TAKE_ATTEMPTS} times "
                "while this job tried to take it; another job is starting there"
            )
        self._held = data
        self._thread = threading.Thread(
            target=self._beat, name=f"lease-heartbeat {self.url}", daemon=True
        )
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            held, self._held = self._held, None
        if held is None:
            return
        try:
            if not self.location.swap_object(LEASE_KEY, held, None):
                log.warning("the writer lease of %s was no longer ours to release", self.url)
        finally:
            self._remove_made_folder()

    def _remove_made_folder(self) -> None:
        """A job refused before it created its store leaves no empty folder behind."""
        local = self.location.local_path
        if self._made_folder and local is not None:
            with contextlib.suppress(OSError):  # not empty: the job made its store
                local.rmdir()

    def __enter__(self) -> StoreLease:
        return self.take() if self._held is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # --- holding ----------------------------------------------------------------------

    def check(self) -> None:
        """StoreLeaseLostError when another driver took the lease over (stop writing)."""
        if self._lost is not None:
            raise StoreLeaseLostError(self._lost)

    def renew(self) -> bool:
        """Write a fresh heartbeat; False (and ``check`` raises from then on) once lost."""
        with self._lock:
            if self._held is None:
                return False
            record = LeaseRecord.model_validate_json(self._held)
            data = record.model_copy(update={"heartbeat": time.time()}).model_dump_json().encode()
            if self.location.swap_object(LEASE_KEY, self._held, data):
                self._held = data
                return True
            self._held = None
        holder = read_lease(self.location)
        who = "" if holder is None else f" by {holder.describe(time.time())}"
        self._lost = (
            f"the writer lease of {self.url} was taken over{who} while this job ran "
            "(its heartbeat was late); this job stopped writing: resume it once the other is done"
        )
        log.error(self._lost)
        return False

    def _beat(self) -> None:
        period = self.ttl_s / 4
        while not self._stop.wait(period):
            try:
                if not self.renew():
                    return
            except Exception:  # a transient storage error: the next beat retries
                log.warning("renewing the writer lease of %s failed", self.url, exc_info=True)
