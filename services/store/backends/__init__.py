"""Store URLs → backends, one class per URL scheme, plus raw-object helpers.

URLs: a local path (default) or ``file://PATH`` (:class:`LocalBackend`);
``memory://NAME``, an in-process store shared by name, for tests
(:class:`MemoryBackend`); ``s3://BUCKET/PREFIX`` (:class:`S3Backend`, zarr's
FsspecStore over s3fs). :func:`open_location` parses a URL (the only place
that does) and returns its backend; ``backend.store`` is the zarr store.

Object storage charges a round trip per request, so the store never walks a
hierarchy object by object: whole shards are encoded in memory and moved as
batches (:meth:`Backend.write_many` / :meth:`Backend.read_many`), and deletes
go out as one bulk request where the backend has one.

The module-level helpers take a backend or any zarr store (a plain zarr
store gets the generic zarr-API implementation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeAlias

from zarr.abc.store import Store

from circuitscan.services.store.backends.base import Backend, StoreObjects, StoreURLError
from circuitscan.services.store.backends.local import LocalBackend
from circuitscan.services.store.backends.memory import MemoryBackend
from circuitscan.services.store.backends.registry import (
    open_location,
    open_root,
    register,
    split_url,
)
from circuitscan.services.store.backends.s3 import S3Backend, s3_options

# The built-in schemes. A new storage medium: one Backend subclass, one line here.
register(LocalBackend)
register(MemoryBackend)
register(S3Backend)

# What the raw-object helpers accept: a backend, or any zarr store.
Objects: TypeAlias = Backend | Store

__all__ = [
    "Backend",
    "LocalBackend",
    "MemoryBackend",
    "Objects",
    "S3Backend",
    "StoreObjects",
    "StoreURLError",
    "as_backend",
    "delete_keys",
    "drop_memory_store",
    "list_keys",
    "open_location",
    "open_root",
    "read_bytes",
    "read_many",
    "read_prefix",
    "register",
    "s3_options",
    "split_url",
    "write_bytes",
    "write_many",
]


def as_backend(target: Objects) -> Backend:
    """``target`` itself when it is a backend, else raw-object access to that zarr store."""
    return target if isinstance(target, Backend) else StoreObjects(target)


def drop_memory_store(url: str) -> None:
    """Forget a memory:// store (tests)."""
    location = open_location(url)
    if isinstance(location, MemoryBackend):
        MemoryBackend.drop(location.name)


def read_many(target: Objects, keys: Iterable[str]) -> dict[str, bytes | None]:
    """The raw bytes of many objects (None for absent ones), fetched concurrently."""
    return as_backend(target).read_many(keys)


def read_prefix(target: Objects, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (one listing, then concurrent reads)."""
    return as_backend(target).read_prefix(prefix)


def write_many(target: Objects, objects: Mapping[str, bytes]) -> None:
    """Write many objects concurrently (each in a single put, atomic per object)."""
    as_backend(target).write_many(objects)


def read_bytes(target: Objects, key: str) -> bytes | None:
    """The raw bytes of one object, None when absent."""
    return as_backend(target).read_bytes(key)


def write_bytes(target: Objects, key: str, data: bytes) -> None:
    """Write one object in a single put (atomic on local disk and object storage)."""
    as_backend(target).write_bytes(key, data)


def list_keys(target: Objects, prefix: str) -> list[str]:
    """Every object key under ``prefix`` (a folder, given with a trailing '/')."""
    return as_backend(target).list_keys(prefix)


def delete_keys(target: Objects, keys: Iterable[str]) -> None:
    """Delete objects (missing ones are fine); one bulk request on object storage."""
    as_backend(target).delete_keys(keys)
