"""In-process stores shared by name: ``memory://NAME`` (tests and notebooks).

Every backend opened on the same name shares one dict of objects for the
life of the process, so that several FeatureStore objects (writer,
committer, reader) see one store. The backend keeps the dict it hands to
zarr's MemoryStore and reads and writes it directly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.core.buffer.cpu import Buffer as CPUBuffer
from zarr.storage import MemoryStore

from circuitscan.services.store.backends.base import Backend, StoreURLError

_OBJECTS: dict[str, dict[str, Buffer]] = {}
_LOCK = threading.Lock()


class MemoryBackend(Backend):
    """A named in-process store."""

    scheme = "memory"
    example = "memory://NAME"
    range_gap = 0  # a read per range costs no round trip
    shared_across_processes = False  # a job's actors would each see a store of their own

    def __init__(self, name: str) -> None:
        super().__init__(f"memory://{name}")
        self.name = name
        with _LOCK:
            self.objects = _OBJECTS.setdefault(name, {})

    @classmethod
    def from_address(cls, address: str, url: str) -> MemoryBackend:
        if not address:
            raise StoreURLError("memory:// store URLs need a name, e.g. memory://test")
        return cls(address)

    @classmethod
    def drop(cls, name: str) -> None:
        """Forget the store of that name (its objects are freed once no backend holds them)."""
        with _LOCK:
            _OBJECTS.pop(name, None)

    def _make_store(self) -> Store:
        return MemoryStore(store_dict=self.objects)

    def child(self, name: str) -> MemoryBackend:
        return MemoryBackend(f"{self.name}/{name}")

    def describe(self) -> str:
        return f"in-process memory store {self.name!r}"

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        found = {key: self.objects.get(key) for key in keys}
        return {key: None if value is None else value.to_bytes() for key, value in found.items()}

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        found = self.objects.get(key)
        if found is None:
            return None
        data = found.to_bytes()
        return [data[start:stop] for start, stop in ranges]

    def write_many(self, objects: Mapping[str, bytes]) -> None:
        self.objects.update({key: CPUBuffer.from_bytes(data) for key, data in objects.items()})

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(key for key in list(self.objects) if key.startswith(prefix))

    def exists(self, key: str) -> bool:
        return key in self.objects

    def delete_keys(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.objects.pop(key, None)

    # One process holds every memory store: the module lock makes these atomic.
    def create_object(self, key: str, data: bytes) -> bool:
        with _LOCK:
            if key in self.objects:
                return False
            self.objects[key] = CPUBuffer.from_bytes(data)
            return True

    def swap_object(self, key: str, expected: bytes, data: bytes | None) -> bool:
        with _LOCK:
            current = self.objects.get(key)
            if current is None or current.to_bytes() != expected:
                return False
            if data is None:
                del self.objects[key]
            else:
                self.objects[key] = CPUBuffer.from_bytes(data)
            return True

    def children(self) -> list[str]:
        prefix = f"{self.name}/"
        with _LOCK:
            names = [name.removeprefix(prefix) for name in _OBJECTS if name.startswith(prefix)]
        return sorted({name.split("/", 1)[0] for name in names})
