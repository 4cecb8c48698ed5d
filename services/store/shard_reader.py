"""Reading committed shards: decoded site and prompt shards, chunk-level rows, their caches.

Everything read here is verified against the manifest first
(:class:`~circuitscan.services.store.manifest.ShardManifest`). Four LRU
caches keep what repeated queries need: decoded site shards (a long-lived
reader such as the HTTP API raises ``site_cache_shards`` so that hot stores
are decoded once, not per point query), decoded prompt shards, parsed array
metadata, and decoded chunks for chunk-level reads (a feature page reads the
context of a dozen examples, each out of a 64k-entry chunk: verifying and
decompressing that chunk once, not per page, is most of the page's cost).

A committed shard's bytes never change, so a decoded chunk stays right for
as long as its entry does; chunks are keyed by the entry's digest as well,
so a shard recomputed by a repair (a new entry) is read afresh, never served
from the old bytes.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import ShardEntry, StoreLayout
from circuitscan.services.store.chunk_reads import ArrayMeta, read_rows
from circuitscan.services.store.errors import QueryRangeError, StoreError
from circuitscan.services.store.manifest import ShardManifest
from circuitscan.services.store.shard_io import (
    PromptShard,
    SiteShard,
    read_prompts,
    read_records,
    read_site,
)

SITE_CACHE_SHARDS = 16
# Prompt shards are small (token ids and offsets) and every top-examples
# answer touches up to N of them, so many more are kept.
_CACHE_PROMPT_SHARDS = 512
_CACHE_ARRAY_METAS = 4096
# Decoded chunks are bounded by bytes: a 64k-entry chunk is 128-256 KiB.
CHUNK_CACHE_BYTES = 128 << 20


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


class _DecodedChunks:
    """A bytes-bounded LRU of decoded, read-only chunks keyed by (shard, entry digest, chunk)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._chunks: OrderedDict[tuple[int, str, str], np.ndarray] = OrderedDict()

    def get(self, key: tuple[int, str, str]) -> np.ndarray | None:
        chunk = self._chunks.get(key)
        if chunk is not None:
            self._chunks.move_to_end(key)
        return chunk

    def put(self, key: tuple[int, str, str], chunk: np.ndarray) -> None:
        if chunk.nbytes > self.max_bytes:
            return
        old = self._chunks.pop(key, None)
        self.nbytes += chunk.nbytes - (old.nbytes if old is not None else 0)
        self._chunks[key] = chunk
        self.trim()

    def trim(self) -> None:
        while self.nbytes > self.max_bytes:
            _, dropped = self._chunks.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def drop_shard(self, shard_id: int) -> None:
        for key in [key for key in self._chunks if key[0] == shard_id]:
            self.nbytes -= self._chunks.pop(key).nbytes

    def clear(self) -> None:
        self._chunks.clear()
        self.nbytes = 0


class _ShardChunks:
    """The chunk cache seen from one committed shard entry (what chunk_reads.read_rows takes)."""

    def __init__(self, chunks: _DecodedChunks, shard_id: int, digest: str) -> None:
        self.chunks, self.shard_id, self.digest = chunks, shard_id, digest

    def get(self, key: str) -> np.ndarray | None:
        return self.chunks.get((self.shard_id, self.digest, key))

    def put(self, key: str, chunk: np.ndarray) -> None:
        self.chunks.put((self.shard_id, self.digest, key), chunk)


