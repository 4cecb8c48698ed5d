"""The merged per-feature index: summaries and top examples over every committed shard.

The worker that writes a shard computes, per site, its index summary
(shard_summary.py: its summaries, top candidates and a·g sums) and returns
it to the driver beside the entry; the merged index folds them together so
that "top examples of feature i" never scans the store. A commit reads
nothing of its shard: the driver holds the summaries in memory (``hold``)
and folds the shards committed since the last fold together (index_fold.py)
every HELD_FOLD commits, at a flush or at a query. The summaries are not
stored: they nearly duplicate a shard's entries (at the default layout they
were 73 % of a shard's bytes). A shard whose summaries are not held (a
reader's process, a driver restarted after a crash, at most a flush interval
of shards) is folded from its arrays, checked against its entry, by the same
functions, to the same bytes; shards written while summaries were stored
(``sites/<label>/index_summary`` in their pack) are folded from those.

The index is persisted in two tiers. Row chunks (index_chunks.py): each
chunk of a site, CHUNK_ROWS features of every per-feature array, is one
object named by the digest of its bytes, ``index/<digest>``. Runs
(index_runs.py): the held summaries of the shards committed since the
chunks were written, one object a flush. The pointer ``index/current.json``
(format 5) maps every chunk of every site to its object and names the runs,
each with its checksum. The flushes a job's commits make (``flush_recent``)
write one run each, a cost of the new shards' summaries whatever the SAE's
width; every ``compact_interval`` shards (and at ``flush``, the end of a
job) a compaction encodes and writes the chunks whose rows changed since
the previous one (the others keep their objects) and drops the runs. Each
flush writes its objects, then replaces the pointer, then deletes the
objects the previous pointer named and the new one does not: no listing,
and no folder per generation to leave empty. After a compaction, equal
committed shards give equal chunks, so the same keys and bytes whatever the
commit order: counts, histograms, maxima and top-K rows do not depend on it,
and every total is summed exactly (activation totals on the grid of
summaries.on_grid, attribution totals as a value and its exact residual,
exact_sums.py).

Reading the index back and checking it is index_loading.py; folding shards'
summaries in, index_parts.py (with index_fold.py's vectorised folds).

Nothing of the index is trusted unchecked. The pointer records the checksum
of every object it names, as a manifest entry does for a shard's, a digest
of the manifest entries of the shards it covers, and a digest of itself. A
reader that finds a mismatch raises CorruptIndexError naming the object; the
job's writer and ``circuitscan repair`` rebuild the index from the shards'
own summaries or arrays (repair also deletes every object under ``index/`` that the
new pointer does not name: what a crash between a flush's writes and its
pointer left). A pointer covering shards no longer committed is ignored
(rebuilt from the shards), as before. Pointers of format 2
(one zarr hierarchy per generation, ``index/<generation>/``) are still
read and verified, and replaced, generation deleted, at the next flush;
format 1 ones carry no checksums: they are read unverified, and a
generation that cannot be decoded is a CorruptIndexError too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any

import numpy as np

from circuitscan.schemas.store import ShardEntry, StoreLayout
from circuitscan.services.store.attribution_index import AttributionIndex, NoAttributionIndexError
from circuitscan.services.store.backends import Backend
from circuitscan.services.store.errors import CorruptIndexError, CorruptManifestError
from circuitscan.services.store.index_chunks import CHUNK_ROWS, encode_chunk, keyed, n_chunks
from circuitscan.services.store.index_legacy import summaries_from_arrays
from circuitscan.services.store.index_loading import (
    PersistedIndex,
    attribution_kind,
    load_persisted,
    site_payload,
)
from circuitscan.services.store.index_parts import Part, fold_parts
from circuitscan.services.store.index_pointer import (
    INDEX_POINTER,
    INDEX_PREFIX,
    add_terms,
    build_pointer,
    entry_term,
    named_objects,
    parse_pointer,
    pointer_bytes,
    pointer_shards,
)
from circuitscan.services.store.index_runs import RunArrays, encode_run
from circuitscan.services.store.manifest import ShardManifest
from circuitscan.services.store.packed_arrays import AT_REST, FAST
from circuitscan.services.store.shard_summary import summary_key
from circuitscan.services.store.summaries import FeatureIndex

log = logging.getLogger(__name__)

FLUSH_EVERY = 16
# Shards folded into the index together (bounds the decoded summaries held at once).
FOLD_BATCH = 64
# Held summaries (ShardEntry.index_summaries) are folded into the in-memory index every
# HELD_FOLD commits, between flushes too; a commit waits for a background fold once
# HELD_LIMIT are held, so the driver's memory stays bounded when the index lags.
HELD_FOLD = 16
HELD_LIMIT = 64
# A reader with this many committed shards not yet folded reloads the persisted index
# instead, when a newer pointer covers them (see _current).
RELOAD_PENDING = 2
# A compaction rewrites the chunks whose rows its shards touched, at worst every row
# (d_sae × k entries a site: shards of random features touch every chunk), so the shards
# between compactions grow with the index: amortised, a shard pays for at most about this
# many rewritten entries, whatever the SAE's width (every flush for small SAEs, every 64
# shards for a 131,072-feature site at k = 32). The flushes in between write runs (the
# new shards' summaries, index_runs.py), so a crash loses at most a flush interval of
# merges, which the next load redoes from the shards' arrays.
COMPACT_ENTRIES_PER_SHARD = 65_536


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` holding the writer's lock (waiting for a background flush)."""

    @wraps(method)
    def run(self: IndexWriter, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return run


class IndexWriter:
    """Loads, extends and persists one store's merged feature index.

    With ``background`` (a job's driver), the flushes that commits schedule
    run on a thread of their own, folding and persisting while the driver
    goes on committing: a commit then costs its entry alone. Every other use
    of the index waits for a running flush (``lock``), and its error, if any,
    is raised by the next flush or query. A crash loses only merges the next
    load redoes from the shards, as with synchronous flushes.
    """

    def __init__(self, location: Backend, layout: StoreLayout, manifest: ShardManifest) -> None:
        self.location = location
        self.layout = layout
        self.manifest = manifest
        # Commits between flushes: a crash loses at most this many merges,
        # which the next reader redoes from the shards.
        self.flush_every = FLUSH_EVERY
        self._index: dict[str, FeatureIndex] | None = None
        self._indexed: set[int] = set()
        self._unflushed = 0
        # Per-site attribution sums (attribution_index.py); None when the store keeps
        # no gradients or its index generation predates them.
        self._attribution: dict[str, AttributionIndex] | None = None
        # What the pointer names: (attribution kind, each site's [object, checksum] per
        # chunk), the objects themselves, and the chunks changed since (to rewrite).
        self._persisted: tuple[str, dict[str, list[list[str]]]] | None = None
        self._stored: set[str] = set()
        self._dirty: dict[str, set[int]] = {}  # chunks changed since the last compaction
        # The chunks' part of the pointer as persisted (reused by run flushes), the runs
        # it names ([object, checksum], shards), and every shard it covers with their sum.
        self._base_sites: dict[str, dict[str, Any]] | None = None
        self._runs: list[tuple[str, str, set[int]]] = []
        self._covered: set[int] = set()
        self._covered_sum = 0
        # Shards between compactions; None: by the index's width (compact_interval).
        self.compact_every: int | None = None
        self._legacy: str | None = None  # a format 1/2 generation the next flush deletes
        self.background = False
        self._entry_digests: dict[int, str] = {}  # digests of committed entries (shards_sum)
        self._sum = 0  # the pointer's shards_sum of ``_indexed`` (index_pointer.py)
        # Worker-computed index summaries of committed shards not yet folded (see hold),
        # of those not yet persisted (in a run or the chunks), and those read from runs.
        self._held: dict[int, tuple[ShardEntry, dict[str, bytes]]] = {}
        self._unpersisted: dict[int, tuple[ShardEntry, dict[str, bytes]]] = {}
        self._run_summaries: RunArrays = {}
        self.lock = threading.RLock()
        # A job's driver or a rebuild: the pointer's author, which never reloads it.
        self._writes_pointer = False
        self._loaded_pointer: bytes | None = None  # the pointer the index was loaded from
        self._flusher: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return self.manifest.url

    @_locked
    def feature_index(self, label: str) -> FeatureIndex:
        """Summaries and top-K examples of a site over every committed shard."""
        self.layout.site(label)
        self.manifest.raise_if_damaged()  # an index without a damaged shard would undercount
        index = self._current()
        return index[label]

    @_locked
    def attribution(self, label: str) -> AttributionIndex:
        """Per-feature Σ a·g, Σ |a·g| and top hits of a site over every committed shard."""
        self.layout.site(label)
        self.manifest.raise_if_damaged()
        self._current()
        if not self.layout.gradients:
            raise NoAttributionIndexError(
                f"store {self.manifest.url} keeps no gradients, so it has no attributions to "
                "rank: run its cache job with gradients: true"
            )
        if self._attribution is None:
            raise NoAttributionIndexError(
                f"the index of store {self.manifest.url} was written before it kept "
                "attribution sums; `circuitscan repair "
                f"{self.manifest.url}` rebuilds it with them from the shards"
            )
        return self._attribution[label]

    def _current(self, *, repair: bool = False) -> dict[str, FeatureIndex]:
        """The index with every committed shard merged in (loaded on first use).

        ``repair`` (the job's writer): a damaged persisted index is rebuilt
        from the shards instead of raising CorruptIndexError.
        """
        self._raise_failure()
        if self._index is None:
            self._reload(repair)
        pending = sorted(set(self.manifest.committed()) - self._indexed)
        if (
            len(pending) >= RELOAD_PENDING
            and not self._writes_pointer
            and self._newer_covers(pending)
        ):
            # A reader of a store another process fills (the HTTP API during a job): the
            # writer's newer chunks and runs cost a read and a fold of summaries, where
            # each pending shard would cost a read of its arrays and their summaries.
            self._reload(repair)
            pending = sorted(set(self.manifest.committed()) - self._indexed)
        assert self._index is not None
        for start in range(0, len(pending), FOLD_BATCH):
            self._merge(self._index, pending[start : start + FOLD_BATCH])
        return self._index

    def _reload(self, repair: bool) -> None:
        try:
            self._index, self._indexed, self._sum = self._load_settled()
        except (CorruptIndexError, CorruptManifestError) as exc:
            if not repair:
                raise
            log.warning("%s; rebuilding it from the shards", exc)
            self._index, self._indexed, self._sum = self._empty(), set(), 0

    def _load_settled(self) -> tuple[dict[str, FeatureIndex], set[int], int]:
        """``_load``, again when it failed because a writer replaced the pointer meanwhile
        (its flush deletes what the old pointer named once the new one is written)."""
        for attempt in range(3):
            try:
                return self._load()
            except CorruptIndexError:
                replaced = self.location.read_bytes(INDEX_POINTER) != self._loaded_pointer
                if not replaced or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _newer_covers(self, pending: list[int]) -> bool:
        """Whether the persisted pointer changed since this index was loaded and covers
        RELOAD_PENDING or more of ``pending``, and nothing this reader sees uncommitted."""
        raw = self.location.read_bytes(INDEX_POINTER)
        if raw is None or raw == self._loaded_pointer:
            return False
        try:
            covered = pointer_shards(parse_pointer(raw, self.url))
        except (CorruptIndexError, KeyError, TypeError):
            return False  # folded from the shards as before; a query of it names the damage
        committed = self.manifest.committed()
        return len(covered.intersection(pending)) >= RELOAD_PENDING and all(
            i in committed for i in covered
        )

    def hold(self, entry: ShardEntry) -> None:
        """Keep ``entry``'s index summaries (if it carries them) until its shard is folded."""
        summaries = entry.index_summaries
        if summaries is None or not self.layout.sites or entry.shard_id in self._held:
            return
        if all(site.label in summaries for site in self.layout.sites):
            self._held[entry.shard_id] = (entry, summaries)
            self._unpersisted[entry.shard_id] = (entry, summaries)

    def release(self, entry: ShardEntry) -> None:
        """Drop what ``hold`` kept of ``entry`` (its commit did not happen)."""
        for kept in (self._held, self._unpersisted):
            held = kept.get(entry.shard_id)
            if held is not None and held[0] is entry:
                kept.pop(entry.shard_id, None)

    def after_commit(self, shard_id: int) -> None:
        """Count just-committed shard ``shard_id``: every HELD_FOLD commits fold the held
        summaries in, every ``flush_interval`` ones flush (``flush_recent``)."""
        # A commit reads nothing of its shard: the shards committed since the
        # last fold are folded in together (index_fold.py) from the summaries
        # held, at the next fold, flush or query. The persisted index is loaded
        # once, at the first commit (a damaged one is rebuilt, as a job's writer
        # may), so a commit costs the same however many shards are committed.
        self._writes_pointer = True
        if self.layout.sites and self._index is None:  # result-only stores have no index
            with self.lock:
                # The manifest is read here, once, on the committing thread: a fold thread
                # that listed it while this thread wrote an entry could miss that entry
                # (commits extend only a manifest already in memory).
                self.manifest.committed()
                try:
                    self._index, self._indexed, self._sum = self._load()
                except (CorruptIndexError, CorruptManifestError) as exc:
                    log.warning("%s; rebuilding it from the shards", exc)
                    self._index, self._indexed, self._sum = self._empty(), set(), 0
        self._unflushed += 1
        persist = self._unflushed >= self.flush_interval()
        if not persist and len(self._held) < HELD_FOLD:
            return
        if not self.background:
            if persist:
                self._unflushed = 0
                self.flush_recent()
            if len(self._held) >= HELD_FOLD:
                with self.lock:
                    self._current(repair=True)
            return
        running = self._flusher is not None and self._flusher.is_alive()
        if running and max(len(self._held), len(self._unpersisted)) >= HELD_LIMIT:
            assert self._flusher is not None
            self._flusher.join()  # backpressure: the index's memory stays bounded
            running = False
        if running:
            return  # the next commit starts the fold or flush this one would have
        if persist:
            # Commits made while it runs are folded by the next flush (or query).
            self._unflushed = 0
        target = self._flush_in_background if persist else self._fold_in_background
        self._flusher = threading.Thread(target=target, name="index-flush", daemon=True)
        self._flusher.start()

    def _fold_in_background(self) -> None:
        try:
            with self.lock:
                self._current(repair=True)
        except BaseException as exc:  # raised again by the next flush or query
            log.warning("background index fold failed: %s", exc)
            self._failure = exc

    def _flush_in_background(self) -> None:
        try:
            with self.lock:
                self._flush_recent()
                self._current(repair=True)  # the fold a run flush leaves to do
        except BaseException as exc:  # raised again by the next flush or query
            log.warning("background index flush failed: %s", exc)
            self._failure = exc

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def flush_interval(self) -> int:
        """Commits between the flushes commits make (``flush_every``)."""
        return self.flush_every

    def compact_interval(self) -> int:
        """Shards between compactions: a flush interval, more for a wide index (see above)."""
        if self.compact_every is not None:
            return self.compact_every
        entries = sum(s.d_sae for s in self.layout.sites) * self.layout.examples_per_feature
        return max(self.flush_every, -(-entries // COMPACT_ENTRIES_PER_SHARD))

    @_locked
    def forget(self) -> None:
        """Drop the in-memory index (it is reloaded when next needed)."""
        self._index = None
        self._indexed, self._sum = set(), 0
        self._entry_digests = {}  # entries may have changed (another writer, an uncommit)
        self._run_summaries = {}  # read again, and checked, with the pointer

    @_locked
    def discard(self) -> None:
        """Drop the persisted pointer too: the index may count a shard no longer committed.

        It is rebuilt from the remaining shards when
        next needed; the objects the pointer named go with it.
        """
        raw = self.location.read_bytes(INDEX_POINTER)
        self.location.delete_keys([INDEX_POINTER])
        try:
            named = named_objects(parse_pointer(raw, self.url)) if raw is not None else set()
        except CorruptIndexError:
            named = set()  # repair lists and deletes what an unreadable pointer named
        self.location.delete_keys(sorted(named))
        self.forget()
        self._persisted, self._base_sites, self._runs = None, None, []
        self._covered, self._covered_sum = set(), 0

    @_locked
    def rebuild(self) -> None:
        """Rebuild the index from every committed shard's own summaries and persist it,
        rewriting every chunk and deleting every other object under ``index/``
        (``circuitscan repair``)."""
        self._index, self._indexed, self._sum = self._empty(), set(), 0
        self._run_summaries = {}  # index objects: not what a rebuild trusts
        self._writes_pointer = True
        self._current()
        self._persisted = None  # every chunk is written again, damaged or not
        self._compact(at_rest=True)
        keep = {INDEX_POINTER, *self._stored}
        self.location.delete_keys(
            sorted(key for key in self.location.list_keys(INDEX_PREFIX) if key not in keep)
        )
        self.location.remove_empty_folders([INDEX_PREFIX])

    def _empty(self) -> dict[str, FeatureIndex]:
        """An empty index (and attribution sums, when the store keeps gradients)."""
        k = self.layout.examples_per_feature
        self._attribution = None
        if self.layout.gradients:  # rebuilt from the shards along with the index
            paired = self.layout.pairing is not None  # also the AtP sums
            self._attribution = {
                s.label: AttributionIndex.empty(s.d_sae, k, paired=paired)
                for s in self.layout.sites
            }
        return {s.label: FeatureIndex.empty(s.d_sae, k) for s in self.layout.sites}

    @_locked
    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with the persisted index: (kind, one line) pairs, kind "index" or
        "manifest" (an entry lost from under the index) (``circuitscan verify``)."""
        if not self.layout.sites or not self.manifest.committed():
            return []
        fix = f"`circuitscan repair {self.url}` rebuilds it"
        if self.location.read_bytes(INDEX_POINTER) is None:
            return [("index", f"index pointer {INDEX_POINTER} of {self.url} is missing; {fix}")]
        try:
            self._load()
            covered = self._covered
        except CorruptIndexError as exc:
            return [("index", str(exc))]
        except CorruptManifestError as exc:
            return [("manifest", str(exc))]
        finally:
            self.forget()  # _load replaced what the in-memory index was persisted as
        if covered != set(self.manifest.committed()):
            return [("index", f"index of {self.url} misses committed shards; {fix}")]
        return []

    def _load(self) -> tuple[dict[str, FeatureIndex], set[int], int]:
        """The persisted index's chunks, the shards they cover and their ``shards_sum``
        (index_loading.py); the pointer's runs are kept for ``_current`` to fold in
        (``_run_summaries``), and ``_covered`` is every shard the pointer covers."""
        # Reset first: a load that raises leaves nothing of an older pointer to reuse.
        self._persisted, self._legacy, self._dirty = None, None, {}
        self._base_sites, self._runs, self._run_summaries = None, [], {}
        self._covered, self._covered_sum = set(), 0
        index = self._empty()
        raw = self._loaded_pointer = self.location.read_bytes(INDEX_POINTER)
        found = load_persisted(
            self.location, self.layout, self.manifest, raw,
            PersistedIndex(index=index, attribution=self._attribution), self._entry_digests,
        )  # fmt: skip
        self._attribution = found.attribution
        self._persisted, self._stored, self._legacy = found.persisted, found.stored, found.legacy
        self._base_sites, self._runs = found.base_sites, found.runs
        self._run_summaries = found.run_summaries
        self._covered, self._covered_sum = found.covered, found.covered_sum
        return found.index, found.folded, found.folded_sum

    def _attribution_kind(self) -> str:
        return attribution_kind(self._attribution)

    def _merge(self, index: dict[str, FeatureIndex], shard_ids: list[int]) -> None:
        """Fold committed shards ``shard_ids`` in (index_parts.py) from their index
        summaries (held, from a run, or stored by an older writer and checked against the
        entry), else from their arrays."""
        labels = list(index)
        # Per site, in shard order: encoded summaries, or older shards' decoded ones.
        parts: dict[str, list[Part]] = {label: [] for label in labels}
        for shard_id in shard_ids:
            found = self._summaries_of(shard_id, labels)
            if found is not None:
                for label in labels:
                    parts[label].append((shard_id, found[label]))
                continue
            with_terms = self._attribution is not None
            for label, summary, attribution in summaries_from_arrays(
                self.manifest, self.layout, shard_id, with_terms
            ):
                parts[label].append((shard_id, (summary, attribution)))
        fold_parts(index, self._attribution, parts, self._prompt_start, self.url, self._dirty)
        entries = self.manifest.committed()
        for shard_id in shard_ids:  # the entry digests the pointer's shards_sum adds
            if shard_id not in self._entry_digests:
                self._entry_digests[shard_id] = entries[shard_id].digest()
        fresh = [i for i in shard_ids if i not in self._indexed]
        self._sum = add_terms(self._sum, [entry_term(i, self._entry_digests[i]) for i in fresh])
        self._indexed.update(shard_ids)

    def _prompt_start(self, shard_id: int) -> int:
        return self.manifest.entry(shard_id).prompt_start

    def _summaries_of(
        self, shard_id: int, labels: list[str]
    ) -> dict[str, bytes] | dict[str, dict[str, np.ndarray]] | None:
        """Shard ``shard_id``'s index summaries: held ones (if written for the entry that is
        committed now), else ones read from a run (checked with the pointer), else stored
        ones (checked against the entry), else None."""
        entry = self.manifest.entry(shard_id)
        held = self._held.pop(shard_id, None) or self._unpersisted.get(shard_id)
        if held is not None and held[0].checksums == entry.checksums:
            return held[1]
        from_run = self._run_summaries.pop(shard_id, None)
        if from_run is not None:
            return from_run
        keys = [summary_key(label) for label in labels]
        if all(key in entry.checksums for key in keys):  # stored by an older writer
            objects = self.manifest.fetch_verified(shard_id, keys)
            return {label: objects[key] for label, key in zip(labels, keys, strict=True)}
        return None

    @_locked
    def flush(self) -> None:
        """Persist the merged index, compacted: the chunks that changed, then the pointer
        (no runs), then delete the objects no longer named (after a background flush)."""
        self._raise_failure()
        self._unflushed = 0
        self._compact(at_rest=True)

    @_locked
    def compact(self) -> None:
        """The compaction commits make every ``compact_interval`` shards (FAST chunks)."""
        self._raise_failure()
        self._compact()

    @_locked
    def flush_recent(self) -> None:
        """The flush commits make: a run of the shards committed since the last flush, or a
        compaction when one is due (or a shard's summaries are not held)."""
        self._raise_failure()
        self._flush_recent()

    def _flush_recent(self) -> None:
        if self._index is None or not self.layout.sites:
            self._compact()
            return
        entries = self.manifest.committed()
        committed = set(entries)  # one C-level pass: commits may extend it meanwhile
        new = sorted(committed - self._covered)
        if not new and not (self._covered - committed):
            return  # nothing committed since: the pointer is current
        in_runs = sum(len(shards) for _, _, shards in self._runs)
        held = {i: self._unpersisted.get(i) for i in new}
        runnable = (
            self._persisted is not None
            and self._base_sites is not None
            and self._legacy is None
            and self._persisted[0] == self._attribution_kind()
            and not (self._covered - committed)
            and in_runs + len(new) < self.compact_interval()
            and all(
                h is not None and h[0].checksums == entries[i].checksums for i, h in held.items()
            )
        )
        if not runnable:
            self._compact()
            return
        assert self._persisted is not None and self._base_sites is not None
        data = encode_run({i: h[1] for i, h in held.items() if h is not None})
        key, run_checksum = keyed(data)
        for i in new:
            if i not in self._entry_digests:
                self._entry_digests[i] = entries[i].digest()
        runs = [*self._runs, (key, run_checksum, set(new))]
        covered = self._covered | set(new)
        total = add_terms(self._covered_sum, [entry_term(i, self._entry_digests[i]) for i in new])
        kind = self._attribution_kind()
        pointer = build_pointer(
            self._base_sites, self._persisted[1], runs, covered, total, kind, CHUNK_ROWS
        )
        self.location.write_many({key: data})
        self.location.write_bytes(INDEX_POINTER, pointer_bytes(pointer))
        self._runs, self._covered, self._covered_sum = runs, covered, total
        self._stored.add(key)
        for i in new:
            self._unpersisted.pop(i, None)

    def _compact(self, *, at_rest: bool = False) -> None:
        """Write the chunks changed since the last compaction and a pointer with no runs.

        ``at_rest`` (``flush``: a job's last flush, repair): every chunk is encoded with
        AT_REST (zstd), the ones written with FAST since too, so the index a job leaves is
        the smaller one and the same bytes whatever the order of its commits; a chunk
        whose bytes are already stored is not written again.
        """
        codec = AT_REST if at_rest else FAST
        stale = self._indexed != set(self.manifest.committed())
        if self._index is None or (self.layout.sites and stale):
            self._current(repair=True)
        index = self._index
        assert index is not None
        kind = self._attribution_kind()
        previous = self._persisted if self._persisted and self._persisted[0] == kind else None
        sites: dict[str, dict[str, Any]] = {}
        refs: dict[str, list[list[str]]] = {}
        writes: dict[str, bytes] = {}
        for label, item in index.items():
            attribution = None if self._attribution is None else self._attribution[label]
            old = None if previous is None else previous[1].get(label) or None
            dirty = self._dirty.get(label, set())
            chunks = []
            for chunk in range(n_chunks(self.layout.site(label).d_sae)):
                if old is not None and chunk not in dirty and not at_rest:
                    chunks.append(old[chunk])  # its rows did not change: the same object
                    continue
                data = encode_chunk(item, attribution, chunk, codec)
                key, chunk_checksum = keyed(data)
                chunks.append([key, chunk_checksum])
                if key not in self._stored or previous is None:
                    writes[key] = data
            sites[label] = site_payload(label, [key for key, _ in chunks], self._attribution)
            refs[label] = chunks
        pointer = build_pointer(sites, refs, [], self._indexed, self._sum, kind, CHUNK_ROWS)
        self.location.write_many(writes)
        self.location.write_bytes(INDEX_POINTER, pointer_bytes(pointer))
        named = named_objects(pointer)
        # What the previous pointer named and this one does not (no listing).
        self.location.delete_keys(sorted(self._stored - named))
        if self._legacy is not None:  # a format 1/2 generation, replaced by these chunks
            self.location.delete_prefix(self._legacy)
            self.location.remove_empty_folders([INDEX_PREFIX])
            self._legacy = None
        self._persisted = (kind, refs)
        self._stored, self._dirty = named, {}
        self._base_sites, self._runs = sites, []
        self._covered, self._covered_sum = set(self._indexed), self._sum
        # list(): one C-level copy, as the committing thread may add to it meanwhile.
        for i in [i for i in list(self._unpersisted) if i in self._indexed]:
            self._unpersisted.pop(i, None)
