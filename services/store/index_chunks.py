"""The merged index on disk as row chunks, each one content-addressed object.

A site's index (FeatureIndex and, with gradients, AttributionIndex) is cut
into chunks of CHUNK_ROWS features; a chunk's object holds those rows of
every per-feature array (packed_arrays, narrow dtypes) and is named by the
digest of its bytes: ``index/<digest>``. Equal rows give an equal name, so
the objects of an index depend only on the committed shards, never on the
commit order, and a flush encodes and writes only the chunks whose rows
changed since the previous flush: the others keep their names. Objects sit
directly under ``index/`` (no folder per generation, so none is left empty).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from numcodecs import Blosc

from circuitscan.services.store.attribution_index import (
    ALL_RESIDUALS,
    ARRAYS,
    PAIRED_ARRAYS,
    AttributionIndex,
)
from circuitscan.services.store.backends import Backend
from circuitscan.services.store.encoding import exact_values, values_back
from circuitscan.services.store.errors import CorruptIndexError
from circuitscan.services.store.index_pointer import INDEX_POINTER
from circuitscan.services.store.packed_arrays import (
    FAST,
    PackedArraysError,
    pack_arrays,
    unpack_arrays,
)
from circuitscan.services.store.shard_io import checksum
from circuitscan.services.store.summaries import EMPTY, FeatureIndex

CHUNK_ROWS = 4096
INDEX_PREFIX = "index/"
_RESIDUALS = set(ALL_RESIDUALS.values())
# error_atp ([2], not per feature) and its residual sit in the pointer, per site.
_ROW_ARRAYS = tuple(
    n
    for n in (*ARRAYS, *PAIRED_ARRAYS, *_RESIDUALS)
    if n not in ("error_atp", "error_atp_residual")
)


def blob_key(data: bytes) -> str:
    return f"{INDEX_PREFIX}{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def keyed(data: bytes) -> tuple[str, str]:
    """(``blob_key``, ``checksum``) of ``data`` from one hash: the key is the checksum's
    digest (hashing a 131,072-feature site's run twice cost ~17 ms more)."""
    sums = checksum(data)
    return f"{INDEX_PREFIX}{sums.partition(':')[2]}", sums


def n_chunks(d_sae: int) -> int:
    return -(-d_sae // CHUNK_ROWS)


def chunks_of(rows: np.ndarray) -> set[int]:
    """The chunks holding feature rows ``rows``."""
    return set(np.unique(np.asarray(rows, dtype=np.int64) // CHUNK_ROWS).tolist())


def _to_disk(data: np.ndarray) -> np.ndarray:
    """The narrowest dtype that holds ``data`` exactly (empty slots: the type's maximum)."""
    if data.dtype.kind in "iu":
        widest = int(data.max()) if data.size else 0
        if widest >= (1 << 32) - 1:
            return data
        narrow = np.uint8 if widest < 255 else np.uint16 if widest < (1 << 16) - 1 else np.uint32
        return np.where(data == EMPTY, np.iinfo(narrow).max, data).astype(narrow)
    if data.dtype == np.float32:  # values that came from 16-bit storage: exact in 16 bits
        return exact_values(data)
    if data.dtype == np.float64:  # a·g of 16-bit values is exact in float32; sums rarely are
        single = data.astype(np.float32)
        if np.array_equal(single.astype(np.float64), data):
            return single
    return data


def _from_disk(stored: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return values_back(stored).astype(dtype) if dtype == np.float32 else stored.astype(dtype)
    if stored.dtype.kind == "u" and dtype.kind == "i":
        empty = stored == np.iinfo(stored.dtype).max
        return np.where(empty, EMPTY, stored.astype(dtype)).astype(dtype)
    return stored.astype(dtype)


def _fields(index: FeatureIndex, attribution: AttributionIndex | None) -> dict[str, np.ndarray]:
    fields = {name: getattr(index, name) for name in index.__dataclass_fields__}
    if attribution is not None:
        for name in _ROW_ARRAYS:
            data = getattr(attribution, name)
            if data is not None:
                fields[f"attribution/{name}"] = data
    return fields


def encode_chunk(
    index: FeatureIndex, attribution: AttributionIndex | None, chunk: int, codec: Blosc = FAST
) -> bytes:
    """Rows of chunk ``chunk`` of every per-feature array of one site, as one object."""
    rows = slice(chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS)
    return pack_arrays(
        {name: _to_disk(data[rows]) for name, data in _fields(index, attribution).items()},
        codec,
    )


def decode_chunk(
    index: FeatureIndex, attribution: AttributionIndex | None, chunk: int, raw: bytes
) -> None:
    """Fill chunk ``chunk``'s rows of ``index`` (and ``attribution``) from its object.

    Raises PackedArraysError (or KeyError / ValueError for an object of another
    layout) when it does not decode.
    """
    stored = unpack_arrays(raw)
    rows = slice(chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS)
    for name, data in _fields(index, attribution).items():
        if name.removeprefix("attribution/") in _RESIDUALS and name not in stored:
            data[rows] = 0.0  # a chunk written before totals kept their exact residuals
            continue
        part = stored[name]
        if part.shape != data[rows].shape:
            raise ValueError(f"{name} has shape {part.shape}, not {data[rows].shape}")
        data[rows] = _from_disk(part, data.dtype)


def load_chunks(
    location: Backend,
    pointer: dict[str, Any],
    index: dict[str, FeatureIndex],
    attribution: dict[str, AttributionIndex] | None,
    d_saes: dict[str, int],
    url: str,
    fix: str,
) -> dict[str, list[list[str]]]:
    """Fill ``index`` (and ``attribution``) from the chunks a format 3 or 4 pointer names, each
    checked against its checksum there; each site's [object, checksum] per chunk.

    CorruptIndexError names the first object that is missing, fails its checksum or
    does not decode.
    """
    sites = pointer["sites"]
    refs: dict[str, list[list[str]]] = {}
    try:
        sums = pointer["checksums"]
        for label in index:
            refs[label] = [[str(key), str(sums[key])] for key in sites[label]["chunks"]]
            # No chunks: none written yet (a store whose index is all in runs).
            if len(refs[label]) not in (0, n_chunks(d_saes[label])):
                raise ValueError(f"site {label} has {len(refs[label])} chunks")
            item = None if attribution is None else attribution[label]
            if item is not None and item.error_atp is not None:
                assert item.error_atp_residual is not None
                item.error_atp[:] = [float(v) for v in sites[label]["error_atp"]]
                residual = sites[label].get("error_atp_residual", [0.0, 0.0])
                item.error_atp_residual[:] = [float(v) for v in residual]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptIndexError(
            f"index pointer {INDEX_POINTER} of {url} does not match the layout; {fix}"
        ) from exc
    keys = sorted({key for chunks in refs.values() for key, _ in chunks})
    if any(not key.startswith(INDEX_PREFIX) or key == INDEX_POINTER for key in keys):
        raise CorruptIndexError(f"index pointer {INDEX_POINTER} of {url} is unreadable; {fix}")
    data = location.read_many(keys)
    bad = sorted(
        {
            key
            for chunks in refs.values()
            for key, expected in chunks
            if (raw := data[key]) is None or checksum(raw) != expected
        }
    )
    if bad:
        raise CorruptIndexError(
            f"index object {bad[0]} of {url} fails its checksum"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; {fix}"
        )
    for label, item in index.items():
        site_attribution = None if attribution is None else attribution[label]
        for chunk, (key, _) in enumerate(refs[label]):
            raw = data[key]
            assert raw is not None
            try:
                decode_chunk(item, site_attribution, chunk, raw)
            except (PackedArraysError, KeyError, ValueError) as exc:
                raise CorruptIndexError(
                    f"index object {key} of {url} does not decode ({exc}); {fix}"
                ) from exc
    return refs
