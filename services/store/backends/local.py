"""Local directories: a plain path or ``file://PATH``.

Objects are read and written as files directly, not through zarr's event
loop: a point query reads a handful of small files and a shard is tens of
them, and a thread hop per file would cost more than the I/O.

Conditional writes (the writer lease) hold an exclusive ``flock`` on the
store's directory while they read and write, and a create links a complete
file into place (``os.link`` fails when the name exists), so a create or a
swap is atomic against every other process on this machine and against any
client of a file system whose ``flock`` and ``link`` are honoured (local
disks; NFS v4 and most cluster file systems honour them too).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from zarr.abc.store import Store
from zarr.storage import LocalStore

from circuitscan.services.store.backends.base import Backend, StoreURLError


class LocalBackend(Backend):
    """A store in a local directory (made on first write)."""

    scheme = "file"
    example = "a local path"
    range_gap = 0  # a read per range costs no round trip
    root_example = "a directory"

    def __init__(self, path: Path, url: str | None = None) -> None:
        super().__init__(url if url is not None else str(path))
        if path.exists() and not path.is_dir():
            raise StoreURLError(f"store path {path} exists and is not a directory")
        self.path = path

    @classmethod
    def from_address(cls, address: str, url: str) -> LocalBackend:
        return cls(Path(address).expanduser(), url)

    def _make_store(self) -> Store:
        return LocalStore(self.path)

    def child(self, name: str) -> LocalBackend:
        return LocalBackend(self.path / name)

    def describe(self) -> str:
        return f"local directory {self.path}"

    @property
    def local_path(self) -> Path:
        return self.path

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        return {key: _read_file(self.path / key) for key in keys}

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        try:
            fd = os.open(self.path / key, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            return [os.pread(fd, stop - start, start) for start, stop in ranges]
        finally:
            os.close(fd)

    def write_many(self, objects: Mapping[str, bytes]) -> None:
        paths = {key: self.path / key for key in objects}
        for folder in {path.parent for path in paths.values()}:
            folder.mkdir(parents=True, exist_ok=True)
        for key, data in objects.items():
            _write_file(paths[key], data)

    def exists(self, key: str) -> bool:
        return (self.path / key).is_file()

    def delete_keys(self, keys: Iterable[str]) -> None:
        folders = set()
        for key in keys:
            path = self.path / key
            if path.is_dir():  # as zarr's LocalStore: a folder's key deletes the folder
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    path.unlink()
            folders.add(path.parent)
        self._prune(folders)

    def _prune(self, folders: Iterable[Path]) -> None:
        """Remove ``folders`` and their parents while empty: a deleted shard, index
        generation or result leaves no folders behind. The store's top-level
        folders (``shards/``, ``index/``...) stay, so no writer ever finds the
        folder it is writing into gone from under it."""
        for folder in sorted(folders, key=lambda path: -len(path.parts)):
            while folder.parent != self.path and self.path in folder.parents:
                try:
                    os.rmdir(folder)
                except FileNotFoundError:
                    pass  # removed with an earlier key's folders
                except OSError:
                    break  # not empty: something else lives there
                folder = folder.parent

    def version(self, key: str) -> str | None:
        # The modification time, not a digest: a store replaced by an equal
        # layout must still read as replaced, so cached views of it are dropped.
        try:
            return str((self.path / key).stat().st_mtime_ns)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def create_object(self, key: str, data: bytes) -> bool:
        path = self.path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
        with self._locked():
            try:
                tmp.write_bytes(data)
                os.link(tmp, path)  # atomic: fails when the name exists
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)

    def swap_object(self, key: str, expected: bytes, data: bytes | None) -> bool:
        if not self.path.is_dir():
            return False
        path = self.path / key
        with self._locked():
            if _read_file(path) != expected:
                return False
            if data is None:
                path.unlink(missing_ok=True)
            else:
                _write_file(path, data)
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive flock on the store's directory (released when the process dies)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def remove_empty_folders(self, prefixes: Iterable[str]) -> None:
        for prefix in prefixes:
            top = self.path / prefix.rstrip("/")
            if not top.is_dir():
                continue
            # Deepest first, so a folder whose sub-folders were all empty goes too.
            for folder, _, _ in sorted(os.walk(top), key=lambda item: -len(item[0])):
                with contextlib.suppress(OSError):  # not empty: something else lives there
                    os.rmdir(folder)

    def children(self) -> list[str]:
        try:
            with os.scandir(self.path) as entries:
                return sorted(entry.name for entry in entries)
        except FileNotFoundError:
            return []


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: readers see the old bytes or the new, never a part.

    The parent directory must exist (see ``write_many``).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        try:
            tmp.write_bytes(data)
        except FileNotFoundError:  # its folder emptied and pruned by a delete just now
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