class ShardReader:
    """Verified, cached reads of one store's committed shards."""

    def __init__(self, manifest: ShardManifest, layout: StoreLayout) -> None:
        self.manifest = manifest
        self.layout = layout
        self.site_cache_shards = SITE_CACHE_SHARDS
        self._sites: OrderedDict[tuple[int, str], SiteShard] = OrderedDict()
        self._prompts: OrderedDict[int, PromptShard] = OrderedDict()
        self._metas: OrderedDict[tuple[int, str, str], ArrayMeta] = OrderedDict()
        self._chunks = _DecodedChunks(CHUNK_CACHE_BYTES)
        # The digest of each entry chunks were cached under (the entry object
        # itself is kept so a refreshed manifest's new entry is hashed again).
        self._digests: dict[int, tuple[ShardEntry, str]] = {}

    @property
    def chunk_cache_bytes(self) -> int:
        """Upper bound on the bytes of decoded chunks kept (0: none kept)."""
        return self._chunks.max_bytes

    @chunk_cache_bytes.setter
    def chunk_cache_bytes(self, value: int) -> None:
        self._chunks.max_bytes = max(0, int(value))
        self._chunks.trim()

    def forget(self, shard_id: int) -> None:
        """Drop what is cached of one shard (its data is being replaced or deleted)."""
        # Metadata is keyed by (shard, array) and cheap to reparse: drop it all.
        self._metas.clear()
        self._prompts.pop(shard_id, None)
        self._chunks.drop_shard(shard_id)
        self._digests.pop(shard_id, None)
        for label in [s.label for s in self.layout.sites]:
            self._sites.pop((shard_id, label), None)

    def clear(self) -> None:
        """Drop every cached shard."""
        self._metas.clear()
        self._sites.clear()
        self._prompts.clear()
        self._chunks.clear()
        self._digests.clear()

    def shard_of_prompt(self, prompt: int) -> ShardEntry:
        """The committed shard holding a global prompt index (QueryRangeError naming the bound)."""
        shard_id = prompt // self.layout.shard_size
        if prompt >= 0:  # the common case, without summing the manifest for the bound
            found = self.manifest.committed().get(shard_id)
            if found is not None and prompt < found.prompt_start + found.n_prompts:
                return found
        if prompt >= 0 and shard_id not in self.manifest.committed():
            # A shard whose manifest entry is damaged or lost is named, not out of range.
            self.manifest.raise_if_unreadable(shard_id)
        total = self.manifest.n_prompts()
        if not total:
            raise QueryRangeError(
                f"prompt {prompt} is out of range: the store holds no prompts yet "
                "(no shard is committed)"
            )
        if not 0 <= prompt < total:
            raise QueryRangeError(
                f"prompt {prompt} is out of range: the store holds prompts 0..{total - 1}"
            )
        shard_id = prompt // self.layout.shard_size
        entry = self.manifest.committed().get(shard_id)
        if entry is None or prompt >= entry.prompt_start + entry.n_prompts:
            raise QueryRangeError(
                f"prompt {prompt} lies in shard {shard_id}, which is not committed"
            )
        return entry

    def read_rows(self, shard_id: int, array: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of one 1-D array of a committed shard (path relative
        to the shard, e.g. ``sites/L6.z/feature_ids``), fetching, verifying and
        decoding only the chunks that hold them."""
        digest = self._digest(shard_id)
        key = (shard_id, digest, array)  # a recomputed shard may have other shapes
        meta = self._metas.get(key)
        if meta is None:
            document = f"{array}/zarr.json"
            raw = self.manifest.fetch_verified(shard_id, [document]).get(document)
            if raw is None:
                raise StoreError(f"shard {shard_id} has no array {array}")
            meta = self._metas[key] = ArrayMeta.parse(raw)
            _trim(self._metas, _CACHE_ARRAY_METAS)

        def fetch(keys: list[str]) -> dict[str, bytes]:
            return self.manifest.fetch_verified(shard_id, keys)

        cache = _ShardChunks(self._chunks, shard_id, digest) if self._chunks.max_bytes else None
        return read_rows(fetch, array, start, stop, meta, cache)

    def _digest(self, shard_id: int) -> str:
        """The digest of the shard's committed entry (hashed once per entry object)."""
        entry = self.manifest.entry(shard_id)
        known = self._digests.get(shard_id)
        if known is None or known[0] is not entry:
            known = self._digests[shard_id] = (entry, entry.digest())
        return known[1]

    def cached_site_shard(self, shard_id: int, label: str) -> SiteShard | None:
        """The decoded site shard when it is already in memory, else None (no I/O)."""
        return self._sites.get((shard_id, label))

    def site_shard(self, shard_id: int, label: str) -> SiteShard:
        """Decoded data of one site of one committed shard (verified on first read, cached)."""
        self.layout.site(label)
        key = (shard_id, label)
        if key not in self._sites:
            source = self.manifest.read_verified(shard_id, [f"sites/{label}/"])
            self._sites[key] = read_site(source, self.layout, shard_id, label)
            _trim(self._sites, self.site_cache_shards)
        self._sites.move_to_end(key)
        return self._sites[key]

    def prompt_shard(self, shard_id: int) -> PromptShard:
        """Token ids and prompt offsets of one committed shard (verified, cached)."""
        if shard_id not in self._prompts:
            source = self.manifest.read_verified(
                shard_id, ["prompts/token_ids/", "prompts/prompt_offsets/"]
            )
            self._prompts[shard_id] = read_prompts(source, shard_id)
            _trim(self._prompts, _CACHE_PROMPT_SHARDS)
        self._prompts.move_to_end(shard_id)
        return self._prompts[shard_id]

    def prompt_records(self, shard_id: int) -> list[PromptRecord]:
        """The PromptRecords of one committed shard."""
        return read_records(self.manifest.read_verified(shard_id, ["prompts/records/"]), shard_id)

    def prompt_tokens(self, prompt: int) -> np.ndarray:
        """Token ids of one prompt (BOS first)."""
        entry = self.shard_of_prompt(prompt)
        data = self.prompt_shard(entry.shard_id)
        local = prompt - entry.prompt_start
        return data.token_ids[data.prompt_offsets[local] : data.prompt_offsets[local + 1]]
