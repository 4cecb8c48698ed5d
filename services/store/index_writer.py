"""The merged per-feature index: summaries and top examples over every committed shard.

Each shard stores its own summaries (``sites/LABEL/summary``, ``.../top``);
the merged index folds them together so that "top examples of feature i"
never scans the store. It is persisted in generations: the arrays of a
generation go under ``index/<generation>/``, then the pointer
``index/current.json`` is replaced, then the previous generation is deleted.

Nothing of the index is trusted unchecked. The pointer (format 2) records
the checksum of every object of its generation, as a manifest entry does for
a shard's, a digest of the manifest entries of the shards it covers, and a
digest of itself; a generation is named by the digest of its checksums, so
the same committed shards give the same keys and bytes whatever the commit
order (totals are summed exactly, see summaries.on_grid). A reader that finds
a mismatch raises CorruptIndexError naming the object; the job's writer and
``circuitscan repair`` rebuild the index from the shards' own summaries. A
pointer covering shards no longer committed is ignored (rebuilt from the
per-shard summaries), as before. Pointers written before format 2 carry no
checksums: they are read unverified, and a generation that cannot be decoded
is a CorruptIndexError too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from zarr.core.buffer import Buffer
from zarr.storage import MemoryStore

from circuitscan.schemas.store import StoreLayout
from circuitscan.services.store.attribution_index import (
    AttributionIndex,
    NoAttributionIndexError,
    ShardAttribution,
    attribution_writes,
    load_attribution,
    shard_attribution,
)
from circuitscan.services.store.backends import Backend
from circuitscan.services.store.encoding import (
    INDEX_ROW_CHUNK,
    encode_arrays,
    open_array,
    write_array,
)
from circuitscan.services.store.errors import CorruptIndexError, CorruptManifestError
from circuitscan.services.store.index_fold import fold_attributions, fold_summaries
from circuitscan.services.store.manifest import ShardManifest, manifest_key
from circuitscan.services.store.paired_io import read_paired_site
from circuitscan.services.store.shard_io import (
    checksum,
    memory_store,
    read_prompts,
    read_site,
    read_summary,
    shard_prefix,
)
from circuitscan.services.store.summaries import FeatureIndex, ShardSummary

log = logging.getLogger(__name__)

FIELDS = tuple(FeatureIndex.__dataclass_fields__)

INDEX_POINTER = "index/current.json"
INDEX_PREFIX = "index/"
POINTER_FORMAT = 2
FLUSH_EVERY = 16
# Shards folded into the index together (bounds the decoded summaries held at once).
FOLD_BATCH = 64
# A flush rewrites every row of the index (d_sae × k entries a site), so the commits
# between flushes grow with the index: amortised, a commit pays for at most about this
# many rewritten entries, whatever the SAE's width (16 commits for small SAEs, 1,024 for
# one 131,072-feature site at k = 32). A crash loses at most that many merges, which the
# next load redoes from the shards' own summaries.
FLUSH_ENTRIES_PER_COMMIT = 4096


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def shards_digest(manifest: ShardManifest, shard_ids: list[int]) -> str:
    """One digest over the manifest entries of ``shard_ids`` (what an index was built from)."""
    entries = manifest.committed()
    return _digest([[i, entries[i].digest()] for i in sorted(shard_ids)])


def _pointer_bytes(pointer: dict[str, Any]) -> bytes:
    body = {**pointer, "digest": _digest(pointer)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_pointer(raw: bytes, url: str) -> dict[str, Any]:
    """The pointer's fields; CorruptIndexError when it is unreadable or fails its own digest."""
    fix = f"`circuitscan repair {url}` rebuilds the index from the shards"
    try:
        pointer = json.loads(raw)
        shards = pointer["shards"]
        generation = pointer["generation"]
        ok = isinstance(generation, str) and all(isinstance(s, int) for s in shards)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptIndexError(
            f"index pointer {INDEX_POINTER} of {url} is unreadable; {fix}"
        ) from exc
    if not ok or "/" in generation or generation in ("", ".", ".."):
        raise CorruptIndexError(f"index pointer {INDEX_POINTER} of {url} is unreadable; {fix}")
    if pointer.get("format", 1) >= POINTER_FORMAT:
        claimed = pointer.pop("digest", None)
        if claimed != _digest(pointer):
            raise CorruptIndexError(
                f"index pointer {INDEX_POINTER} of {url} fails its checksum; {fix}"
            )
    return pointer


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
        # Per-site attribution sums (attribution_index.py); None when the store keeps
        # no gradients or its index generation predates them.
        self._attribution: dict[str, AttributionIndex] | None = None

    @property
    def url(self) -> str:
        return self.manifest.url

    def feature_index(self, label: str) -> FeatureIndex:
        """Summaries and top-K examples of a site over every committed shard."""
        self.layout.site(label)
        self.manifest.raise_if_damaged()  # an index without a damaged shard would undercount
        index = self._current()
        return index[label]

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
        from the shards' summaries instead of raising CorruptIndexError.
        """
        if self._index is None:
            try:
                self._index, self._indexed = self._load()
            except (CorruptIndexError, CorruptManifestError) as exc:
                if not repair:
                    raise
                log.warning("%s; rebuilding it from the shards' summaries", exc)
                self._index, self._indexed = self._empty(), set()
        pending = sorted(set(self.manifest.committed()) - self._indexed)
        for start in range(0, len(pending), FOLD_BATCH):
            self._merge(self._index, pending[start : start + FOLD_BATCH])
        return self._index

    def after_commit(self, shard_id: int) -> None:
        """Count just-committed shard ``shard_id``, flushing every ``flush_every`` commits."""
        # A commit reads nothing of its shard: the shards committed since the
        # last fold are folded in together (index_fold.py) when the index is
        # next needed, a flush or a query. The persisted index is loaded once,
        # at the first commit (a damaged one is rebuilt, as a job's writer may),
        # so a commit costs the same however many shards are committed.
        if self.layout.sites and self._index is None:  # result-only stores have no index
            try:
                self._index, self._indexed = self._load()
            except (CorruptIndexError, CorruptManifestError) as exc:
                log.warning("%s; rebuilding it from the shards' summaries", exc)
                self._index, self._indexed = self._empty(), set()
        self._unflushed += 1
        if self._unflushed >= self.flush_interval():
            self.flush()

    def flush_interval(self) -> int:
        """Commits between flushes: ``flush_every``, more for a wide index (see above)."""
        entries = sum(s.d_sae for s in self.layout.sites) * self.layout.examples_per_feature
        return max(self.flush_every, -(-entries // FLUSH_ENTRIES_PER_COMMIT))

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

    def rebuild(self) -> None:
        """Rebuild the index from every committed shard's own summaries and persist it,
        dropping every other generation (``circuitscan repair``)."""
        self._index, self._indexed = self._empty(), set()
        self._current()
        self.flush()

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

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with the persisted index: (kind, one line) pairs, kind "index" or
        "manifest" (an entry lost from under the index) (``circuitscan verify``)."""
        if not self.layout.sites or not self.manifest.committed():
            return []
        fix = f"`circuitscan repair {self.url}` rebuilds it"
        if self.location.read_bytes(INDEX_POINTER) is None:
            return [("index", f"index pointer {INDEX_POINTER} of {self.url} is missing; {fix}")]
        try:
            _index, covered = self._load()
        except CorruptIndexError as exc:
            return [("index", str(exc))]
        except CorruptManifestError as exc:
            return [("manifest", str(exc))]
        if covered != set(self.manifest.committed()):
            return [("index", f"index of {self.url} misses committed shards; {fix}")]
        return []

    def _load(self) -> tuple[dict[str, FeatureIndex], set[int]]:
        index = self._empty()
        raw = self.location.read_bytes(INDEX_POINTER)
        if raw is None:
            return index, set()
        pointer = parse_pointer(raw, self.url)
        shards = set(pointer["shards"])
        gone = sorted(shards - set(self.manifest.committed()))
        if gone and "checksums" in pointer:
            # Uncommitting a shard drops the pointer first, so a pointer covering
            # a shard with no entry means the entry was lost, not uncommitted.
            raise CorruptManifestError(
                f"manifest entry {manifest_key(gone[0])} of {self.url} is missing, but the "
                f"index covers shard {gone[0]}; `circuitscan repair {self.url}` recomputes it"
            )
        if gone:
            return index, set()
        fix = f"`circuitscan repair {self.url}` rebuilds the index from the shards"
        base = f"{INDEX_PREFIX}{pointer['generation']}/"
        objects = self.location.read_prefix(base)
        checksums = pointer.get("checksums")
        if checksums is not None:  # format 2: every object and the shards it covers
            if pointer.get("shards_digest") != shards_digest(self.manifest, sorted(shards)):
                raise CorruptIndexError(
                    f"index pointer {INDEX_POINTER} of {self.url} was built from other manifest "
                    "entries than the committed ones (one was altered or replaced: "
                    f"`circuitscan verify` names it); {fix}"
                )
            bad = sorted(
                key
                for key, expected in checksums.items()
                if (data := objects.get(base + key)) is None or checksum(data) != expected
            )
            if bad:
                raise CorruptIndexError(
                    f"index object {base}{bad[0]} of {self.url} fails its checksum"
                    f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; {fix}"
                )
        wanted = [f"{base}{label}/{name}/zarr.json" for label in index for name in FIELDS]
        if any(key not in objects for key in wanted):
            # A generation written before the index had a field (the histogram):
            # rebuilt from the per-shard summaries, as for a stale pointer.
            return index, set()
        source = memory_store(objects)
        try:
            for label, item in index.items():
                for name in item.__dataclass_fields__:
                    stored = open_array(source, f"{base}{label}/{name}")[...]
                    setattr(item, name, item.from_disk(name, stored))
            if self._attribution is not None:
                loaded = {
                    label: load_attribution(
                        source,
                        set(objects),
                        f"{base}{label}/",
                        paired=self.layout.pairing is not None,
                    )
                    for label in index
                }
                found = {label: item for label, item in loaded.items() if item is not None}
                self._attribution = found if len(found) == len(loaded) else None
        except Exception as exc:  # an unverified (format 1) generation that does not decode
            raise CorruptIndexError(
                f"index generation {base} of {self.url} cannot be decoded ({type(exc).__name__})"
                f"; {fix}"
            ) from exc
        return index, shards

    def _merge(self, index: dict[str, FeatureIndex], shard_ids: list[int]) -> None:
        """Fold committed shards ``shard_ids`` in, each read and checked against its entry."""
        parts = [f"sites/{label}/{kind}/" for label in index for kind in ("summary", "top")]
        if self._attribution is not None:  # a·g needs the entries
            parts = [f"sites/{label}/" for label in index] + ["prompts/"]
        summaries: dict[str, list[ShardSummary]] = {label: [] for label in index}
        terms: dict[str, list[ShardAttribution]] = {label: [] for label in index}
        for shard_id in shard_ids:
            source = self.manifest.read_verified(shard_id, parts)
            start = self.manifest.entry(shard_id).prompt_start
            for label in index:
                summaries[label].append(read_summary(source, shard_id, label, start))
            if self._attribution is not None:
                prompts = read_prompts(source, shard_id)
                for label in self._attribution:
                    site = read_site(source, self.layout, shard_id, label)
                    paired = None
                    if self.layout.pairing is not None:  # the AtP sums need the corrupted side
                        base = f"{shard_prefix(shard_id)}sites/{label}/"
                        paired = read_paired_site(source, self.layout, base)
                    d_sae = self.layout.site(label).d_sae
                    terms[label].append(shard_attribution(site, prompts, start, paired, d_sae))
        for label, item in index.items():
            fold_summaries(item, summaries[label])
        if self._attribution is not None:
            for label, attribution in self._attribution.items():
                fold_attributions(attribution, terms[label])
        self._indexed.update(shard_ids)

    def flush(self) -> None:
        """Persist the merged index (a new generation, then the pointer, then drop the old)."""
        stale = self._indexed != set(self.manifest.committed())
        if self._index is None or (self.layout.sites and stale):
            self._current(repair=True)
        index = self._index
        assert index is not None
        staging: dict[str, Buffer] = {}
        staged = MemoryStore(store_dict=staging)
        for label, item in index.items():
            for name in item.__dataclass_fields__:
                data = item.to_disk(name)
                chunk = (INDEX_ROW_CHUNK, *data.shape[1:])
                write_array(staged, f"{label}/{name}", data, chunk=chunk)
        if self._attribution is not None:
            writes = [
                write
                for label, item in self._attribution.items()
                for write in attribution_writes(f"{label}/", item)
            ]
            encode_arrays(staged, writes)
        objects = {key: value.to_bytes() for key, value in staging.items()}
        checksums = {key: checksum(data) for key, data in sorted(objects.items())}
        # Named by its content: equal shards give an equal generation, in any order.
        generation = f"c{_digest(checksums)}"
        base = f"{INDEX_PREFIX}{generation}/"
        shards = sorted(self._indexed)
        pointer = {
            "format": POINTER_FORMAT,
            "generation": generation,
            "shards": shards,
            "shards_digest": shards_digest(self.manifest, shards),
            "checksums": checksums,
        }
        self.location.write_many({base + key: data for key, data in objects.items()})
        self.location.write_bytes(INDEX_POINTER, _pointer_bytes(pointer))
        # Every other generation goes: the previous one, and any a crash left behind.
        keys = self.location.list_keys(INDEX_PREFIX)
        for old in sorted({key.split("/")[1] for key in keys if key != INDEX_POINTER}):
            if old != generation:
                self.location.delete_prefix(f"{INDEX_PREFIX}{old}/")
        self._unflushed = 0
