"""The commit manifest: which shards are visible, and checking their bytes against it.

A shard becomes visible when its entry (``manifest/NNNNNN.json``, with a
checksum of every object the shard holds) is written, after its data.
Readers trust the manifest and nothing else: every object read out of a
committed shard goes through :meth:`ShardManifest.fetch_verified`, so a
missing, truncated or altered object is a CorruptShardError naming it.

An entry that cannot be read back (truncated, altered, naming another shard)
makes that one shard damaged, not the store unreadable: the listing keeps it
aside (:meth:`ShardManifest.damaged`), reads of its prompts and of the merged
index (which would undercount without it) raise CorruptManifestError naming
the entry, every other shard reads as before, and a resume recomputes it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
from collections.abc import Sequence

from pydantic import ValidationError
from zarr.abc.store import Store

from circuitscan.schemas.store import ShardEntry, StoreLayout
from circuitscan.services.store.backends import Backend
from circuitscan.services.store.errors import (
    CorruptManifestError,
    CorruptShardError,
    ShardConflictError,
    StoreError,
)
from circuitscan.services.store.shard_io import checksum, memory_store, shard_prefix
from circuitscan.services.store.shard_pack import coalesce, pack_mismatches

log = logging.getLogger(__name__)

MANIFEST_PREFIX = "manifest/"
ENTRY_DIGEST = "entry_digest"
_INDEX_POINTER = "index/current.json"  # index_writer.INDEX_POINTER (which imports this module)
_ENTRY_KEY = re.compile(r"^manifest/(\d{6,})\.json$")


def manifest_key(shard_id: int) -> str:
    """Where shard ``shard_id``'s entry is stored."""
    return f"{MANIFEST_PREFIX}{shard_id:06d}.json"


def _entry_digest(document: dict[str, object]) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def entry_bytes(entry: ShardEntry) -> bytes:
    """The stored form of a manifest entry: its JSON and a digest of it (``entry_digest``).

    Keys are sorted: a worker lists its checksums in the order zarr finished
    writing the chunks (concurrently, so in any order), and a recomputed shard
    must give the same entry bytes as the first run (the digest never depended
    on the order, so entries written unsorted still read).
    """
    document = json.loads(entry.model_dump_json())
    document[ENTRY_DIGEST] = _entry_digest(document)
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _parse_entry(raw: bytes, key: str, url: str) -> ShardEntry:
    """A manifest entry read back; a truncated or altered one is named, not a traceback.

    The entry's own digest is checked first: an entry altered in place (a
    checksum's key renamed by a flipped bit, say) would otherwise still parse.
    Entries written before entries carried digests are read unverified.
    """
    fix = "delete it and resume the job to recompute that shard"
    try:
        document = json.loads(raw)
        if isinstance(document, dict) and ENTRY_DIGEST in document:
            claimed = document.pop(ENTRY_DIGEST)
            if claimed != _entry_digest(document):
                raise CorruptManifestError(
                    f"manifest entry {key} of {url} fails its checksum; {fix}"
                )
        return ShardEntry.model_validate(document)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ValidationError
        errors = exc.errors() if isinstance(exc, ValidationError) else []
        reason = errors[0]["msg"] if errors else type(exc).__name__
        raise CorruptManifestError(
            f"manifest entry {key} of {url} is unreadable ({reason}); {fix}"
        ) from exc


