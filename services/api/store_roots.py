"""Where the API's named stores live: a local directory or an object-storage prefix.

Either way a store name is one path segment under the root, and the root is
a store backend (:mod:`circuitscan.services.store.backends`) whose scheme
can hold named stores. A local root resolves names (symlinks followed) to
direct children of the directory and refuses stores whose links point
outside it; an ``s3://BUCKET/PREFIX`` root (the endpoint from
``CIRCUITSCAN_S3_ENDPOINT``, credentials from the usual AWS variables) maps
a name to ``s3://BUCKET/PREFIX/NAME``, where jobs on a cluster write their
stores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from circuitscan.services.api.errors import ApiError
from circuitscan.services.output_folder import output_folder
from circuitscan.services.store.backends import Backend, StoreURLError, open_location, open_root
from circuitscan.services.store.errors import StoreAccessError

_LAYOUT = "zarr.json"  # a store's root document: present once the store exists

T = TypeVar("T")


class StoreRoot(Protocol):
    """The operations the store registry and the job routes need from a root."""

    def location(self, name: str) -> str:
        """The store URL of existing store ``name``; ApiError 404 when there is none."""
        ...

    def target(self, name: str) -> str:
        """The store URL a new job's store ``name`` is written to (ApiError 400 if impossible)."""
        ...

    def name_of(self, location: str) -> str | None:
        """The name of a store URL directly under the root, None for anything else."""
        ...

    def candidates(self) -> list[str]:
        """Entry names directly under the root (not all of them need hold a store)."""
        ...

    def version(self, name: str) -> str:
        """A token that changes when store ``name`` is replaced (its layout rewritten)."""
        ...

    def check_contained(self, name: str) -> None:
        """ApiError 400 when store ``name`` reaches outside the root."""
        ...


def _parsed(location: str) -> Backend | None:
    try:
        return open_location(location)
    except StoreURLError:
        return None


class LocalRoot:
    """Stores as folders of one directory."""

    def __init__(self, root: Backend) -> None:
        assert root.local_path is not None, "a local root needs a local directory"
        self.path = output_folder(root.local_path, "stores").resolve()
        self.root = root

    def __str__(self) -> str:
        return str(self.path)

    def _folder(self, name: str) -> Path:
        folder = (self.path / name).resolve()
        if folder.parent != self.path:
            raise ApiError(400, f"store {name!r} resolves outside the store root")
        return folder

    def location(self, name: str) -> str:
        folder = self._folder(name)
        if not self.root.child(name).exists(_LAYOUT):
            raise ApiError(404, f"no store named {name!r}")
        return str(folder)

    def target(self, name: str) -> str:
        folder = self.path / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ApiError(400, f"store {name!r} cannot be written: not a plain folder")
        return str(folder)

    def name_of(self, location: str) -> str | None:
        parsed = _parsed(location)
        if parsed is None or parsed.local_path is None:
            return None
        path = parsed.local_path.expanduser().resolve()
        return path.name if path.parent == self.path else None

    def candidates(self) -> list[str]:
        return self.root.children()

    def version(self, name: str) -> str:
        self.location(name)
        version = self.root.child(name).version(_LAYOUT)
        if version is None:  # replaced between the two looks
            raise ApiError(404, f"no store named {name!r}")
        return version

    def check_contained(self, name: str) -> None:
        # Zarr follows links inside a store; one pointing outside the root
        # would expose arbitrary files through shard reads.
        folder = Path(self.location(name))
        for parent, dirs, files in os.walk(folder):
            for item in (*dirs, *files):
                candidate = Path(parent) / item
                if candidate.is_symlink() and not candidate.resolve().is_relative_to(self.path):
                    raise ApiError(400, f"store {name!r} links outside the store root")


class ObjectRoot:
    """Stores as prefixes under a root location that is not a local folder (``s3://...``)."""

    def __init__(self, root: Backend) -> None:
        self.root = root
        self.url = root.url

    def __str__(self) -> str:
        return self.url

    def _reach(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except StoreAccessError as exc:  # endpoint down, credentials refused
            raise ApiError(503, f"object storage at {self.url} is unreachable: {exc}") from exc

    def location(self, name: str) -> str:
        child = self.root.child(name)
        if not self._reach(lambda: child.exists(_LAYOUT)):
            raise ApiError(404, f"no store named {name!r}")
        return child.url

    def target(self, name: str) -> str:
        return self.root.child(name).url

    def name_of(self, location: str) -> str | None:
        parsed = _parsed(location)
        prefix = self.url + "/"
        if parsed is None or not parsed.url.startswith(prefix):
            return None
        name = parsed.url.removeprefix(prefix)
        return name if name and "/" not in name else None

    def candidates(self) -> list[str]:
        return self._reach(self.root.children)

    def version(self, name: str) -> str:
        child = self.root.child(name)
        version = self._reach(lambda: child.version(_LAYOUT))
        if version is None:
            raise ApiError(404, f"no store named {name!r}")
        return version

    def check_contained(self, name: str) -> None:
        return None  # object keys cannot link elsewhere


def check_root(text: str) -> str:
    """``text`` itself when it names a supported root (no network I/O); a UserInputError
    saying why not."""
    open_root(text)
    return text


def store_root(location: str | Path) -> StoreRoot:
    """The root for a local directory or an ``s3://BUCKET/PREFIX`` URL."""
    root = open_root(str(location))
    if root.local_path is not None:
        return LocalRoot(root)
    return ObjectRoot(root)
