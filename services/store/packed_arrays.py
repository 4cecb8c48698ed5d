"""Several named numpy arrays in one self-describing object, without zarr.

Used for what the merged index reads often and whole: a shard's index
summary (shard_summary.py) and the index's row chunks (index_chunks.py).
Decoding is a JSON header and one Blosc decompression per array, no event
loop and no per-array documents; the same arrays always encode to the same
bytes (the header is canonical JSON, Blosc is deterministic), which is what
lets index chunks be named by their content.

Layout: ``MAGIC``, a little-endian uint32 header length, the header (JSON
list of [name, dtype, shape, compressed bytes]), then each array's
compressed bytes in header order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np
from numcodecs import Blosc

from circuitscan.schemas.errors import StoreCorruptionError

MAGIC = b"CSPA1\n"
_LENGTH = struct.Struct("<I")
# Byte shuffle, then LZ4 for what the driver rewrites while a job runs (the index chunks
# of its compactions, runs: several times faster than zstd on these mostly-empty arrays).
FAST = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, blocksize=0)
# Zstandard after the shuffle, for what is written once and kept (the index chunks a job's
# last flush writes): ~27 % smaller than FAST on them at ~7× its encode time.
AT_REST = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE, blocksize=0)
# No compression (Blosc's frame, a copy): for what is decoded once, in memory, right
# after it was encoded (a shard's index summary on its way to the driver).
RAW = Blosc(cname="lz4", clevel=0, shuffle=Blosc.NOSHUFFLE, blocksize=0)
# Blosc's header names the codec it used, so one decoder reads both.
_DECODER = FAST


class PackedArraysError(StoreCorruptionError):
    """Bytes that are not a packed-arrays object (truncated or altered)."""


def pack_arrays(arrays: Mapping[str, np.ndarray], codec: Blosc = FAST) -> bytes:
    """``arrays`` (in their order) as one object."""
    header, bodies = [], []
    for name, data in arrays.items():
        data = np.ascontiguousarray(data)
        body = codec.encode(data) if data.size else b""
        header.append([name, data.dtype.str, list(data.shape), len(body)])
        bodies.append(bytes(body))
    text = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(text)), text, *bodies])


def unpack_arrays(raw: bytes) -> dict[str, np.ndarray]:
    """The arrays of a ``pack_arrays`` object; PackedArraysError when it does not decode."""
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + _LENGTH.size:
        raise PackedArraysError("not a packed-arrays object")
    start = len(MAGIC) + _LENGTH.size
    (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
    try:
        header = json.loads(raw[start : start + length])
        offset, out = start + length, {}
        for name, dtype, shape, size in header:
            dtype = np.dtype(dtype)
            count = int(np.prod(shape))
            if count == 0:
                out[name] = np.zeros(shape, dtype=dtype)
                continue
            body = raw[offset : offset + size]
            data = np.frombuffer(_DECODER.decode(body), dtype=dtype)
            if data.size != count or len(body) != size:
                raise PackedArraysError(f"array {name} is truncated")
            out[name] = data.reshape(shape)
            offset += size
    except (ValueError, TypeError, RuntimeError) as exc:
        raise PackedArraysError(f"packed arrays do not decode ({exc})") from exc
    if offset != len(raw):
        raise PackedArraysError("packed arrays have trailing bytes")
    return out
