"""Where the API's named stores live: a local directory or an object-storage prefix.

Either way a store name is one path segment under the root. A local root
resolves names (symlinks followed) to direct children of the directory and
refuses stores whose links point outside it; an ``s3://BUCKET/PREFIX`` root
(the endpoint from ``CIRCUITSCAN_S3_ENDPOINT``, credentials from the usual
AWS variables) maps a name to ``s3://BUCKET/PREFIX/NAME``, where jobs on a
cluster write their stores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from circuitscan.services.api.errors import ApiError
from circuitscan.services.store.backends import s3_options

_LAYOUT = "zarr.json"  # a store's root document: present once the store exists


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


class LocalRoot:
    """Stores as folders of one directory."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path.resolve()

    def __str__(self) -> str:
        return str(self.path)

    def _folder(self, name: str) -> Path:
        folder = (self.path / name).resolve()
        if folder.parent != self.path:
            raise ApiError(400, f"store {name!r} resolves outside the store root")
        return folder

    def location(self, name: str) -> str:
        folder = self._folder(name)
        if not (folder / _LAYOUT).is_file():
            raise ApiError(404, f"no store named {name!r}")
        return str(folder)

    def target(self, name: str) -> str:
        folder = self.path / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ApiError(400, f"store {name!r} cannot be written: not a plain folder")
        return str(folder)

    def name_of(self, location: str) -> str | None:
        if "://" in location:
            return None
        path = Path(location).expanduser().resolve()
        return path.name if path.parent == self.path else None

    def candidates(self) -> list[str]:
        with os.scandir(self.path) as entries:
            return [entry.name for entry in entries]

    def version(self, name: str) -> str:
        return str((Path(self.location(name)) / _LAYOUT).stat().st_mtime_ns)

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
    """Stores as prefixes under ``s3://BUCKET/PREFIX``."""

    def __init__(self, url: str) -> None:
        check_root(url)
        self.url = f"s3://{url.removeprefix('s3://').strip('/')}"
        self._fs: Any = None

    def __str__(self) -> str:
        return self.url

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            # Synchronous calls: the registry runs in the API's worker threads.
            self._fs = fsspec.filesystem("s3", **{**s3_options(), "asynchronous": False})
        return self._fs

    def _info(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.fs.info(f"{self.url}/{name}/{_LAYOUT}"))
        except FileNotFoundError:
            return None
        except OSError as exc:  # endpoint down, credentials refused
            raise ApiError(503, f"object storage at {self.url} is unreachable: {exc}") from exc

    def location(self, name: str) -> str:
        if self._info(name) is None:
            raise ApiError(404, f"no store named {name!r}")
        return f"{self.url}/{name}"

    def target(self, name: str) -> str:
        return f"{self.url}/{name}"

    def name_of(self, location: str) -> str | None:
        prefix = self.url + "/"
        if not location.startswith(prefix):
            return None
        name = location.removeprefix(prefix).rstrip("/")
        return name if name and "/" not in name else None

    def candidates(self) -> list[str]:
        try:
            entries = self.fs.ls(self.url, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ApiError(503, f"object storage at {self.url} is unreachable: {exc}") from exc
        return [
            entry["name"].rstrip("/").rsplit("/", 1)[-1]
            for entry in entries
            if entry.get("type") == "directory"
        ]

    def version(self, name: str) -> str:
        info = self._info(name)
        if info is None:
            raise ApiError(404, f"no store named {name!r}")
        return str(info.get("ETag") or info.get("LastModified") or info.get("size"))

    def check_contained(self, name: str) -> None:
        return None  # object keys cannot link elsewhere


def check_root(text: str) -> str:
    """``text`` itself when it names a supported root (no I/O); ValueError saying why not."""
    if "://" in text and not text.startswith("s3://"):
        raise ValueError(f"unsupported store root {text!r}: use a directory or s3://BUCKET/PREFIX")
    if text.startswith("s3://") and not text.removeprefix("s3://").strip("/"):
        raise ValueError(f"an s3 store root needs a bucket: {text!r}")
    return text


def store_root(location: str | Path) -> StoreRoot:
    """The root for a local directory or an ``s3://BUCKET/PREFIX`` URL."""
    text = check_root(str(location))
    if text.startswith("s3://"):
        return ObjectRoot(text)
    return LocalRoot(Path(text).expanduser())
