"""The merged index's pointer, ``index/current.json``: what it names and how it is checked.

Format 5 (index_writer.py) is format 4 with runs: ``runs`` lists objects that
each hold the index summaries of a few shards committed since the chunks were
last written (index_runs.py), with those shards' id ranges. The chunks cover
the pointer's shards less the runs'; a reader folds the runs in at load.
Format 4: the shards the index covers as ranges of ids, a
sum of a hash of each one's manifest entry, each site's row chunks
(index_chunks.py) in order, the checksum of every object it names, and a
digest of the pointer itself. Its size and the cost of writing it do not grow
with the store: a job's shards are a few ranges, and the sum (mod 2¹²⁸ of
one blake2b term per (shard, entry digest), so order-free) is kept up to date
as shards are folded in, where format 3 listed every shard id and rehashed
the whole list at each flush (~20 ms a commit at 100,000 shards).
Format 3 listed the shards and a digest of their entries, as 4 otherwise.
Format 2 named one zarr hierarchy per generation with a checksum per object;
format 1, only the generation and the shards (read unverified).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from circuitscan.services.store.errors import CorruptIndexError
from circuitscan.services.store.manifest import ShardManifest

INDEX_POINTER = "index/current.json"
INDEX_PREFIX = "index/"
POINTER_FORMAT = 5
CHECKED_FORMAT = 2  # pointers from this format on carry checksums and a digest of themselves
CHUNKED_FORMAT = 3  # pointers from this format on name row chunks ("sites")
_SUM_MODULUS = 1 << 128


def shard_ranges(shard_ids: set[int]) -> list[list[int]]:
    """Sorted ``shard_ids`` as [start, stop) runs."""
    if not shard_ids:
        return []
    ids = np.sort(np.fromiter(shard_ids, dtype=np.int64, count=len(shard_ids)))
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = ids[np.r_[0, breaks]]
    stops = ids[np.r_[breaks - 1, len(ids) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops, strict=True)]


def range_ids(ranges: list[list[int]]) -> set[int]:
    return {i for start, stop in ranges for i in range(start, stop)}


def pointer_runs(pointer: dict[str, Any]) -> list[tuple[str, set[int]]]:
    """A format 5 pointer's runs: (object key, the shards it holds) each (none before)."""
    return [(run["object"], range_ids(run["shard_ranges"])) for run in pointer.get("runs", [])]


def pointer_shards(pointer: dict[str, Any]) -> set[int]:
    """The shards a pointer of any format covers."""
    if "shard_ranges" in pointer:
        return range_ids(pointer["shard_ranges"])
    return set(pointer["shards"])


def entry_term(shard_id: int, entry_digest: str) -> int:
    """One shard's term of a format 4 pointer's ``shards_sum``."""
    text = f"{shard_id}:{entry_digest}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")


def add_terms(total: int, terms: list[int]) -> int:
    return (total + sum(terms)) % _SUM_MODULUS


def shards_sum(manifest: ShardManifest, shard_ids: set[int], known: dict[int, str]) -> int:
    """The ``shards_sum`` of ``shard_ids``'s committed entries (``known``: cached digests)."""
    entries = manifest.committed()
    for i in shard_ids:
        if i not in known:
            known[i] = entries[i].digest()
    return add_terms(0, [entry_term(i, known[i]) for i in shard_ids])


def sum_text(total: int) -> str:
    return f"{total:032x}"


def pointer_digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def shards_digest(
    manifest: ShardManifest, shard_ids: list[int], known: dict[int, str] | None = None
) -> str:
    """One digest over the manifest entries of ``shard_ids`` (what an index was built from).

    ``known``: entry digests already computed (each entry's digest hashes all its
    checksums; a flush reuses them, so it does not rehash every committed entry).
    """
    entries = manifest.committed()
    known = {} if known is None else known
    for i in shard_ids:
        if i not in known:
            known[i] = entries[i].digest()
    return pointer_digest([[i, known[i]] for i in sorted(shard_ids)])