class ShardManifest:
    """The committed entries of one store (read once, then cached) and their verification."""

    def __init__(self, location: Backend, layout: StoreLayout, url: str) -> None:
        self.location = location
        self.layout = layout
        self.url = url
        self._entries: dict[int, ShardEntry] | None = None
        # Entries that cannot be read back, by the shard id their key names.
        self._damaged: dict[int, str] = {}
        # Objects of the shard just checked by a commit, reused by the index
        # merge that follows so that a commit reads each object once.
        self._recent: tuple[int, dict[str, bytes]] | None = None

    # --- entries ----------------------------------------------------------------------

    def read_entry(self, shard_id: int) -> ShardEntry | None:
        """Shard ``shard_id``'s entry as stored now (not the cached view), None if uncommitted.

        A worker reads only its own entry: per-shard cost never grows with the
        number of shards.
        """
        key = manifest_key(shard_id)
        raw = self.location.read_bytes(key)
        if raw is None:
            return None
        return self._checked(_parse_entry(raw, key, self.url), shard_id)

    def committed(self) -> dict[int, ShardEntry]:
        """Every committed entry by shard id (the live cached dict: callers must not change it)."""
        if self._entries is None:
            entries: dict[int, ShardEntry] = {}
            damaged: dict[int, str] = {}
            keys = [
                key for key in self.location.list_keys(MANIFEST_PREFIX) if _ENTRY_KEY.match(key)
            ]
            for key, raw in self.location.read_many(keys).items():
                if raw is None:
                    continue
                shard_id = int(key.removeprefix(MANIFEST_PREFIX).removesuffix(".json"))
                try:
                    entry = self._checked(_parse_entry(raw, key, self.url), shard_id)
                except CorruptManifestError as exc:
                    damaged[shard_id] = str(exc)
                    continue
                entries[entry.shard_id] = entry
            self._entries, self._damaged = entries, damaged
        return self._entries

    def _checked(self, entry: ShardEntry, shard_id: int) -> ShardEntry:
        """``entry`` when it can be the entry of ``shard_id`` here; CorruptManifestError else."""
        key = manifest_key(shard_id)
        fix = "delete it and resume the job to recompute that shard"
        if entry.shard_id != shard_id:  # a listing keys entries by their own shard id
            raise CorruptManifestError(
                f"manifest entry {key} of {self.url} names shard {entry.shard_id}; {fix}"
            )
        if entry.prompt_start != shard_id * self.layout.shard_size:
            raise CorruptManifestError(
                f"manifest entry {key} of {self.url} starts at prompt {entry.prompt_start}, "
                f"not where shard {shard_id} does; {fix}"
            )
        return entry

    def damaged(self) -> dict[int, str]:
        """Shards whose manifest entry cannot be read back, each with the reason (one line)."""
        self.committed()
        return dict(self._damaged)

    def raise_if_unreadable(self, shard_id: int) -> None:
        """CorruptManifestError when shard ``shard_id`` has no readable entry but should have:
        its entry is damaged, or missing while the merged index covers the shard."""
        self.raise_if_damaged(shard_id)
        if shard_id in self.committed():
            return
        raw = self.location.read_bytes(_INDEX_POINTER)
        try:
            pointer = json.loads(raw) if raw is not None else {}
            ranges = pointer.get("shard_ranges")
            if ranges is not None:  # format 4
                covered = any(start <= shard_id < stop for start, stop in ranges)
            else:
                covered = shard_id in pointer.get("shards", [])
            lost = "checksums" in pointer and covered
        except (ValueError, KeyError, TypeError):
            return  # a damaged pointer is reported by the index, not here
        if lost:  # uncommitting drops the pointer before the entry
            raise CorruptManifestError(
                f"manifest entry {manifest_key(shard_id)} of {self.url} is missing, but the "
                f"index covers shard {shard_id}; resume the job (or `circuitscan repair`) to "
                "recompute that shard"
            )

    def raise_if_damaged(self, shard_id: int | None = None) -> None:
        """CorruptManifestError when shard ``shard_id``'s entry (None: any entry) is damaged."""
        damaged = self.damaged()
        if shard_id is not None:
            if shard_id in damaged:
                raise CorruptManifestError(damaged[shard_id])
        elif damaged:
            first = min(damaged)
            more = f" ({len(damaged) - 1} more entries are damaged)" if len(damaged) > 1 else ""
            raise CorruptManifestError(damaged[first] + more)

    def entry(self, shard_id: int) -> ShardEntry:
        """The committed entry of ``shard_id`` (StoreError when it is not committed)."""
        entry = self.committed().get(shard_id)
        if entry is None:
            self.raise_if_unreadable(shard_id)
            raise StoreError(f"shard {shard_id} is not committed")
        return entry

    def n_prompts(self) -> int:
        """One past the highest committed prompt index (0 when empty)."""
        entries = self.committed().values()
        return max((e.prompt_start + e.n_prompts for e in entries), default=0)

    def n_tokens(self) -> int:
        """Tokens stored over all committed shards."""
        return sum(e.n_tokens for e in self.committed().values())

    def commit(self, entry: ShardEntry, *, verify: bool) -> bool:
        """Write ``entry`` (after checking the shard's bytes with ``verify``); False when
        an equal entry is committed already, ShardConflictError when another one is."""
        if entry.layout_hash != self.layout.layout_hash():
            raise ShardConflictError(
                f"shard {entry.shard_id} was written for layout {entry.layout_hash}, "
                f"this store has {self.layout.layout_hash()}"
            )
        existing = self.read_entry(entry.shard_id)
        if existing is not None:
            if existing.digest() != entry.digest():
                raise ShardConflictError(
                    f"shard {entry.shard_id} is already committed with other content"
                )
            return False
        if verify:
            bad = self.checksum_mismatches(entry)
            if bad:
                raise CorruptShardError(
                    f"shard {entry.shard_id}: stored data does not match the entry ({bad[:5]})"
                )
        self.location.write_bytes(manifest_key(entry.shard_id), entry_bytes(entry))
        # Only a manifest already in memory is extended: a worker-side handle
        # never lists the manifest just to record its own commit.
        if self._entries is not None:
            self._entries[entry.shard_id] = entry
        return True

    def remove(self, shard_id: int) -> None:
        """Delete shard ``shard_id``'s entry: the shard is invisible from here on."""
        self.location.delete_keys([manifest_key(shard_id)])
        if self._entries is not None:
            self._entries.pop(shard_id, None)
        self._damaged.pop(shard_id, None)

    def forget_recent(self) -> None:
        """Drop the objects kept from the last commit's check."""
        self._recent = None

    def refresh(self) -> None:
        """Forget the cached entries (see other writers' commits)."""
        self._entries = None
        self._damaged = {}
        self._recent = None

    # --- verification -----------------------------------------------------------------

    def checksum_mismatches(self, entry: ShardEntry) -> list[str]:
        """Objects (relative to the shard) whose stored bytes differ from ``entry``, sorted.

        A packed shard is read whole (one object): each member is checked, and
        the pack's header and size, so a damaged byte anywhere is named.
        """
        prefix = shard_prefix(entry.shard_id)
        objects = {
            key.removeprefix(prefix): data
            for key, data in self.location.read_prefix(prefix).items()
        }
        expected, bad = dict(entry.checksums), []
        if entry.pack is not None:
            data = objects.pop(entry.pack.key, None)
            bad = pack_mismatches(entry.pack, entry.checksums, data)
            for key, offset in entry.pack.offsets.items():
                size = int(expected.pop(key).split(":", 1)[0])
                if data is not None:
                    objects[key] = data[offset : offset + size]
            self._recent = (entry.shard_id, objects)
            loose = {key: value for key, value in objects.items() if key not in entry.pack.offsets}
        else:
            self._recent = (entry.shard_id, objects)
            loose = objects
        actual = {key: checksum(data) for key, data in loose.items()}
        keys = set(actual) | set(expected)
        bad += [k for k in keys if actual.get(k) != expected.get(k)]
        return sorted(bad)

    def verify(self, shard_id: int) -> bool:
        """True when the shard is committed and every stored byte matches its checksums."""
        entry = self.committed().get(shard_id)
        if entry is None:
            return False
        bad = self.checksum_mismatches(entry)
        if bad:
            log.warning("shard %d is corrupt: %d objects differ (%s)", shard_id, len(bad), bad[:5])
            return False
        return True

    def fetch_verified(self, shard_id: int, keys: Sequence[str]) -> dict[str, bytes]:
        """Objects of a committed shard (keys relative to it), checked against the manifest.

        Keys the manifest does not list are skipped (zarr leaves chunks that
        are all fill value unwritten); listed ones that are missing, truncated
        or altered raise CorruptShardError.
        """
        entry = self.entry(shard_id)
        keys = [key for key in keys if key in entry.checksums]
        if self._recent is not None and self._recent[0] == shard_id:
            data = {key: self._recent[1].get(key) for key in keys}
        else:
            data = _fetch(self.location, entry, keys)
        bad = [
            key
            for key in keys
            if (raw := data[key]) is None or checksum(raw) != entry.checksums[key]
        ]
        if bad:
            log.warning("shard %d is corrupt: %d objects differ (%s)", shard_id, len(bad), bad[:5])
            raise CorruptShardError(
                f"shard {shard_id} of {self.url} is corrupt (checksum mismatch in {bad[:3]}); "
                "`circuitscan resume --verify` on the store recomputes it"
            )
        return {key: raw for key in keys if (raw := data[key]) is not None}

    def read_verified(self, shard_id: int, parts: Sequence[str]) -> Store:
        """The shard's objects under ``parts`` (prefixes inside the shard), each checked
        against its manifest checksum, as an in-memory store to decode from.

        The keys come from the manifest (no listing).
        """
        entry = self.entry(shard_id)
        keys = [key for key in entry.checksums if key.startswith(tuple(parts))]
        prefix = shard_prefix(shard_id)
        objects = self.fetch_verified(shard_id, keys)
        return memory_store({prefix + key: raw for key, raw in objects.items()})


def _fetch(location: Backend, entry: ShardEntry, keys: Sequence[str]) -> dict[str, bytes | None]:
    """The stored bytes of ``keys`` (relative to the shard; None for missing ones).

    Packed members are byte ranges of the shard's pack: adjacent ones come in
    one ranged read. A member cut short by a truncated pack comes back short.
    """
    prefix = shard_prefix(entry.shard_id)
    offsets = entry.pack.offsets if entry.pack is not None else {}
    loose = [key for key in keys if key not in offsets]
    raw = location.read_many([prefix + key for key in loose]) if loose else {}
    data: dict[str, bytes | None] = {key: raw[prefix + key] for key in loose}
    packed = {
        key: (offsets[key], offsets[key] + int(entry.checksums[key].split(":", 1)[0]))
        for key in keys
        if key in offsets
    }
    if packed and entry.pack is not None:
        runs = coalesce(list(packed.values()), location.range_gap)
        parts = location.read_ranges(prefix + entry.pack.key, runs)
        starts = [start for start, _ in runs]
        for key, (start, stop) in packed.items():
            if parts is None:
                data[key] = None
                continue
            run = bisect.bisect_right(starts, start) - 1
            base = starts[run]
            data[key] = parts[run][start - base : stop - base]
    return data
