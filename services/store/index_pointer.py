"""The merged index's pointer, ``index/current.json``: what it names and how it is checked.

Format 3 (index_writer.py): the shards the index covers and a digest of their
manifest entries, each site's row chunks (index_chunks.py) in order, the
checksum of every object it names, and a digest of the pointer itself.
Format 2 named one zarr hierarchy per generation with a checksum per object;
format 1, only the generation and the shards (read unverified).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from circuitscan.services.store.errors import CorruptIndexError
from circuitscan.services.store.manifest import ShardManifest

INDEX_POINTER = "index/current.json"
INDEX_PREFIX = "index/"
POINTER_FORMAT = 3
CHECKED_FORMAT = 2  # pointers from this format on carry checksums and a digest of themselves


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


def pointer_bytes(pointer: dict[str, Any]) -> bytes:
    body = {**pointer, "digest": pointer_digest(pointer)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_pointer(raw: bytes, url: str) -> dict[str, Any]:
    """The pointer's fields; CorruptIndexError when it is unreadable or fails its own digest."""
    fix = f"`circuitscan repair {url}` rebuilds the index from the shards"
    try:
        pointer = json.loads(raw)
        shards = pointer["shards"]
        generation = pointer["generation"]
        ok = isinstance(generation, str) and all(isinstance(s, int) for s in shards)
        if pointer.get("format", 1) >= POINTER_FORMAT:
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


def named_objects(pointer: dict[str, Any]) -> set[str]:
    """The chunk objects a format 3 pointer names (none for older formats)."""
    checksums = pointer.get("checksums")
    if "sites" not in pointer or not isinstance(checksums, dict):
        return set()
    return {
        key
        for key in checksums
        if isinstance(key, str) and key.startswith(INDEX_PREFIX) and key != INDEX_POINTER
    }
