"""How each kind of store array is laid out on disk: dtype, chunking, codecs.

Chosen by measurement (bench/store.py prints the table; default model,
default SAEs, IOI prompts, 34k real (feature, activation) pairs, bytes per
pair at 64Ki-entry chunks):

                       zstd3  lz4-shuf  zstd1-shuf  zstd5-shuf  zstd5-bitshuf  zstd9-shuf
    feature ids        0.50    1.12      0.69        0.54        1.12           0.44
    ids + Delta        0.58    0.88      0.62        0.52        0.91           0.47
    activations f16    1.54    1.70      1.46        1.40        1.42           1.32
    gradients f16      1.91    2.00      1.90        1.91        1.84           1.85

- Blosc+zstd level 5 throughout: level 9 saves ~0.1 B/pair but compresses
  several times slower, and writing sits on the caching path (the cache vs
  bare-forward ratio); decode is 2-3 ns per pair at every level.
- Feature ids: uint16 (d_sae ≤ 65536), Delta then byte shuffle. Ids are
  sorted within a token, so deltas are small; the unsigned wrap-around at
  token boundaries decodes exactly. Bit shuffle doubles their size.
- Activations: byte shuffle (groups the exponent bytes). Gradients: bit
  shuffle, which measured 4% smaller for them (and 1% larger for activations).
- Offsets (prompt and token CSR offsets) are monotone: Delta makes them
  near-constant (top-k SAEs: exactly k per token), i.e. almost free.
- Chunks of 64Ki entries: 16Ki costs +0.03 B/pair, 256Ki saves nothing,
  and a point query decodes one ~0.1 ms chunk per array (see chunk_reads).
- Per-shard summaries and the merged index use the narrowest integer dtypes
  that hold them (summaries.py, shard_io.py): for short shards these fixed
  costs, with the zarr.json documents, are a visible part of bytes per pair.
"""

from __future__ import annotations

import asyncio
import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from zarr.abc.store import Store
from zarr.codecs import BloscCodec
from zarr.codecs.numcodecs import Delta
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import MemoryStore, StorePath

from circuitscan.services.store.backends import delete_keys, list_keys, write_many

ENTRY_CHUNK = 1 << 16
TOKEN_CHUNK = 1 << 16
INDEX_ROW_CHUNK = 256
Shuffle = Literal["noshuffle", "shuffle", "bitshuffle"]


