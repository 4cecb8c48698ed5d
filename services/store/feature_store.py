"""The feature store: sharded writes, a commit manifest, verification and resume.

Roles: a worker (any process or node, given only the URL) calls
``write_shard``; the job driver calls ``commit_shard`` with the returned
entry; readers see only committed shards. See the package docstring.

``FeatureStore`` composes three parts and keeps the protocols that span
them (creating, committing, resuming): the manifest and its verification
(``manifest.py``), verified and cached reads (``shard_reader.py``) and the
merged feature index (``index_writer.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.abc.store import Store

from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import ShardEntry, StoreLayout
from circuitscan.services.store.backends import Backend, open_location
from circuitscan.services.store.errors import (
    CorruptLayoutError,
    CorruptManifestError,
    CorruptShardError,
    QueryRangeError,
    ShardConflictError,
    StoreError,
    StoreLayoutMismatchError,
    StoreNotFoundError,
)
from circuitscan.services.store.index_writer import IndexWriter
from circuitscan.services.store.job_record import record_layout
from circuitscan.services.store.manifest import MANIFEST_PREFIX, ShardManifest
from circuitscan.services.store.paired_io import (
    PairedSite,
    ShardPairs,
    read_paired_site,
    read_shard_pairs,
)
from circuitscan.services.store.shard_io import (
    PromptShard,
    SiteShard,
    shard_prefix,
    write_shard_arrays,
)
from circuitscan.services.store.shard_reader import ShardReader
from circuitscan.services.store.store_keys import clear_store, refuse_non_store
from circuitscan.services.store.summaries import FeatureIndex

if TYPE_CHECKING:  # the caches come from writers; readers never load torch
    from circuitscan.pipelines.site_cache import SiteCache

# The errors are defined in errors.py; importing them from here keeps working.
__all__ = [
    "LAYOUT_ATTR",
    "CorruptManifestError",
    "CorruptShardError",
    "FeatureStore",
    "QueryRangeError",
    "ShardConflictError",
    "StoreError",
    "StoreLayoutMismatchError",
    "StoreNotFoundError",
]

LAYOUT_ATTR = "circuitscan_layout"


def _layout_diff(old: StoreLayout, new: StoreLayout) -> list[str]:
    a, b = old.model_dump(exclude={"job_spec"}), new.model_dump(exclude={"job_spec"})
    return [name for name in a if a[name] != b[name]]


def _read_layout(location: Backend, url: str | None = None) -> StoreLayout | None:
    """The store's layout; None where there is no store (CorruptLayoutError for a damaged one).

    A layout document that does not parse, or a location holding a store's
    manifest without one, is a damaged store (named with ``url``), never taken
    for an empty location.
    """
    where = url or location.describe()
    fix = "restore it from a copy of the store, or rerun the job into a new store"
    raw = location.read_bytes("zarr.json")
    if raw is None:
        if location.list_keys("manifest/"):
            raise CorruptLayoutError(
                f"layout document zarr.json of {where} is missing (the store's manifest is "
                f"there); {fix}"
            )
        return None
    try:
        document = json.loads(raw)
        attrs = document.get("attributes", {}) if isinstance(document, dict) else None
        if not isinstance(attrs, dict):
            raise ValueError("no attributes")
        if LAYOUT_ATTR not in attrs:
            if location.list_keys("manifest/"):
                raise ValueError("no circuitscan layout")
            return None
        return StoreLayout.model_validate(attrs[LAYOUT_ATTR])
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ValidationError
        raise CorruptLayoutError(
            f"layout document zarr.json of {where} is unreadable ({type(exc).__name__}); {fix}"
        ) from exc


class FeatureStore:
    """A Zarr v3 feature store at a URL (local path, memory://NAME or s3://BUCKET/PREFIX)."""

    def __init__(self, url: str, location: Backend, layout: StoreLayout) -> None:
        self.url = url
        self.location = location
        self.layout = layout
        self.manifest = ShardManifest(location, layout, url)
        self.reader = ShardReader(self.manifest, layout)
        self.index = IndexWriter(location, layout, self.manifest)
        self.corrupt_shards: list[int] = []

    @property
    def backend(self) -> Store:
        """The zarr store underneath (for zarr array I/O and the raw-object helpers)."""
        return self.location.store

    @property
    def site_cache_shards(self) -> int:
        """Decoded site shards kept in memory (a long-lived reader raises it)."""
        return self.reader.site_cache_shards

    @site_cache_shards.setter
    def site_cache_shards(self, value: int) -> None:
        self.reader.site_cache_shards = value

    @property
    def chunk_cache_bytes(self) -> int:
        """Bytes of decoded chunks kept for chunk-level reads (0: none kept)."""
        return self.reader.chunk_cache_bytes

    @chunk_cache_bytes.setter
    def chunk_cache_bytes(self, value: int) -> None:
        self.reader.chunk_cache_bytes = value

    @property
    def index_flush_every(self) -> int:
        """Commits between writes of the merged index."""
        return self.index.flush_every

    @index_flush_every.setter
    def index_flush_every(self, value: int) -> None:
        self.index.flush_every = value

    def __repr__(self) -> str:
        return f"FeatureStore({self.location.describe()})"

    # --- opening -----------------------------------------------------------------

    @classmethod
    def create(cls, url: str, layout: StoreLayout, *, overwrite: bool = False) -> FeatureStore:
        """Create a store, or reopen one with an equal layout (resume).

        An existing store with a different layout (sites, SAE/model
        fingerprints, job hash, dtypes...) is refused with
        StoreLayoutMismatchError unless ``overwrite``, which deletes the old
        store's own objects (store_keys.py) and nothing else. A location that
        holds anything but a store (a writer lease alone counts as empty) is
        refused with NotAStoreError, ``overwrite`` or not: it is never deleted.
        """
        location = open_location(url)
        existing = _read_layout(location)
        if existing is not None and not overwrite:
            if existing.layout_hash() == layout.layout_hash():
                return cls(url, location, existing)
            raise StoreLayoutMismatchError(
                f"store {url} exists with a different layout (fields differ: "
                f"{_layout_diff(existing, layout)}); use another store, or run with "
                "--overwrite to replace it"
            )
        if existing is None:
            refuse_non_store(location, url)
        else:
            clear_store(location)  # overwrite: only the old store's own objects
        # Not zarr's overwrite=True: that deletes the whole location.
        with location.access("write to"):
            zarr.create_group(
                location.store,
                attributes={
                    LAYOUT_ATTR: layout.model_dump(mode="json"),
                    "layout_hash": layout.layout_hash(),
                },
            )
            zarr.create_group(location.store, path="shards")
        record_layout(location, url)  # the layout's copy: a lost zarr.json can be written back
        return cls(url, location, layout)

    @classmethod
    def open(cls, url: str) -> FeatureStore:
        """Open an existing store (StoreNotFoundError when there is none).

        Nothing is created: a mistyped local path is reported, not left behind
        as an empty folder.
        """
        location = open_location(url)
        layout = _read_layout(location, url)
        if layout is None:
            raise StoreNotFoundError(f"no feature store at {url}")
        return cls(url, location, layout)

    # --- writing and committing --------------------------------------------------

    def write_shard(
        self,
        shard_id: int,
        prompts: Sequence[PromptRecord],
        token_ids: Sequence[Sequence[int]],
        site_caches: Mapping[str, SiteCache],
        pairs: ShardPairs | None = None,
    ) -> ShardEntry:
        """Write shard ``shard_id``'s data under its own prefix; return its manifest entry.

        Safe to call from any process given only the URL. A committed shard
        is left untouched (its committed entry is returned); leftovers of an
        uncommitted attempt are deleted first. The shard is invisible until
        ``commit_shard`` is called with the returned entry.
        """
        committed = self.manifest.read_entry(shard_id)
        if committed is not None:
            return committed
        self._drop_shard_data(shard_id)
        return write_shard_arrays(
            self.location, self.layout, shard_id, prompts, token_ids, site_caches, pairs
        )

    def commit_shard(self, entry: ShardEntry, *, verify: bool = True) -> bool:
        """Make a written shard visible (driver side). Returns False when already committed.

        The entry must match this store's layout; with ``verify`` the shard's
        bytes are checked against the entry's checksums before committing.
        """
        # A check keeps the shard's objects in the manifest until forget_recent: the
        # index's background flush (which reads through the manifest) waits meanwhile.
        # The worker's index summaries are held before the entry is visible, so that a
        # background fold that sees the entry finds them.
        self.index.hold(entry)
        with self.index.lock if verify else nullcontext():
            try:
                committed = self.manifest.commit(entry, verify=verify)
            except BaseException:
                self.index.release(entry)
                raise
            if not committed:
                self.index.release(entry)
                return False
            self.index.after_commit(entry.shard_id)  # reads nothing: folded in later
            self.manifest.forget_recent()
        return True

    def refresh(self) -> None:
        """Forget cached manifest, index and decoded shards (see other writers' commits)."""
        self.manifest.refresh()
        self.index.forget()
        self.reader.clear()

    def catch_up(self) -> bool:
        """See the shards other writers committed since the manifest was read: one listing,
        then a read of each new entry only (a long-lived reader of a store a job is
        filling must not re-read every entry each time). An entry gone or damaged
        meanwhile re-reads everything as ``refresh`` does. True when anything changed.

        The merged index folds the new shards in when next queried; decoded
        shards stay cached (a committed shard's bytes never change).
        """
        listed = _listed_shard_ids(self.location)
        known = self.manifest.committed()
        damaged = set(self.manifest.damaged())
        if listed == set(known) | damaged:
            return False
        new = sorted(listed - set(known) - damaged)
        if set(known) - listed or damaged - listed:
            self.refresh()
            return True
        try:
            entries = [self.manifest.read_entry(shard_id) for shard_id in new]
        except CorruptManifestError:
            self.refresh()  # the listing records the damaged entry and why
            return True
        for entry in entries:
            if entry is not None:  # uncommitted between the listing and the read
                known[entry.shard_id] = entry
        return True

    # --- manifest ---------------------------------------------------------------

    def committed_entry(self, shard_id: int) -> ShardEntry | None:
        """Shard ``shard_id``'s committed entry as stored now, None when it is uncommitted.

        One read of that shard's own manifest key (parsed and checked like a
        listed one), never a listing: a worker asks this once per shard, and
        its cost does not grow with the number of committed shards.
        """
        return self.manifest.read_entry(shard_id)

    def committed_entries(self) -> dict[int, ShardEntry]:
        """Manifest entries of committed shards, by shard id."""
        return dict(self.manifest.committed())

    def committed_shard_ids(self) -> set[int]:
        """Ids of the committed (visible) shards."""
        return set(self.manifest.committed())

    def n_prompts(self) -> int:
        """One past the highest committed prompt index (0 when empty)."""
        return self.manifest.n_prompts()

    def n_tokens(self) -> int:
        """Tokens stored over all committed shards."""
        return self.manifest.n_tokens()

    # --- verification and resume ---------------------------------------------------

    def verify_shard(self, shard_id: int) -> bool:
        """True when the shard is committed and every stored byte matches its checksums."""
        return self.manifest.verify(shard_id)

    def uncommitted(self, all_ids: Iterable[int], *, verify: bool = True) -> list[int]:
        """The shard ids of ``all_ids`` a resume must (re)compute, sorted.

        Committed entries are read (an unreadable one is a
        CorruptManifestError naming it). With ``verify`` each committed
        shard's bytes are also read back against its entry's checksums; on
        object storage that downloads the whole store, so a job's resume
        skips it by default and leaves shard data to the readers, which
        verify every object they read. Committed shards that fail are
        reported (warning log, ``self.corrupt_shards``), uncommitted and
        included.
        """
        committed = self.manifest.committed()
        todo = set()
        self.corrupt_shards = []
        damaged = self.manifest.damaged()
        for shard_id in all_ids:
            if shard_id in damaged:  # an unreadable entry: the shard is recomputed
                self.corrupt_shards.append(shard_id)
                self.uncommit(shard_id)
                todo.add(shard_id)
            elif shard_id not in committed:
                todo.add(shard_id)
            elif verify and not self.verify_shard(shard_id):
                self.corrupt_shards.append(shard_id)
                self.uncommit(shard_id)
                todo.add(shard_id)
        return sorted(todo)

    def uncommit(self, shard_id: int) -> None:
        """Hide a shard and delete its data.

        The index pointer goes first (the index may count this shard; a pointer
        covering a shard without an entry means a lost entry), then the
        manifest entry, then the data.
        """
        self.index.discard()
        self.manifest.remove(shard_id)
        self._drop_shard_data(shard_id)

    def _drop_shard_data(self, shard_id: int) -> None:
        self.location.delete_prefix(shard_prefix(shard_id))
        self.manifest.forget_recent()
        self.reader.forget(shard_id)

    # --- reading ---------------------------------------------------------------------

    def read_rows(self, shard_id: int, array: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of one 1-D array of a committed shard, decoding
        only the chunks that hold them (see ShardReader.read_rows)."""
        return self.reader.read_rows(shard_id, array, start, stop)

    def cached_site_shard(self, shard_id: int, label: str) -> SiteShard | None:
        """The decoded site shard when it is already in memory, else None (no I/O)."""
        return self.reader.cached_site_shard(shard_id, label)

    def shard_of_prompt(self, prompt: int) -> ShardEntry:
        """The committed shard holding a global prompt index (QueryRangeError naming the bound)."""
        return self.reader.shard_of_prompt(prompt)

    def site_shard(self, shard_id: int, label: str) -> SiteShard:
        """Decoded data of one site of one committed shard (verified on first read, cached)."""
        return self.reader.site_shard(shard_id, label)

    def prompt_shard(self, shard_id: int) -> PromptShard:
        """Token ids and prompt offsets of one committed shard (verified, cached)."""
        return self.reader.prompt_shard(shard_id)

    def prompt_records(self, shard_id: int) -> list[PromptRecord]:
        """The PromptRecords of one committed shard."""
        return self.reader.prompt_records(shard_id)

    def paired_site_shard(self, shard_id: int, label: str) -> PairedSite:
        """The corrupted side of one site of one committed shard of a paired cache (verified)."""
        self._require_pairing()
        self.layout.site(label)
        source = self.manifest.read_verified(
            shard_id, [f"sites/{label}/corrupt_", f"sites/{label}/error_atp/"]
        )
        return read_paired_site(source, self.layout, f"{shard_prefix(shard_id)}sites/{label}/")

    def shard_pairs(self, shard_id: int) -> ShardPairs:
        """Named positions and paired positions of one committed shard of a paired cache."""
        self._require_pairing()
        parts = [f"prompts/{name}/" for name in ("named_positions", "corrupt_position")]
        return read_shard_pairs(
            self.manifest.read_verified(shard_id, parts), shard_prefix(shard_id)
        )

    def _require_pairing(self) -> None:
        if self.layout.pairing is None:
            raise StoreError(f"store {self.url} is not a paired cache (no corrupted activations)")

    def prompt_tokens(self, prompt: int) -> np.ndarray:
        """Token ids of one prompt (BOS first)."""
        return self.reader.prompt_tokens(prompt)

    # --- merged per-feature index ----------------------------------------------------

    def feature_index(self, label: str) -> FeatureIndex:
        """Summaries and top-K examples of a site over every committed shard."""
        return self.index.feature_index(label)

    def flush_index(self) -> None:
        """Persist the merged index (a new generation, then the pointer, then drop the old)."""
        self.index.flush()


def _listed_shard_ids(location: Backend) -> set[int]:
    """The shard ids the manifest's keys name (one listing, no entry read)."""
    ids = set()
    for key in location.list_keys(MANIFEST_PREFIX):
        name = key.removeprefix(MANIFEST_PREFIX).removesuffix(".json")
        if key.endswith(".json") and name.isdigit():
            ids.add(int(name))
    return ids
