"""How each kind of store array is laid out on disk: dtype, chunking, codecs.

Choices (measured by bench/store.py on SAE activations of the default model):
Blosc+zstd with byte shuffle for float16/bfloat16 values and gradients
(shuffle groups exponent bytes, which repeat a lot); a Delta filter before
compression for monotone offsets and for feature ids (sorted within a token,
so consecutive ids differ by small steps; the uint wrap-around at token
boundaries decodes exactly). Entry arrays are chunked at 64Ki entries: one
(prompt, position) query then decodes ~128-256 KiB per array, well under a
millisecond, while chunk objects stay large enough for object storage.
"""

from __future__ import annotations

import warnings

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec
from zarr.codecs.numcodecs import Delta
from zarr.storage import MemoryStore

from circuitscan.services.store.backends import delete_keys, list_keys, write_many

ENTRY_CHUNK = 1 << 16
TOKEN_CHUNK = 1 << 16
INDEX_ROW_CHUNK = 256


def feature_id_dtype(d_sae: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every feature id."""
    return np.dtype(np.uint16 if d_sae <= 1 << 16 else np.uint32)


def _blosc(dtype: np.dtype, shuffle: str = "shuffle") -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=dtype.itemsize)


def write_array(
    store: Store,
    path: str,
    data: np.ndarray,
    *,
    delta: bool = False,
    chunk: int | tuple[int, ...] = ENTRY_CHUNK,
) -> None:
    """Create (or replace) ``path`` holding ``data`` with the codecs its kind calls for.

    Off a MemoryStore the array is encoded in memory first and its objects
    uploaded together (zarr alone spends several sequential requests per
    array checking parents); parent group documents are not written.
    """
    if isinstance(store, MemoryStore):
        _create_array(store, path, data, delta=delta, chunk=chunk)
        return
    staging: dict = {}
    _create_array(MemoryStore(store_dict=staging), path, data, delta=delta, chunk=chunk)
    prefix = path.rstrip("/") + "/"
    objects = {key: value.to_bytes() for key, value in staging.items() if key.startswith(prefix)}
    delete_keys(store, [key for key in list_keys(store, prefix) if key not in objects])
    write_many(store, objects)


def _create_array(
    store: MemoryStore,
    path: str,
    data: np.ndarray,
    *,
    delta: bool,
    chunk: int | tuple[int, ...],
) -> None:
    chunks = chunk if isinstance(chunk, tuple) else (chunk,) * data.ndim
    chunks = tuple(max(1, min(c, n)) for c, n in zip(chunks, data.shape, strict=True))
    filters = None
    if delta:
        with warnings.catch_warnings():
            # Delta is a numcodecs codec outside the Zarr v3 spec; this store is
            # read by zarr-python, which supports it.
            warnings.simplefilter("ignore")
            filters = [Delta(dtype=str(data.dtype))]
    array = zarr.create_array(
        store,
        name=path,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        filters=filters,
        compressors=[_blosc(data.dtype)],
        fill_value=0,
        overwrite=True,
    )
    if data.size:
        array[...] = data


def open_array(store: Store, path: str) -> zarr.Array:
    """Open an existing array read-only."""
    return zarr.open_array(store, path=path, mode="r")
