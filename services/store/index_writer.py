"""The merged per-feature index: summaries and top examples over every committed shard.

Each shard stores its own summaries (``sites/LABEL/summary``, ``.../top``);
the merged index folds them together so that "top examples of feature i"
never scans the store. It is persisted in generations: the arrays of
generation ``gNNNNNNNN`` go under ``index/gNNNNNNNN/``, then the pointer
``index/current.json`` (generation and the shard ids it covers) is
replaced, then the previous generation is deleted. A reader that finds a
pointer covering shards no longer committed ignores it and rebuilds from
the per-shard summaries.
"""

from __future__ import annotations

import json

from zarr.core.buffer import Buffer
from zarr.storage import MemoryStore

from circuitscan.schemas.store import StoreLayout
from circuitscan.services.store.backends import Backend
from circuitscan.services.store.encoding import INDEX_ROW_CHUNK, open_array, write_array
from circuitscan.services.store.manifest import ShardManifest
from circuitscan.services.store.shard_io import memory_store, read_summary
from circuitscan.services.store.summaries import FeatureIndex

INDEX_POINTER = "index/current.json"
FLUSH_EVERY = 16


class IndexWriter:
    """Loads, extends and persists one store's merged feature index."""

    def __init__(self, location: Backend, layout: StoreLayout, manifest: ShardManifest) -> None:
        self.location = location
        self.layout = layout
        self.manifest = manifest
        # Commits between flushes: a crash loses at most this many merges,
        # which the next reader redoes from the per-shard summaries.
        self.flush_every = FLUSH_EVERY
        self._index: dict[str, FeatureIndex] | None = None
        self._indexed: set[int] = set()
        self._unflushed = 0

    def feature_index(self, label: str) -> FeatureIndex:
        """Summaries and top-K examples of a site over every committed shard."""
        self.layout.site(label)
        index = self._current()
        return index[label]

    def _current(self) -> dict[str, FeatureIndex]:
        """The index with every committed shard merged in (loaded on first use)."""
        if self._index is None:
            self._index, self._indexed = self._load()
        for shard_id in sorted(set(self.manifest.committed()) - self._indexed):
            self._merge(self._index, shard_id)
        return self._index

    def after_commit(self, shard_id: int) -> None:
        """Fold just-committed shard ``shard_id`` in, flushing every ``flush_every`` commits."""
        # Merging loads the index once, then folds in just the new shard's
        # summaries: a loaded index already holds every other committed shard
        # (commits come through here; uncommits and refreshes drop the index),
        # so a commit costs the same however many shards are committed.
        if self.layout.sites:  # result-only stores (no SAE sites) have no feature index
            if self._index is None:
                self._current()
            elif shard_id not in self._indexed:
                self._merge(self._index, shard_id)
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def forget(self) -> None:
        """Drop the in-memory index (it is reloaded when next needed)."""
        self._index = None
        self._indexed = set()

    def discard(self) -> None:
        """Drop the persisted pointer too: the index may count a shard no longer committed.

        It is rebuilt from the per-shard summaries of the remaining shards when
        next needed.
        """
        self.location.delete_keys([INDEX_POINTER])
        self.forget()

    def _load(self) -> tuple[dict[str, FeatureIndex], set[int]]:
        k = self.layout.examples_per_feature
        index = {s.label: FeatureIndex.empty(s.d_sae, k) for s in self.layout.sites}
        raw = self.location.read_bytes(INDEX_POINTER)
        if raw is None:
            return index, set()
        pointer = json.loads(raw)
        shards = set(pointer["shards"])
        if not shards <= set(self.manifest.committed()):
            return index, set()
        base = f"index/{pointer['generation']}/"
        source = memory_store(self.location.read_prefix(base))
        for label, item in index.items():
            for name in item.__dataclass_fields__:
                stored = open_array(source, f"{base}{label}/{name}")[...]
                setattr(item, name, item.from_disk(name, stored))
        return index, shards

    def _merge(self, index: dict[str, FeatureIndex], shard_id: int) -> None:
        parts = [f"sites/{label}/{kind}/" for label in index for kind in ("summary", "top")]
        source = self.manifest.read_verified(shard_id, parts)
        start = self.manifest.entry(shard_id).prompt_start
        for label, item in index.items():
            item.merge(read_summary(source, shard_id, label, start))
        self._indexed.add(shard_id)

    def flush(self) -> None:
        """Persist the merged index (a new generation, then the pointer, then drop the old)."""
        if self._index is None:
            self._index, self._indexed = self._load()
            if self.layout.sites:
                self._current()
        index = self._index
        raw = self.location.read_bytes(INDEX_POINTER)
        old = json.loads(raw)["generation"] if raw is not None else None
        generation = f"g{(int(old[1:]) + 1) if old else 1:08d}"
        base = f"index/{generation}/"
        staging: dict[str, Buffer] = {}
        staged = MemoryStore(store_dict=staging)
        for label, item in index.items():
            for name in item.__dataclass_fields__:
                data = item.to_disk(name)
                chunk = (INDEX_ROW_CHUNK, *data.shape[1:])
                write_array(staged, f"{base}{label}/{name}", data, chunk=chunk)
        objects = {key: value.to_bytes() for key, value in staging.items()}
        self.location.write_many({k: v for k, v in objects.items() if k.startswith(base)})
        pointer = {"generation": generation, "shards": sorted(self._indexed)}
        self.location.write_bytes(INDEX_POINTER, json.dumps(pointer).encode())
        if old:
            self.location.delete_prefix(f"index/{old}/")
        self._unflushed = 0
