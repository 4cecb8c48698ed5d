"""One object per shard: a shard's encoded zarr objects packed behind a small header.

A shard's arrays encode to dozens of small objects (a ``zarr.json`` and one or
more chunks per array, about 70 for the default layout). Stored one file each
that is dozens of files and folders per shard: slow on file systems and a
request each on object storage. So the worker encodes them in memory exactly
as before and writes them as ONE pack object, ``shards/<s>/shard.pack``::

    b"CSPACK01"                       8 bytes, the format and its version
    header length                     uint32, little-endian
    header                            JSON {"members": [[key, offset, length, checksum], ...]}
    member bytes                      each member's bytes, in key order, back to back

The header makes a pack self-describing; readers never need it, though: the
shard's manifest entry carries each member's offset (:class:`ShardPack`) and
checksum, so a read fetches just the byte ranges it decodes (a ranged GET on
object storage, ``pread`` locally; adjacent members in one request) and checks
each member against the entry. The entry's ``header`` checksum and ``size``
cover the remaining bytes, so ``verify`` detects a damaged byte anywhere.

Zarr's sharding codec was the alternative: it packs an array's chunks, but
every array still keeps its own object and ``zarr.json``, ~25 per default
shard, three times the target of eight.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

from circuitscan.schemas.store import ShardPack
from circuitscan.services.store.errors import StoreError

PACK_NAME = "shard.pack"
MAGIC = b"CSPACK01"
_LENGTH = struct.Struct("<I")
_START = len(MAGIC) + _LENGTH.size


class PackError(StoreError):
    """Bytes that are not a readable shard pack."""


def checksum(data: bytes) -> str:
    """An object's checksum as entries store it: ``size:blake2b``."""
    return f"{len(data)}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def pack_objects(members: Mapping[str, bytes]) -> tuple[bytes, ShardPack]:
    """The pack holding ``members`` (keys relative to the shard) and its entry record.

    Deterministic: the same members always give the same bytes, so a shard
    recomputed by a resume or a repair is byte-identical to the first run.
    """
    keys = sorted(members)
    checksums = {key: checksum(members[key]) for key in keys}

    def header_for(start: int) -> bytes:
        rows, offset = [], start
        for key in keys:
            rows.append([key, offset, len(members[key]), checksums[key]])
            offset += len(members[key])
        return json.dumps({"members": rows}, separators=(",", ":")).encode()

    # The offsets depend on the header's length and the header holds the
    # offsets: grow the guess until the header fits (two rounds in practice).
    guess = len(header_for(0))
    while True:
        header = header_for(_START + guess)
        if len(header) <= guess:
            break
        guess = len(header)
    header = header.ljust(guess)  # JSON allows trailing spaces
    head = MAGIC + _LENGTH.pack(len(header)) + header
    data = head + b"".join(members[key] for key in keys)
    offsets, offset = {}, len(head)
    for key in keys:
        offsets[key] = offset
        offset += len(members[key])
    return data, ShardPack(key=PACK_NAME, size=len(data), header=checksum(head), offsets=offsets)


def pack_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Each member's (offset, length) by the pack's own header (PackError when unreadable).

    For tools and tests; readers of a store go by the manifest entry instead.
    """
    if len(data) < _START or data[: len(MAGIC)] != MAGIC:
        raise PackError("not a shard pack (no CSPACK01 header)")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    try:
        rows = json.loads(data[_START : _START + length])["members"]
        return {str(key): (int(offset), int(size)) for key, offset, size, _ in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise PackError(f"the shard pack's header is unreadable ({type(exc).__name__})") from exc


def unpack(data: bytes) -> dict[str, bytes]:
    """Every member of a pack, by its own header (see :func:`pack_spans`)."""
    spans = pack_spans(data)
    return {key: data[offset : offset + size] for key, (offset, size) in spans.items()}


def coalesce(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Ranges merged where they touch or lie under ``gap`` bytes apart: one request each."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def pack_mismatches(pack: ShardPack, checksums: Mapping[str, str], data: bytes | None) -> list[str]:
    """What of a stored pack differs from its entry: members by key, the header and the size.

    ``data`` is the whole pack object as stored (None: missing).
    """
    if data is None:
        return sorted([pack.key, *pack.offsets])
    bad = []
    head_size = int(pack.header.split(":", 1)[0])
    if checksum(data[:head_size]) != pack.header:
        bad.append(f"{pack.key} (header)")
    if len(data) != pack.size:
        bad.append(f"{pack.key} ({len(data)} bytes, the entry says {pack.size})")
    for key, offset in pack.offsets.items():
        size = int(checksums[key].split(":", 1)[0])
        if checksum(data[offset : offset + size]) != checksums[key]:
            bad.append(key)
    return sorted(bad)
