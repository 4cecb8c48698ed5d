"""Reading committed shards: decoded site and prompt shards, chunk-level rows, their caches.

Everything read here is verified against the manifest first
(:class:`~circuitscan.services.store.manifest.ShardManifest`). Three LRU
caches keep what repeated queries need: decoded site shards (a long-lived
reader such as the HTTP API raises ``site_cache_shards`` so that hot stores
are decoded once, not per point query), decoded prompt shards, and parsed
array metadata for chunk-level reads.
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


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


class ShardReader:
    """Verified, cached reads of one store's committed shards."""

    def __init__(self, manifest: ShardManifest, layout: StoreLayout) -> None:
        self.manifest = manifest
        self.layout = layout
        self.site_cache_shards = SITE_CACHE_SHARDS
        self._sites: OrderedDict[tuple[int, str], SiteShard] = OrderedDict()
        self._prompts: OrderedDict[int, PromptShard] = OrderedDict()
        self._metas: OrderedDict[tuple[int, str], ArrayMeta] = OrderedDict()

    def forget(self, shard_id: int) -> None:
        """Drop what is cached of one shard (its data is being replaced or deleted)."""
        # Metadata is keyed by (shard, array) and cheap to reparse: drop it all.
        self._metas.clear()
        self._prompts.pop(shard_id, None)
        for label in [s.label for s in self.layout.sites]:
            self._sites.pop((shard_id, label), None)

    def clear(self) -> None:
        """Drop every cached shard."""
        self._metas.clear()
        self._sites.clear()
        self._prompts.clear()

    def shard_of_prompt(self, prompt: int) -> ShardEntry:
        """The committed shard holding a global prompt index (QueryRangeError naming the bound)."""
        shard_id = prompt // self.layout.shard_size
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
        key = (shard_id, array)
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

        return read_rows(fetch, array, start, stop, meta)

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
