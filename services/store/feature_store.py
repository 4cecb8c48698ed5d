"""The feature store: sharded writes, a commit manifest, verification and resume.

Roles: a worker (any process or node, given only the URL) calls
``write_shard``; the job driver calls ``commit_shard`` with the returned
entry; readers see only committed shards. See the package docstring.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import Store

from circuitscan.pipelines.site_cache import SiteCache
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import ShardEntry, StoreLayout
from circuitscan.services.store.backends import (
    delete_keys,
    list_keys,
    open_backend,
    read_bytes,
    read_many,
    read_prefix,
    write_bytes,
    write_many,
)
from circuitscan.services.store.chunk_reads import ArrayMeta, read_rows
from circuitscan.services.store.encoding import INDEX_ROW_CHUNK, open_array, write_array
from circuitscan.services.store.shard_io import (
    PromptShard,
    SiteShard,
    checksum,
    memory_store,
    read_prompts,
    read_records,
    read_site,
    read_summary,
    shard_prefix,
    write_shard_arrays,
)
from circuitscan.services.store.summaries import FeatureIndex

log = logging.getLogger(__name__)

LAYOUT_ATTR = "circuitscan_layout"
INDEX_POINTER = "index/current.json"
_CACHE_SHARDS = 16
# Prompt shards are small (token ids and offsets) and every top-examples
# answer touches up to N of them, so many more are kept.
_CACHE_PROMPT_SHARDS = 512
_CACHE_ARRAY_METAS = 4096


class StoreError(ValueError):
    """Base class of feature-store errors (bad input or a store in a bad state)."""


class StoreNotFoundError(StoreError):
    """No feature store at that URL."""


class StoreLayoutMismatchError(StoreError):
    """The store exists with a different layout, fingerprint or job hash."""


class ShardConflictError(StoreError):
    """A shard is committed with different content than the entry offered."""


class CorruptShardError(StoreError):
    """A committed shard whose stored bytes do not match its manifest checksums."""


def _manifest_key(shard_id: int) -> str:
    return f"manifest/{shard_id:06d}.json"


def _layout_diff(old: StoreLayout, new: StoreLayout) -> list[str]:
    a, b = old.model_dump(exclude={"job_spec"}), new.model_dump(exclude={"job_spec"})
    return [name for name in a if a[name] != b[name]]


class FeatureStore:
    """A Zarr v3 feature store at a URL (local path, memory://NAME or s3://BUCKET/PREFIX)."""

    def __init__(self, url: str, backend: Store, layout: StoreLayout) -> None:
        self.url = url
        self.backend = backend
        self.layout = layout
        self.index_flush_every = 16
        self._entries: dict[int, ShardEntry] | None = None
        self._verified: set[int] = set()
        self._sites: OrderedDict[tuple[int, str], SiteShard] = OrderedDict()
        # Decoded site shards kept in memory; a long-lived reader (the HTTP API)
        # raises it so that hot stores are decoded once, not per point query.
        self.site_cache_shards = _CACHE_SHARDS
        self._prompts: OrderedDict[int, PromptShard] = OrderedDict()
        self._index: dict[str, FeatureIndex] | None = None
        self._indexed: set[int] = set()
        self._unflushed = 0
        # Objects of the shard just checked by commit_shard, reused by the index
        # merge that follows so a commit reads each object once.
        self._recent: tuple[int, dict[str, bytes]] | None = None
        self._metas: OrderedDict[tuple[int, str], ArrayMeta] = OrderedDict()

    # --- opening -----------------------------------------------------------------

    @classmethod
    def create(cls, url: str, layout: StoreLayout, *, overwrite: bool = False) -> FeatureStore:
        """Create a store, or reopen one with an equal layout (resume).

        An existing store with a different layout (sites, SAE/model
        fingerprints, job hash, dtypes...) or a non-empty non-store location is
        refused with StoreLayoutMismatchError unless ``overwrite`` (which
        deletes everything there first).
        """
        backend = open_backend(url)
        existing = cls._read_layout(backend)
        if existing is not None and not overwrite:
            if existing.layout_hash() == layout.layout_hash():
                return cls(url, backend, existing)
            raise StoreLayoutMismatchError(
                f"store {url} exists with a different layout (fields differ: "
                f"{_layout_diff(existing, layout)}); pass overwrite=True to replace it"
            )
        if existing is None and not overwrite and list_keys(backend, ""):
            raise StoreLayoutMismatchError(
                f"{url} is not empty and holds no feature store; pass overwrite=True to replace it"
            )
        if overwrite:
            delete_keys(backend, list_keys(backend, ""))
        zarr.create_group(
            backend,
            overwrite=True,
            attributes={
                LAYOUT_ATTR: layout.model_dump(mode="json"),
                "layout_hash": layout.layout_hash(),
            },
        )
        zarr.create_group(backend, path="shards", overwrite=True)
        return cls(url, backend, layout)

    @classmethod
    def open(cls, url: str) -> FeatureStore:
        """Open an existing store (StoreNotFoundError when there is none)."""
        if "://" not in url or url.startswith("file://"):
            # zarr's LocalStore makes its directory on open: look before opening, so
            # a mistyped path is reported and not left behind as an empty folder.
            local = Path(url.removeprefix("file://")).expanduser()
            if not local.exists():
                raise StoreNotFoundError(f"no feature store at {url}")
        backend = open_backend(url)
        layout = cls._read_layout(backend)
        if layout is None:
            raise StoreNotFoundError(f"no feature store at {url}")
        return cls(url, backend, layout)

    @staticmethod
    def _read_layout(backend: Store) -> StoreLayout | None:
        raw = read_bytes(backend, "zarr.json")
        if raw is None:
            return None
        attrs = json.loads(raw).get("attributes", {})
        if LAYOUT_ATTR not in attrs:
            return None
        return StoreLayout.model_validate(attrs[LAYOUT_ATTR])

    # --- writing and committing --------------------------------------------------

    def write_shard(
        self,
        shard_id: int,
        prompts: Sequence[PromptRecord],
        token_ids: Sequence[Sequence[int]],
        site_caches: Mapping[str, SiteCache],
    ) -> ShardEntry:
        """Write shard ``shard_id``'s data under its own prefix; return its manifest entry.

        Safe to call from any process given only the URL. A committed shard
        is left untouched (its committed entry is returned); leftovers of an
        uncommitted attempt are deleted first. The shard is invisible until
        ``commit_shard`` is called with the returned entry.
        """
        committed = self._read_entry(shard_id)
        if committed is not None:
            return committed
        self._drop_shard_data(shard_id)
        return write_shard_arrays(
            self.backend, self.layout, shard_id, prompts, token_ids, site_caches
        )

    def commit_shard(self, entry: ShardEntry, *, verify: bool = True) -> bool:
        """Make a written shard visible (driver side). Returns False when already committed.

        The entry must match this store's layout; with ``verify`` the shard's
        bytes are checked against the entry's checksums before committing.
        """
        if entry.layout_hash != self.layout.layout_hash():
            raise ShardConflictError(
                f"shard {entry.shard_id} was written for layout {entry.layout_hash}, "
                f"this store has {self.layout.layout_hash()}"
            )
        existing = self._read_entry(entry.shard_id)
        if existing is not None:
            if existing.digest() != entry.digest():
                raise ShardConflictError(
                    f"shard {entry.shard_id} is already committed with other content"
                )
            return False
        if verify:
            bad = self._checksum_mismatches(entry)
            if bad:
                raise CorruptShardError(
                    f"shard {entry.shard_id}: stored data does not match the entry ({bad[:5]})"
                )
        write_bytes(self.backend, _manifest_key(entry.shard_id), entry.model_dump_json().encode())
        entries = self._committed()
        entries[entry.shard_id] = entry
        self._verified.add(entry.shard_id)
        # Merging loads the index once, then folds in just this shard's summaries.
        if self.layout.sites:  # result-only stores (no SAE sites) have no feature index
            self.feature_index(self.layout.sites[0].label)
        self._recent = None
        self._unflushed += 1
        if self._unflushed >= self.index_flush_every:
            self.flush_index()
        return True

    # --- manifest ---------------------------------------------------------------

    def _read_entry(self, shard_id: int) -> ShardEntry | None:
        raw = read_bytes(self.backend, _manifest_key(shard_id))
        return None if raw is None else ShardEntry.model_validate_json(raw)

    def _committed(self) -> dict[int, ShardEntry]:
        if self._entries is None:
            entries = {}
            for raw in read_many(self.backend, list_keys(self.backend, "manifest/")).values():
                if raw is not None:
                    entry = ShardEntry.model_validate_json(raw)
                    entries[entry.shard_id] = entry
            self._entries = entries
        return self._entries

    def refresh(self) -> None:
        """Forget cached manifest, index and decoded shards (see other writers' commits)."""
        self._entries = None
        self._index = None
        self._indexed = set()
        self._recent = None
        self._metas.clear()
        self._sites.clear()
        self._prompts.clear()

    def committed_entries(self) -> dict[int, ShardEntry]:
        """Manifest entries of committed shards, by shard id."""
        return dict(self._committed())

    def committed_shard_ids(self) -> set[int]:
        """Ids of the committed (visible) shards."""
        return set(self._committed())

    def n_prompts(self) -> int:
        """One past the highest committed prompt index (0 when empty)."""
        entries = self._committed().values()
        return max((e.prompt_start + e.n_prompts for e in entries), default=0)

    def n_tokens(self) -> int:
        """Tokens stored over all committed shards."""
        return sum(e.n_tokens for e in self._committed().values())

    # --- verification and resume ---------------------------------------------------

    def _checksum_mismatches(self, entry: ShardEntry) -> list[str]:
        prefix = shard_prefix(entry.shard_id)
        objects = read_prefix(self.backend, prefix)
        self._recent = (entry.shard_id, objects)
        actual = {key.removeprefix(prefix): checksum(data) for key, data in objects.items()}
        keys = set(actual) | set(entry.checksums)
        return sorted(k for k in keys if actual.get(k) != entry.checksums.get(k))

    def verify_shard(self, shard_id: int) -> bool:
        """True when the shard is committed and every stored byte matches its checksums."""
        entry = self._committed().get(shard_id)
        if entry is None:
            return False
        bad = self._checksum_mismatches(entry)
        if bad:
            log.warning("shard %d is corrupt: %d objects differ (%s)", shard_id, len(bad), bad[:5])
            return False
        self._verified.add(shard_id)
        return True

    def uncommitted(self, all_ids: Iterable[int], *, verify: bool = True) -> list[int]:
        """The shard ids of ``all_ids`` a resume must (re)compute, sorted.

        Committed shards that fail verification are reported (warning log,
        ``self.corrupt_shards``), uncommitted and included.
        """
        committed = self._committed()
        todo = set()
        self.corrupt_shards: list[int] = []
        for shard_id in all_ids:
            if shard_id not in committed:
                todo.add(shard_id)
            elif verify and not self.verify_shard(shard_id):
                self.corrupt_shards.append(shard_id)
                self.uncommit(shard_id)
                todo.add(shard_id)
        return sorted(todo)

    def uncommit(self, shard_id: int) -> None:
        """Hide a shard and delete its data (its manifest entry goes first)."""
        delete_keys(self.backend, [_manifest_key(shard_id)])
        self._committed().pop(shard_id, None)
        self._verified.discard(shard_id)
        self._drop_shard_data(shard_id)
        # The merged index may count this shard: drop it; it is rebuilt from
        # the per-shard summaries of the remaining shards when next needed.
        delete_keys(self.backend, [INDEX_POINTER])
        self._index = None
        self._indexed = set()

    def _drop_shard_data(self, shard_id: int) -> None:
        delete_keys(self.backend, list_keys(self.backend, shard_prefix(shard_id)))
        self._recent = None
        self._metas.clear()
        self._prompts.pop(shard_id, None)
        for label in [s.label for s in self.layout.sites]:
            self._sites.pop((shard_id, label), None)

    def _read_verified(self, shard_id: int, parts: Sequence[str]) -> Store:
        """The shard's objects under ``parts`` (prefixes inside the shard), each checked
        against its manifest checksum, as an in-memory store to decode from.

        Readers trust the manifest: the keys come from it (no listing), and a
        missing, truncated or altered object is a CorruptShardError.
        """
        entry = self._committed().get(shard_id)
        if entry is None:
            raise StoreError(f"shard {shard_id} is not committed")
        keys = [key for key in entry.checksums if key.startswith(tuple(parts))]
        prefix = shard_prefix(shard_id)
        objects = self._fetch_verified(shard_id, keys)
        return memory_store({prefix + key: raw for key, raw in objects.items()})

    def _fetch_verified(self, shard_id: int, keys: Sequence[str]) -> dict[str, bytes]:
        """Objects of a committed shard (keys relative to it), checked against the manifest.

        Keys the manifest does not list are skipped (zarr leaves chunks that
        are all fill value unwritten); listed ones that are missing, truncated
        or altered raise CorruptShardError.
        """
        entry = self._committed().get(shard_id)
        if entry is None:
            raise StoreError(f"shard {shard_id} is not committed")
        prefix = shard_prefix(shard_id)
        keys = [key for key in keys if key in entry.checksums]
        if self._recent is not None and self._recent[0] == shard_id:
            data = {prefix + key: self._recent[1].get(prefix + key) for key in keys}
        else:
            data = read_many(self.backend, [prefix + key for key in keys])
        bad = [
            key
            for key in keys
            if (raw := data[prefix + key]) is None or checksum(raw) != entry.checksums[key]
        ]
        if bad:
            log.warning("shard %d is corrupt: %d objects differ (%s)", shard_id, len(bad), bad[:5])
            raise CorruptShardError(
                f"shard {shard_id} of {self.url} is corrupt (checksum mismatch in {bad[:3]}); "
                "resume the job to recompute it"
            )
        return {key: data[prefix + key] for key in keys}  # type: ignore[misc]

    def read_rows(self, shard_id: int, array: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of one 1-D array of a committed shard (path relative
        to the shard, e.g. ``sites/L6.z/feature_ids``), fetching, verifying and
        decoding only the chunks that hold them."""
        key = (shard_id, array)
        meta = self._metas.get(key)
        if meta is None:
            raw = self._fetch_verified(shard_id, [f"{array}/zarr.json"]).get(f"{array}/zarr.json")
            if raw is None:
                raise StoreError(f"shard {shard_id} has no array {array}")
            meta = self._metas[key] = ArrayMeta.parse(raw)
            while len(self._metas) > _CACHE_ARRAY_METAS:
                self._metas.popitem(last=False)
        return read_rows(
            lambda keys: self._fetch_verified(shard_id, keys), array, start, stop, meta
        )

    def cached_site_shard(self, shard_id: int, label: str) -> SiteShard | None:
        """The decoded site shard when it is already in memory, else None (no I/O)."""
        return self._sites.get((shard_id, label))

    def _ensure_verified(self, shard_id: int) -> None:
        if shard_id not in self._committed():
            raise StoreError(f"shard {shard_id} is not committed")
        if shard_id not in self._verified and not self.verify_shard(shard_id):
            raise CorruptShardError(
                f"shard {shard_id} of {self.url} is corrupt (checksum mismatch); "
                "resume the job to recompute it"
            )

    # --- reading ---------------------------------------------------------------------

    def shard_of_prompt(self, prompt: int) -> ShardEntry:
        """The committed shard holding a global prompt index (StoreError naming the bound)."""
        total = self.n_prompts()
        if not 0 <= prompt < total:
            raise StoreError(
                f"prompt {prompt} is out of range: the store holds prompts 0..{total - 1}"
            )
        shard_id = prompt // self.layout.shard_size
        entry = self._committed().get(shard_id)
        if entry is None or prompt >= entry.prompt_start + entry.n_prompts:
            raise StoreError(f"prompt {prompt} lies in shard {shard_id}, which is not committed")
        return entry

    def site_shard(self, shard_id: int, label: str) -> SiteShard:
        """Decoded data of one site of one committed shard (verified on first read, cached)."""
        self.layout.site(label)
        key = (shard_id, label)
        if key not in self._sites:
            source = self._read_verified(shard_id, [f"sites/{label}/"])
            self._sites[key] = read_site(source, self.layout, shard_id, label)
            while len(self._sites) > self.site_cache_shards:
                self._sites.popitem(last=False)
        self._sites.move_to_end(key)
        return self._sites[key]

    def prompt_shard(self, shard_id: int) -> PromptShard:
        """Token ids and prompt offsets of one committed shard (verified, cached)."""
        if shard_id not in self._prompts:
            source = self._read_verified(
                shard_id, ["prompts/token_ids/", "prompts/prompt_offsets/"]
            )
            self._prompts[shard_id] = read_prompts(source, shard_id)
            while len(self._prompts) > _CACHE_PROMPT_SHARDS:
                self._prompts.popitem(last=False)
        self._prompts.move_to_end(shard_id)
        return self._prompts[shard_id]

    def prompt_records(self, shard_id: int) -> list[PromptRecord]:
        """The PromptRecords of one committed shard."""
        return read_records(self._read_verified(shard_id, ["prompts/records/"]), shard_id)

    def prompt_tokens(self, prompt: int) -> np.ndarray:
        """Token ids of one prompt (BOS first)."""
        entry = self.shard_of_prompt(prompt)
        data = self.prompt_shard(entry.shard_id)
        local = prompt - entry.prompt_start
        return data.token_ids[data.prompt_offsets[local] : data.prompt_offsets[local + 1]]

    # --- merged per-feature index ----------------------------------------------------

    def feature_index(self, label: str) -> FeatureIndex:
        """Summaries and top-K examples of a site over every committed shard."""
        self.layout.site(label)
        if self._index is None:
            self._load_index()
        assert self._index is not None
        for shard_id in sorted(set(self._committed()) - self._indexed):
            self._merge_into_index(shard_id)
        return self._index[label]

    def _load_index(self) -> None:
        k = self.layout.examples_per_feature
        index = {s.label: FeatureIndex.empty(s.d_sae, k) for s in self.layout.sites}
        indexed: set[int] = set()
        raw = read_bytes(self.backend, INDEX_POINTER)
        if raw is not None:
            pointer = json.loads(raw)
            shards = set(pointer["shards"])
            if shards <= set(self._committed()):
                base = f"index/{pointer['generation']}/"
                source = memory_store(read_prefix(self.backend, base))
                for label, item in index.items():
                    for name in item.__dataclass_fields__:
                        stored = open_array(source, f"{base}{label}/{name}")[...]
                        setattr(item, name, item.from_disk(name, stored))
                indexed = shards
        self._index, self._indexed = index, indexed

    def _merge_into_index(self, shard_id: int) -> None:
        assert self._index is not None
        parts = [f"sites/{label}/{kind}/" for label in self._index for kind in ("summary", "top")]
        source = self._read_verified(shard_id, parts)
        for label, item in self._index.items():
            start = self._committed()[shard_id].prompt_start
            item.merge(read_summary(source, shard_id, label, start))
        self._indexed.add(shard_id)

    def flush_index(self) -> None:
        """Persist the merged index (a new generation, then the pointer, then drop the old)."""
        if self._index is None:
            self._load_index()
            if self.layout.sites:
                self.feature_index(self.layout.sites[0].label)
        assert self._index is not None
        raw = read_bytes(self.backend, INDEX_POINTER)
        old = json.loads(raw)["generation"] if raw is not None else None
        generation = f"g{(int(old[1:]) + 1) if old else 1:08d}"
        base = f"index/{generation}/"
        staged = memory_store({})
        for label, item in self._index.items():
            for name in item.__dataclass_fields__:
                data = item.to_disk(name)
                chunk = (INDEX_ROW_CHUNK, *data.shape[1:])
                write_array(staged, f"{base}{label}/{name}", data, chunk=chunk)
        objects = {key: value.to_bytes() for key, value in staged._store_dict.items()}
        write_many(self.backend, {k: v for k, v in objects.items() if k.startswith(base)})
        pointer = {"generation": generation, "shards": sorted(self._indexed)}
        write_bytes(self.backend, INDEX_POINTER, json.dumps(pointer).encode())
        if old:
            delete_keys(self.backend, list_keys(self.backend, f"index/{old}/"))
        self._unflushed = 0
