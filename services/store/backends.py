"""Store URLs → zarr stores, plus the raw-object helpers the manifest needs.

URLs: a local path (default) or ``file://PATH``; ``memory://NAME`` (an
in-process zarr MemoryStore shared by name, for tests); ``s3://BUCKET/PREFIX``
(zarr's FsspecStore over s3fs; the endpoint comes from ``CIRCUITSCAN_S3_ENDPOINT``
or ``AWS_ENDPOINT_URL`` when set, credentials from the usual AWS variables).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
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
    options: dict[str, object] = {"asynchronous": True}
    endpoint = os.environ.get("CIRCUITSCAN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def read_bytes(store: Store, key: str) -> bytes | None:
    """The raw bytes of one object, None when absent."""
    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def write_bytes(store: Store, key: str, data: bytes) -> None:
    """Write one object in a single put (atomic on local disk and object storage)."""
    sync(store.set(key, Buffer.from_bytes(data)))


def list_keys(store: Store, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (a folder, given with a trailing '/')."""

    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    keys = sync(collect())
    return sorted(key for key in keys if key.startswith(prefix))


def delete_keys(store: Store, keys: Iterable[str]) -> None:
    """Delete objects (missing ones are fine)."""
    for key in keys:
        sync(store.delete(key))