def feature_id_dtype(d_sae: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every feature id."""
    return np.dtype(np.uint16 if d_sae <= 1 << 16 else np.uint32)


def exact_values(values: np.ndarray) -> np.ndarray:
    """float32 values that came from float16/bfloat16 storage, back in 16 bits (exact)."""
    with np.errstate(over="ignore"):  # out of float16 range: not exact, bfloat16 next
        as_half = values.astype(np.float16)
    if np.array_equal(as_half.astype(np.float32), values, equal_nan=True):
        return as_half
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    if not np.any(bits & 0xFFFF):
        return (bits >> 16).astype(np.uint16)  # bfloat16 bits
    return values.astype(np.float32)


def values_back(raw: np.ndarray) -> np.ndarray:
    """Inverse of ``exact_values``: float32 again."""
    if raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _blosc(dtype: np.dtype, shuffle: Shuffle = "shuffle") -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=dtype.itemsize)


def write_array(
    store: Store,
    path: str,
    data: np.ndarray,
    *,
    delta: bool = False,
    chunk: int | tuple[int, ...] = ENTRY_CHUNK,
    shuffle: Shuffle = "shuffle",
) -> None:
    """Create (or replace) ``path`` holding ``data`` with the codecs its kind calls for.

    Off a MemoryStore the array is encoded in memory first and its objects
    uploaded together (zarr alone spends several sequential requests per
    array checking parents); parent group documents are not written.
    """
    if isinstance(store, MemoryStore):
        _create_array(store, path, data, delta=delta, chunk=chunk, shuffle=shuffle)
        return
    staging: dict = {}
    _create_array(
        MemoryStore(store_dict=staging), path, data, delta=delta, chunk=chunk, shuffle=shuffle
    )
    prefix = path.rstrip("/") + "/"
    objects = {key: value.to_bytes() for key, value in staging.items() if key.startswith(prefix)}
    delete_keys(store, [key for key in list_keys(store, prefix) if key not in objects])
    write_many(store, objects)


@dataclass(frozen=True)
class ArrayWrite:
    """One array to encode: its path, data and the codec choices of its kind."""

    path: str
    data: np.ndarray
    delta: bool = False
    chunk: int | tuple[int, ...] = ENTRY_CHUNK
    shuffle: Shuffle = "shuffle"


def _delta_filters(data: np.ndarray, delta: bool) -> list[Delta] | None:
    if not delta:
        return None
    with warnings.catch_warnings():
        # Delta is a numcodecs codec outside the Zarr v3 spec; this store is
        # read by zarr-python, which supports it.
        warnings.simplefilter("ignore")
        return [Delta(dtype=str(data.dtype))]


# Array metadata by (dtype, ndim, filters, shuffle): zarr's create_array spends
# most of its ~1.5 ms per array parsing the dtype, resolving codecs and
# checking the store; every array of a kind shares all of that but its shape.
_TEMPLATES: dict[tuple[str, int, bool, str], ArrayV3Metadata] = {}


async def _template(data: np.ndarray, delta: bool, shuffle: Shuffle) -> ArrayV3Metadata:
    key = (data.dtype.str, data.ndim, delta, shuffle)
    if key not in _TEMPLATES:
        scratch = await zarr_async.create_array(
            MemoryStore(),
            name="template",
            shape=(1,) * data.ndim,
            dtype=data.dtype,
            chunks=(1,) * data.ndim,
            filters=_delta_filters(data, delta),
            compressors=[_blosc(data.dtype, shuffle)],
            fill_value=0,
        )
        _TEMPLATES[key] = scratch.metadata  # type: ignore[assignment]
    return _TEMPLATES[key]


async def _encode(store: MemoryStore, item: ArrayWrite) -> None:
    """The array's zarr.json and chunks, as zarr.create_array writes them (tested byte-equal)."""
    data = item.data
    chunks = item.chunk if isinstance(item.chunk, tuple) else (item.chunk,) * data.ndim
    chunks = tuple(max(1, min(c, n)) for c, n in zip(chunks, data.shape, strict=True))
    metadata = dataclasses.replace(
        await _template(data, item.delta, item.shuffle),
        shape=data.shape,
        chunk_grid=RegularChunkGrid(chunk_shape=chunks),
    )
    path = item.path.strip("/")
    documents = metadata.to_buffer_dict(default_buffer_prototype())
    await store.set(f"{path}/zarr.json", documents["zarr.json"])
    if data.size:
        array = AsyncArray(metadata=metadata, store_path=StorePath(store, path))
        await array.setitem(..., data)


async def _group_documents(store: MemoryStore, paths: Sequence[str]) -> None:
    """zarr.json of every folder above the arrays, so the hierarchy opens as groups
    (an existing document, possibly with attributes, is left alone, as zarr does)."""
    folders = {
        "/".join(parts[:depth])
        for parts in (path.strip("/").split("/") for path in paths)
        for depth in range(1, len(parts))
    }
    document = GroupMetadata().to_buffer_dict(default_buffer_prototype())["zarr.json"]
    for folder in sorted(folders):
        await store.set_if_not_exists(f"{folder}/zarr.json", document)


def encode_arrays(store: MemoryStore, items: Sequence[ArrayWrite]) -> None:
    """Encode many arrays, and the groups above them, into an in-memory store at once.

    One trip through zarr's event loop for all of them: zarr's synchronous
    API hands every call to its loop thread and waits, and for a shard of
    ~30 small arrays those round trips, with create_array's set-up, were
    most of the write time.
    """

    async def encode_all() -> None:
        await asyncio.gather(*(_encode(store, item) for item in items))
        await _group_documents(store, [item.path for item in items])

    sync(encode_all())


def _create_array(
    store: MemoryStore,
    path: str,
    data: np.ndarray,
    *,
    delta: bool,
    chunk: int | tuple[int, ...],
    shuffle: Shuffle = "shuffle",
) -> None:
    encode_arrays(store, [ArrayWrite(path, data, delta, chunk, shuffle)])


async def _decode(store: Store, path: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Delta codec warning, see ArrayWrite
        array = await zarr_async.open_array(store=store, path=path, mode="r")
    return np.asarray(await array.getitem(...))


def read_arrays(store: Store, paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Whole arrays by path, decoded in one trip through zarr's event loop."""

    async def decode_all() -> list[np.ndarray]:
        return list(await asyncio.gather(*(_decode(store, path) for path in paths)))

    return dict(zip(paths, sync(decode_all()), strict=True))


def open_array(store: Store, path: str) -> zarr.Array:
    """Open an existing array read-only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Delta codec warning, see write_array
        return zarr.open_array(store, path=path, mode="r")
