"""Reading a few rows of a stored array by fetching and decoding only the chunks that hold them.

A point query (the features at one token) needs a handful of entries out of
a shard's hundreds of thousands. Opening each array with zarr costs about a
millisecond of Python per array even from memory, more than the decode
itself, so the codecs this store writes (an optional numcodecs Delta filter,
little-endian bytes, Blosc or Zstd) are decoded here directly from the
array's own ``zarr.json``; any other codec chain falls back to zarr.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numcodecs
import numpy as np

from circuitscan.services.store.encoding import open_array
from circuitscan.services.store.shard_io import memory_store

Fetch = Callable[[list[str]], Mapping[str, bytes]]


@dataclass(frozen=True)
class ArrayMeta:
    """What decoding a 1-D array's chunks needs, parsed from its zarr.json."""

    shape: int
    chunk: int
    dtype: np.dtype
    codecs: tuple[dict, ...]
    fill_value: object

    @classmethod
    def parse(cls, raw: bytes) -> ArrayMeta:
        doc = json.loads(raw)
        if len(doc["shape"]) != 1:
            raise ValueError("only 1-D arrays are read by chunk")
        return cls(
            shape=int(doc["shape"][0]),
            chunk=int(doc["chunk_grid"]["configuration"]["chunk_shape"][0]),
            dtype=np.dtype(doc["data_type"]),
            codecs=tuple(doc["codecs"]),
            fill_value=doc.get("fill_value", 0),
        )

    def fast(self) -> bool:
        names = [codec["name"] for codec in self.codecs]
        if names and names[0] == "numcodecs.delta":
            names = names[1:]
        return names in (["bytes", "blosc"], ["bytes", "zstd"], ["bytes"]) and (
            self.codecs[-1]["name"] != "bytes"
            or self.codecs[-1].get("configuration", {}).get("endian", "little") == "little"
        )


def _decode_chunk(meta: ArrayMeta, raw: bytes) -> np.ndarray:
    data: bytes | np.ndarray = raw
    for codec in reversed(meta.codecs):
        name = codec["name"]
        if name == "blosc":
            data = numcodecs.Blosc().decode(data)
        elif name == "zstd":
            data = numcodecs.Zstd().decode(data)
        elif name == "bytes":
            data = np.frombuffer(data, dtype=meta.dtype.newbyteorder("<"))
        elif name == "numcodecs.delta":
            # Delta's decode is a cumulative sum in the array's own dtype, so
            # unsigned wrap-around (feature ids restarting at each token) decodes exactly.
            data = np.cumsum(data, dtype=meta.dtype)
    return np.asarray(data)


class ChunkCache(Protocol):
    """Decoded chunks of one immutable array set, by chunk key (``path/c/i``)."""

    def get(self, key: str) -> np.ndarray | None: ...

    def put(self, key: str, chunk: np.ndarray) -> None: ...


def read_rows(
    fetch: Fetch,
    path: str,
    start: int,
    stop: int,
    meta: ArrayMeta,
    cache: ChunkCache | None = None,
) -> np.ndarray:
    """Elements ``[start, stop)`` of the 1-D array at ``path`` (keys relative to ``fetch``'s root).

    With ``cache``, chunks decoded before are taken from it and newly decoded
    ones are put in it (read-only: a caller can never alter what the next
    caller is given).
    """
    if not 0 <= start <= stop <= meta.shape:
        raise IndexError(f"rows {start}:{stop} outside {path} of length {meta.shape}")
    if start == stop:
        return np.zeros(0, dtype=meta.dtype)
    first, last = start // meta.chunk, (stop - 1) // meta.chunk
    keys = [f"{path}/c/{index}" for index in range(first, last + 1)]
    if not meta.fast():
        objects = dict(fetch([f"{path}/zarr.json", *keys]))
        return open_array(memory_store(objects), path)[start:stop]
    chunks: dict[str, np.ndarray] = {}
    if cache is not None:
        chunks = {key: hit for key in keys if (hit := cache.get(key)) is not None}
    missing = [index for index in range(first, last + 1) if keys[index - first] not in chunks]
    fetched = fetch([keys[index - first] for index in missing]) if missing else {}
    for index in missing:
        key = keys[index - first]
        # The last chunk is stored full size; only its rows inside the array are kept.
        rows = min(meta.chunk, meta.shape - index * meta.chunk)
        raw = fetched.get(key)
        if raw is None:  # zarr does not write chunks that are all fill value
            chunk = np.full(rows, meta.fill_value, dtype=meta.dtype)
        else:
            chunk = _decode_chunk(meta, raw)
            chunk = chunk[:rows].copy() if len(chunk) > rows else chunk
        if cache is not None:
            chunk.flags.writeable = False
            cache.put(key, chunk)
        chunks[key] = chunk
    parts = [chunks[key] for key in keys]
    joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
    offset = first * meta.chunk
    return joined[start - offset : stop - offset]
