"""Reading the persisted index back: the pointer, its chunks and runs, each checked.

``load_persisted`` is a pure read of a store's ``index/``: it parses the
pointer (index_pointer.py), checks that the shards it covers are the
committed ones (their entries' order-free sum, or an older format's
digest), decodes and checks every chunk (index_chunks.py) and run
(index_runs.py) against it, and returns what the index writer keeps of it
(:class:`PersistedIndex`). Nothing is trusted unchecked: a mismatch is a
CorruptIndexError naming the object, a pointer covering a shard whose entry
is gone a CorruptManifestError. Formats 1 and 2 (a zarr hierarchy per
generation, index_legacy.py) are read and checked here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from circuitscan.schemas.store import StoreLayout
from circuitscan.services.store.attribution_index import AttributionIndex
from circuitscan.services.store.backends import Backend
from circuitscan.services.store.errors import CorruptIndexError, CorruptManifestError
from circuitscan.services.store.index_chunks import load_chunks
from circuitscan.services.store.index_legacy import generation_prefix, load_generation
from circuitscan.services.store.index_pointer import (
    INDEX_POINTER,
    add_terms,
    entry_term,
    parse_pointer,
    pointer_shards,
    shards_digest,
    shards_sum,
    sum_text,
)
from circuitscan.services.store.index_runs import RunArrays, load_runs
from circuitscan.services.store.manifest import ShardManifest, manifest_key
from circuitscan.services.store.summaries import FeatureIndex


def attribution_kind(attribution: dict[str, AttributionIndex] | None) -> str:
    """Which attribution sums an index holds: "none", "plain" or "paired"."""
    if attribution is None:
        return "none"
    paired = all(item.atp_total is not None for item in attribution.values())
    return "paired" if paired else "plain"


@dataclass
class PersistedIndex:
    """What a store's persisted index holds, checked, as the index writer keeps it.

    ``index`` and ``attribution`` hold the chunks' rows (the runs' shards are
    not folded in: their summaries are ``run_summaries``); ``folded`` are the
    shards the rows cover and ``folded_sum`` their part of the pointer's
    ``shards_sum``; ``covered``/``covered_sum`` are every shard the pointer
    covers, runs included.
    """

    index: dict[str, FeatureIndex]
    attribution: dict[str, AttributionIndex] | None
    folded: set[int] = field(default_factory=set)
    folded_sum: int = 0
    # (attribution kind, each site's [object, checksum] per chunk); None: nothing to
    # reuse, the next flush writes every chunk.
    persisted: tuple[str, dict[str, list[list[str]]]] | None = None
    stored: set[str] = field(default_factory=set)  # the objects the pointer names
    base_sites: dict[str, dict[str, Any]] | None = None  # the chunks' part of the pointer
    runs: list[tuple[str, str, set[int]]] = field(default_factory=list)
    run_summaries: RunArrays = field(default_factory=dict)
    covered: set[int] = field(default_factory=set)
    covered_sum: int = 0
    legacy: str | None = None  # a format 1/2 generation the next flush deletes


def site_payload(
    label: str, chunks: list[str], attribution: dict[str, AttributionIndex] | None
) -> dict[str, Any]:
    """A site's part of the pointer: its chunks, and the AtP error sums of the index."""
    payload: dict[str, Any] = {"chunks": chunks}
    item = None if attribution is None else attribution[label]
    if item is not None and item.error_atp is not None:
        assert item.error_atp_residual is not None
        payload["error_atp"] = [float(value) for value in item.error_atp]
        payload["error_atp_residual"] = [float(value) for value in item.error_atp_residual]
    return payload


def _nothing_persisted(found: PersistedIndex) -> PersistedIndex:
    """Record that nothing is persisted yet: a flush may write runs over no chunks."""
    kind = attribution_kind(found.attribution)
    found.persisted = (kind, {label: [] for label in found.index})
    found.base_sites = {label: site_payload(label, [], found.attribution) for label in found.index}
    found.stored = set()
    return found


def load_persisted(
    location: Backend,
    layout: StoreLayout,
    manifest: ShardManifest,
    raw: bytes | None,
    empty: PersistedIndex,
    entry_digests: dict[int, str],
) -> PersistedIndex:
    """The persisted index of a store whose pointer is ``raw`` (as read; None: there is
    none), checked, over ``empty`` (its empty index and attribution sums, filled in
    place); ``entry_digests`` caches the committed entries' digests (filled here)."""
    url = manifest.url
    found = empty
    if raw is None:
        return _nothing_persisted(found)
    pointer = parse_pointer(raw, url)
    shards = pointer_shards(pointer)
    gone = sorted(shards - set(manifest.committed()))
    if (gone and "checksums" in pointer) or (gone and "sites" in pointer):
        # Uncommitting a shard drops the pointer first, so a pointer covering
        # a shard with no entry means the entry was lost, not uncommitted.
        raise CorruptManifestError(
            f"manifest entry {manifest_key(gone[0])} of {url} is missing, but the "
            f"index covers shard {gone[0]}; `circuitscan repair {url}` recomputes it"
        )
    if gone:
        return _nothing_persisted(found)
    fix = f"`circuitscan repair {url}` rebuilds the index from the shards"
    total = shards_sum(manifest, shards, entry_digests)  # once, at load
    if "shards_sum" in pointer:  # formats 4 and 5
        built_from_others = pointer["shards_sum"] != sum_text(total)
    else:  # formats 2 and 3 (format 1 carries no digest)
        checked = "checksums" in pointer or "sites" in pointer
        digest = shards_digest(manifest, sorted(shards), entry_digests)
        built_from_others = checked and pointer.get("shards_digest") != digest
    if built_from_others:
        raise CorruptIndexError(
            f"index pointer {INDEX_POINTER} of {url} was built from other manifest "
            "entries than the committed ones (one was altered or replaced: "
            f"`circuitscan verify` names it); {fix}"
        )
    if "sites" not in pointer:  # formats 1 and 2: one zarr hierarchy per generation
        loaded, found.attribution = load_generation(
            location, pointer, found.index, found.attribution,
            paired=layout.pairing is not None, fix=fix, url=url,
        )  # fmt: skip
        found.legacy = generation_prefix(pointer)
        if loaded:
            found.folded, found.folded_sum = set(shards), total
            found.covered, found.covered_sum = set(shards), total
        return found
    _read_chunks(location, layout, pointer, found, fix, url)
    labels = {site.label for site in layout.sites}
    found.run_summaries, found.runs = load_runs(location, pointer, shards, labels, url, fix)
    found.stored |= {key for key, _, _ in found.runs}
    in_runs = {i for _, _, run_shards in found.runs for i in run_shards}
    found.covered, found.covered_sum = set(shards), total
    found.folded = shards - in_runs
    found.folded_sum = add_terms(total, [-entry_term(i, entry_digests[i]) for i in in_runs])
    return found


def _read_chunks(
    location: Backend,
    layout: StoreLayout,
    pointer: dict[str, Any],
    found: PersistedIndex,
    fix: str,
    url: str,
) -> None:
    """Fill ``found`` from a format 3+ pointer's chunks, each checked against it."""
    kind = pointer.get("attribution", "none")
    if kind != attribution_kind(found.attribution):
        found.attribution = None  # written before the store kept (these) sums
    d_saes = {label: layout.site(label).d_sae for label in found.index}
    refs = load_chunks(location, pointer, found.index, found.attribution, d_saes, url, fix)
    found.persisted = (kind if found.attribution is not None else "none", refs)
    found.stored = {key for chunks in refs.values() for key, _ in chunks}
    found.base_sites = {label: pointer["sites"][label] for label in found.index}
