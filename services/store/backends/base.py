"""The interface every storage backend implements, with generic zarr-API defaults.

A backend is one store location (a folder, a named in-memory store, an
object-storage prefix) named by a URL. It hands zarr a store object for
array I/O and moves raw objects itself: the feature store reads and writes
whole shards as batches of objects, so those batches are where a backend
earns its keep (direct file I/O locally, bulk deletes on object storage).

The defaults below go through the zarr store's public async API, run
concurrently on zarr's event loop; a backend overrides what its medium does
faster.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar

from zarr.abc.store import RangeByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer as CPUBuffer
from zarr.core.sync import sync

from circuitscan.schemas.errors import UserInputError
from circuitscan.services.store.errors import StoreAccessError


class StoreURLError(UserInputError):
    """A store URL this service cannot open."""


# The object I/O every backend offers, and what a failure of each was attempting. A
# failure of the medium itself (a permission refused, credentials missing, an endpoint
# down, a full disk) reaches callers as StoreAccessError naming the store, not as the
# medium's own exception: Backend.__init_subclass__ wraps these methods in every
# backend, its overrides included, so a new backend is covered without a line of its own.
_IO_METHODS = {
    "read_many": "read from",
    "write_many": "write to",
    "read_ranges": "read from",
    "read_bytes": "read from",
    "write_bytes": "write to",
    "list_keys": "list",
    "read_prefix": "read from",
    "exists": "read from",
    "delete_keys": "delete from",
    "delete_prefix": "delete from",
    "version": "read from",
    "create_object": "write to",
    "swap_object": "write to",
    "remove_empty_folders": "delete from",
    "children": "list",
}


def _translated(method: Callable[..., Any], attempt: str) -> Callable[..., Any]:
    @wraps(method)
    def run(self: Backend, *args: Any, **kwargs: Any) -> Any:
        with self.access(attempt):
            return method(self, *args, **kwargs)

    run.__io_translated__ = True  # type: ignore[attr-defined]
    return run


def _wrap_io(cls: type) -> None:
    for name, attempt in _IO_METHODS.items():
        method = cls.__dict__.get(name)
        if method is not None and not getattr(method, "__io_translated__", False):
            setattr(cls, name, _translated(method, attempt))


# Requests in flight at once: enough to hide object-storage latency, few
# enough not to exhaust s3fs's connection pool or local file handles.
_CONCURRENCY = 32


async def bounded(coroutines: Iterable[Awaitable[object]]) -> list[object]:
    """Await ``coroutines`` with at most ``_CONCURRENCY`` in flight, results in order."""
    semaphore = asyncio.Semaphore(_CONCURRENCY)

    async def run(coroutine: Awaitable[object]) -> object:
        async with semaphore:
            return await coroutine

    return list(await asyncio.gather(*(run(c) for c in coroutines)))


class Backend(ABC):
    """One store location: a zarr store for arrays plus batched raw-object I/O.

    Keys are ``/``-separated paths relative to the location, as zarr uses
    them. Subclasses set ``scheme`` (the URL scheme they are registered
    under) and ``example`` (how the URL is written, for error messages);
    ``root_example`` is set by backends whose locations can hold a directory
    of named stores for the HTTP API.
    """

    scheme: ClassVar[str]
    example: ClassVar[str]
    root_example: ClassVar[str | None] = None
    # Byte ranges of one object less than this far apart are read as one
    # (a request costs a round trip on object storage; local reads set 0).
    range_gap: ClassVar[int] = 256 << 10
    # Where to look when the medium refuses access (said after its own reason).
    access_hint: ClassVar[str] = ""
    # Whether other processes (a job's Ray actors) reach the same objects by the URL.
    shared_across_processes: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _wrap_io(cls)

    @classmethod
    def access_errors(cls) -> tuple[type[BaseException], ...]:
        """The exceptions by which this medium reports a failed operation (see _IO_METHODS)."""
        return (OSError,)

    def __init__(self, url: str) -> None:
        self.url = url
        self._store: Store | None = None

    @contextmanager
    def access(self, attempt: str) -> Iterator[None]:
        """Report a failure of the medium inside as StoreAccessError (``attempt``: "read
        from", "write to", ...); for the zarr-store calls that bypass the I/O methods."""
        try:
            yield
        except self.access_errors() as exc:
            reason = str(exc) or type(exc).__name__
            hint = f" ({self.access_hint})" if self.access_hint else ""
            raise StoreAccessError(f"cannot {attempt} {self.describe()}: {reason}{hint}") from exc

    @classmethod
    @abstractmethod
    def from_address(cls, address: str, url: str) -> Backend:
        """The backend for ``address`` (the URL after ``scheme://``; ``url`` is the whole
        URL, for messages). StoreURLError when the address is malformed. No I/O."""

    @abstractmethod
    def _make_store(self) -> Store:
        """The zarr store over this location (called once, on first use)."""

    @abstractmethod
    def child(self, name: str) -> Backend:
        """The location of entry ``name`` directly under this one."""

    @abstractmethod
    def describe(self) -> str:
        """What and where this location is, in words (for messages and logs)."""

    @property
    def store(self) -> Store:
        """The zarr store over this location (made lazily: opening a URL does no I/O)."""
        if self._store is None:
            self._store = self._make_store()
        return self._store

    @property
    def local_path(self) -> Path | None:
        """The directory when this location is a local folder, else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # --- objects --------------------------------------------------------------------

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """The raw bytes of many objects (None for absent ones), fetched concurrently."""
        keys = list(keys)
        prototype = default_buffer_prototype()
        buffers = sync(bounded(self.store.get(key, prototype=prototype) for key in keys))
        return {
            key: None if buffer is None else buffer.to_bytes()  # type: ignore[attr-defined]
            for key, buffer in zip(keys, buffers, strict=True)
        }

    def write_many(self, objects: Mapping[str, bytes]) -> None:
        """Write many objects concurrently, each in a single put (atomic per object)."""
        store = self.store
        sync(bounded(store.set(key, CPUBuffer.from_bytes(data)) for key, data in objects.items()))

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        """Byte ranges ``[start, stop)`` of object ``key`` (None when it is absent).

        A range past the object's end comes back short (a truncated object
        reads as what it still holds). Each range is one request (a ranged
        GET on object storage), all of them concurrently.
        """
        prototype = default_buffer_prototype()

        async def one(start: int, stop: int) -> bytes | None:
            request = RangeByteRequest(start, stop)
            try:
                buffer = await self.store.get(key, prototype=prototype, byte_range=request)
            except (OSError, ValueError):  # a range wholly past the end (HTTP 416)
                return None if not await self.store.exists(key) else b""
            return None if buffer is None else buffer.to_bytes()

        found = sync(bounded(one(start, stop) for start, stop in ranges))
        if any(part is None for part in found):
            return None
        return [part for part in found if isinstance(part, bytes)]

    def read_bytes(self, key: str) -> bytes | None:
        """The raw bytes of one object, None when absent."""
        return self.read_many([key])[key]

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object in a single put."""
        self.write_many({key: data})

    def list_keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` (a folder, given with a trailing '/'), sorted."""

        async def collect() -> list[str]:
            return [key async for key in self.store.list_prefix(prefix)]

        return sorted(key for key in sync(collect()) if key.startswith(prefix))

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix`` (one listing, then concurrent reads)."""
        data = self.read_many(self.list_keys(prefix))
        return {key: value for key, value in data.items() if value is not None}

    def exists(self, key: str) -> bool:
        """Whether object ``key`` is stored."""
        return bool(sync(self.store.exists(key)))

    def delete_keys(self, keys: Iterable[str]) -> None:
        """Delete objects (missing ones are fine)."""
        keys = list(keys)
        if keys:
            store = self.store
            sync(bounded(store.delete(key) for key in keys))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` ('' for the whole location)."""
        self.delete_keys(self.list_keys(prefix))

    def version(self, key: str) -> str | None:
        """A token that changes when object ``key`` is rewritten; None when it is absent.

        By default a digest of its bytes; backends with cheaper change
        markers (modification times, ETags) use those.
        """
        data = self.read_bytes(key)
        return None if data is None else hashlib.blake2b(data, digest_size=16).hexdigest()

    # --- conditional writes (the writer lease) ----------------------------------------

    def create_object(self, key: str, data: bytes) -> bool:
        """Write object ``key`` only when it is absent; True when this call wrote it.

        ``data`` must be unique to the caller (the lease's owner id is in it):
        the default puts with zarr's ``set_if_not_exists`` and reads back
        whose bytes won, which is atomic where the zarr store's own
        create-if-absent is. Backends override it with their medium's atomic
        create.
        """
        sync(self.store.set_if_not_exists(key, CPUBuffer.from_bytes(data)))
        return self.read_bytes(key) == data

    def swap_object(self, key: str, expected: bytes, data: bytes | None) -> bool:
        """Replace object ``key`` by ``data`` (delete it when None) only while it holds
        ``expected``; True when done, False when it holds anything else or is absent.

        The default reads, compares and writes: another writer can slip in
        between. Backends override it with a compare-and-swap of their medium.
        """
        if self.read_bytes(key) != expected:
            return False
        if data is None:
            self.delete_keys([key])
        else:
            self.write_bytes(key, data)
        return True

    def remove_empty_folders(self, prefixes: Iterable[str]) -> None:
        """Remove folders left empty under ``prefixes`` (only media with real folders)."""
        return None  # object storage and memory have no folders to leave behind

    def children(self) -> list[str]:
        """Names of the entries directly under this location (not all need hold a store)."""

        async def collect() -> list[str]:
            return [name.rstrip("/") async for name in self.store.list_dir("")]

        return sorted(set(sync(collect())))


_wrap_io(Backend)  # its generic defaults, which backends inherit


class StoreObjects(Backend):
    """Raw-object access to a zarr store that no URL names (e.g. an in-memory staging store)."""

    scheme = ""
    example = ""

    def __init__(self, store: Store) -> None:
        super().__init__(str(store))
        self._store = store

    @classmethod
    def from_address(cls, address: str, url: str) -> Backend:
        raise StoreURLError(f"{url!r}: a bare zarr store has no URL")

    def _make_store(self) -> Store:
        raise AssertionError("StoreObjects is made with its store")  # pragma: no cover

    def child(self, name: str) -> Backend:
        raise StoreURLError(f"{self.url}: a bare zarr store has no children")

    def describe(self) -> str:
        return f"zarr store {self.url}"
