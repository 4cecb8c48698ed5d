"""Store URLs → zarr stores, plus the raw-object helpers the manifest needs.

URLs: a local path (default) or ``file://PATH``; ``memory://NAME`` (an
in-process zarr MemoryStore shared by name, for tests); ``s3://BUCKET/PREFIX``
(zarr's FsspecStore over s3fs; the endpoint comes from ``CIRCUITSCAN_S3_ENDPOINT``
or ``AWS_ENDPOINT_URL`` when set, credentials from the usual AWS variables).

Object storage charges a round trip per request, so the store never walks a
hierarchy object by object: whole shards are encoded in memory and moved
with :func:`write_many` / :func:`read_many` (concurrent requests), and
deletes go out as one bulk request where the backend has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Iterable, Mapping
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.buffer.cpu import Buffer as CPUBuffer
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore


class StoreURLError(ValueError):
    """A store URL this service cannot open."""


# memory:// stores live for the process, keyed by name, so that several
# FeatureStore objects (writer, committer, reader) share one store in tests.
_MEMORY: dict[str, dict[str, Buffer]] = {}
_MEMORY_LOCK = threading.Lock()


def open_backend(url: str) -> Store:
    """The zarr store behind a store URL (created lazily on first write)."""
    if url.startswith("memory://"):
        name = url.removeprefix("memory://")
        if not name:
            raise StoreURLError("memory:// store URLs need a name, e.g. memory://test")
        with _MEMORY_LOCK:
            data = _MEMORY.setdefault(name, {})
        return MemoryStore(store_dict=data)
    if url.startswith("s3://"):
        if len(url.removeprefix("s3://").strip("/")) == 0:
            raise StoreURLError(f"s3 store URL needs a bucket: {url!r}")
        return FsspecStore.from_url(url.rstrip("/"), storage_options=s3_options())
    if "://" in url and not url.startswith("file://"):
        raise StoreURLError(
            f"unsupported store URL {url!r}: use a local path, memory://NAME or s3://BUCKET/PREFIX"
        )
    path = Path(url.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        raise StoreURLError(f"store path {path} exists and is not a directory")
    return LocalStore(path)


def drop_memory_store(url: str) -> None:
    """Forget a memory:// store (tests)."""
    with _MEMORY_LOCK:
        _MEMORY.pop(url.removeprefix("memory://"), None)


def s3_options() -> dict[str, object]:
    """s3fs options from the environment (endpoint override for MinIO/moto/etc.)."""
    # No listings cache: other processes (workers, the driver) change the
    # store under us, and a cached listing would hide their shards.
    # max_concurrency=1: otherwise s3fs sends a HEAD (plus a listing when the
    # key is absent) before every GET to decide on ranged parallel reads, which
    # tripled the requests; store objects are small, parallelism comes from
    # reading many objects at once instead.
    options: dict[str, object] = {
        "asynchronous": True,
        "use_listings_cache": False,
        "max_concurrency": 1,
    }
    endpoint = os.environ.get("CIRCUITSCAN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


# Requests in flight at once: enough to hide object-storage latency, few
# enough not to exhaust s3fs's connection pool or local file handles.
_CONCURRENCY = 32


async def _bounded(coroutines: Iterable[Awaitable[object]]) -> list[object]:
    semaphore = asyncio.Semaphore(_CONCURRENCY)

    async def run(coroutine: Awaitable[object]) -> object:
        async with semaphore:
            return await coroutine

    return list(await asyncio.gather(*(run(c) for c in coroutines)))


def read_many(store: Store, keys: Iterable[str]) -> dict[str, bytes | None]:
    """The raw bytes of many objects (None for absent ones), fetched concurrently.

    Local directories and memory stores are read directly: a point query
    reads a handful of small files, and a hop through zarr's event-loop
    thread per read would cost more than the reads.
    """
    keys = list(keys)
    if isinstance(store, LocalStore):
        return {key: _read_file(store.root / key) for key in keys}
    if isinstance(store, MemoryStore):
        found = {key: store._store_dict.get(key) for key in keys}
        return {key: None if value is None else value.to_bytes() for key, value in found.items()}
    prototype = default_buffer_prototype()
    buffers = sync(_bounded(store.get(key, prototype=prototype) for key in keys))
    return {
        key: None if buffer is None else buffer.to_bytes()  # type: ignore[attr-defined]
        for key, buffer in zip(keys, buffers, strict=True)
    }


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_prefix(store: Store, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (one listing, then concurrent reads)."""
    data = read_many(store, list_keys(store, prefix))
    return {key: value for key, value in data.items() if value is not None}


def _write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: readers see the old bytes or the new, never a part.

    The parent directory must exist (see :func:`write_many`).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_many(store: Store, objects: Mapping[str, bytes]) -> None:
    """Write many objects concurrently (each in a single put, atomic per object).

    Local directories are written directly, like :func:`read_many` reads
    them: a shard is tens of small files, and a thread hop per file through
    zarr's event loop cost more than the writes.
    """
    if isinstance(store, LocalStore) and not store.read_only:
        paths = {key: store.root / key for key in objects}
        for folder in {path.parent for path in paths.values()}:
            folder.mkdir(parents=True, exist_ok=True)
        for key, data in objects.items():
            _write_file(paths[key], data)
        return
    sync(_bounded(store.set(key, CPUBuffer.from_bytes(data)) for key, data in objects.items()))


def read_bytes(store: Store, key: str) -> bytes | None:
    """The raw bytes of one object, None when absent."""
    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def write_bytes(store: Store, key: str, data: bytes) -> None:
    """Write one object in a single put (atomic on local disk and object storage)."""
    write_many(store, {key: data})


def list_keys(store: Store, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (a folder, given with a trailing '/')."""

    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    keys = sync(collect())
    return sorted(key for key in keys if key.startswith(prefix))


def delete_keys(store: Store, keys: Iterable[str]) -> None:
    """Delete objects (missing ones are fine); one bulk request on object storage."""
    keys = list(keys)
    if not keys:
        return
    if isinstance(store, FsspecStore):
        paths = [f"{store.path}/{key}" for key in keys]

        async def bulk() -> None:
            with contextlib.suppress(FileNotFoundError):
                await store.fs._rm(paths)

        sync(bulk())
        return
    sync(_bounded(store.delete(key) for key in keys))