def build_pointer(
    sites: dict[str, dict[str, Any]],
    refs: dict[str, list[list[str]]],
    runs: list[tuple[str, str, set[int]]],
    covered: set[int],
    total: int,
    attribution: str,
    chunk_rows: int,
) -> dict[str, Any]:
    """A format 5 pointer: each site's part ``sites`` (its chunk keys, AtP error sums), the
    chunks' [object, checksum] ``refs``, ``runs`` (object, checksum, shards), the shards it
    covers and their ``shards_sum`` ``total``, which attribution sums it holds, and the
    rows a chunk holds."""
    named = {key: sums for chunks in refs.values() for key, sums in chunks}
    named |= {key: run_checksum for key, run_checksum, _ in runs}
    # Named by its content: equal shards give an equal pointer, in any order.
    content = sites if not runs else [sites, [key for key, _, _ in runs]]
    return {
        "format": POINTER_FORMAT,
        "generation": f"c{pointer_digest(content)}",
        "shard_ranges": shard_ranges(covered),
        "shards_sum": sum_text(total),
        "chunk_rows": chunk_rows,
        "attribution": attribution,
        "sites": sites,
        "runs": [{"object": key, "shard_ranges": shard_ranges(shards)} for key, _, shards in runs],
        # Every object it names, as for format 2 (and a manifest entry's shard).
        "checksums": dict(sorted(named.items())),
    }


def pointer_bytes(pointer: dict[str, Any]) -> bytes:
    body = {**pointer, "digest": pointer_digest(pointer)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_pointer(raw: bytes, url: str) -> dict[str, Any]:
    """The pointer's fields; CorruptIndexError when it is unreadable or fails its own digest."""
    fix = f"`circuitscan repair {url}` rebuilds the index from the shards"
    try:
        pointer = json.loads(raw)
        generation = pointer["generation"]
        if "shard_ranges" in pointer:
            ok = _ranges_ok(pointer["shard_ranges"]) and isinstance(pointer["shards_sum"], str)
            runs = pointer.get("runs", [])
            ok = ok and isinstance(runs, list) and all(
                isinstance(run, dict) and isinstance(run.get("object"), str)
                and _ranges_ok(run.get("shard_ranges")) for run in runs
            )  # fmt: skip
        else:
            ok = all(isinstance(s, int) for s in pointer["shards"])
        ok = ok and isinstance(generation, str)
        if pointer.get("format", 1) >= CHUNKED_FORMAT:
            ok = ok and isinstance(pointer["sites"], dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptIndexError(
            f"index pointer {INDEX_POINTER} of {url} is unreadable; {fix}"
        ) from exc
    if not ok or "/" in generation or generation in ("", ".", ".."):
        raise CorruptIndexError(f"index pointer {INDEX_POINTER} of {url} is unreadable; {fix}")
    # Format 1 pointers held only these two fields; anything more must pass the digest
    # (a damaged "format" must not pass a pointer off as an unchecked one).
    if pointer.get("format", 1) >= CHECKED_FORMAT or set(pointer) - {"shards", "generation"}:
        claimed = pointer.pop("digest", None)
        if claimed != pointer_digest(pointer):
            raise CorruptIndexError(
                f"index pointer {INDEX_POINTER} of {url} fails its checksum; {fix}"
            )
    return pointer


def _ranges_ok(ranges: Any) -> bool:
    return isinstance(ranges, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(i, int) for i in r)
        and 0 <= r[0] < r[1] for r in ranges
    )  # fmt: skip


def named_objects(pointer: dict[str, Any]) -> set[str]:
    """The chunk and run objects a format 3 to 5 pointer names (none for older formats)."""
    checksums = pointer.get("checksums")
    if "sites" not in pointer or not isinstance(checksums, dict):
        return set()
    return {
        key
        for key in checksums
        if isinstance(key, str) and key.startswith(INDEX_PREFIX) and key != INDEX_POINTER
    }
