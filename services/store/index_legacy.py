"""What the index reads of stores written before its current layouts.

- Index generations of pointer formats 1 and 2 (one zarr hierarchy per
  generation, ``index/<generation>/<site>/<array>/...``, from before the index
  was kept as content-addressed row chunks, index_chunks.py): read, and checked
  against a format 2 pointer's checksums, here; the next flush replaces them
  by chunks and deletes the generation.
- Shards written before index summaries (shard_summary.py): their
  ``summary/`` and ``top/`` arrays and, for the a·g sums, their entries, summed
  by the same functions the worker now applies when it writes a shard.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from circuitscan.schemas.store import StoreLayout
from circuitscan.services.store.attribution_index import (
    AttributionIndex,
    AttributionSummary,
    load_attribution,
    shard_attribution,
    summarize_attribution,
)
from circuitscan.services.store.backends import Backend
from circuitscan.services.store.encoding import open_array
from circuitscan.services.store.errors import CorruptIndexError
from circuitscan.services.store.manifest import ShardManifest
from circuitscan.services.store.paired_io import read_paired_site
from circuitscan.services.store.shard_io import (
    PromptShard,
    SiteShard,
    checksum,
    memory_store,
    read_prompts,
    read_site,
    read_summary,
    shard_prefix,
)
from circuitscan.services.store.summaries import FeatureIndex, ShardSummary, summarize_shard

FIELDS = tuple(FeatureIndex.__dataclass_fields__)
INDEX_PREFIX = "index/"


def generation_prefix(pointer: dict[str, Any]) -> str:
    return f"{INDEX_PREFIX}{pointer['generation']}/"


def load_generation(
    location: Backend,
    pointer: dict[str, Any],
    index: dict[str, FeatureIndex],
    attribution: dict[str, AttributionIndex] | None,
    *,
    paired: bool,
    fix: str,
    url: str,
) -> tuple[bool, dict[str, AttributionIndex] | None]:
    """Fill ``index`` from a format 1/2 generation: (loaded, attribution sums or None).

    ``loaded`` is False for a generation written before the index had a field
    (rebuilt from the shards, as for a stale pointer).
    """
    base = generation_prefix(pointer)
    objects = location.read_prefix(base)
    checksums = pointer.get("checksums")
    if checksums is not None:  # format 2: every object
        bad = sorted(
            key
            for key, expected in checksums.items()
            if (data := objects.get(base + key)) is None or checksum(data) != expected
        )
        if bad:
            raise CorruptIndexError(
                f"index object {base}{bad[0]} of {url} fails its checksum"
                f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; {fix}"
            )
    wanted = [f"{base}{label}/{name}/zarr.json" for label in index for name in FIELDS]
    if any(key not in objects for key in wanted):
        return False, attribution
    source = memory_store(objects)
    try:
        for label, item in index.items():
            for name in FIELDS:
                stored = open_array(source, f"{base}{label}/{name}")[...]
                setattr(item, name, item.from_disk(name, stored))
        if attribution is not None:
            loaded = {
                label: load_attribution(source, set(objects), f"{base}{label}/", paired=paired)
                for label in index
            }
            found = {label: item for label, item in loaded.items() if item is not None}
            attribution = found if len(found) == len(loaded) else None
    except Exception as exc:  # an unverified (format 1) generation that does not decode
        raise CorruptIndexError(
            f"index generation {base} of {url} cannot be decoded ({type(exc).__name__}); {fix}"
        ) from exc
    return True, attribution


def summaries_from_arrays(
    manifest: ShardManifest, layout: StoreLayout, shard_id: int, with_terms: bool
) -> list[tuple[str, ShardSummary, AttributionSummary | None]]:
    """Per site, a shard's summaries and, with ``with_terms``, its attribution summary,
    from its arrays (each object checked): its ``summary/`` arrays where it has them
    (shards written before index summaries), else summed from its entries as the
    worker does."""
    entry = manifest.entry(shard_id)
    labels = [site.label for site in layout.sites]
    stored = all(f"sites/{label}/summary/features/zarr.json" in entry.checksums for label in labels)
    parts = [f"sites/{label}/{kind}/" for label in labels for kind in ("summary", "top")]
    if with_terms or not stored:  # the entries themselves
        parts = [f"sites/{label}/" for label in labels] + ["prompts/"]
    source = manifest.read_verified(shard_id, parts)
    start = entry.prompt_start
    prompts = read_prompts(source, shard_id) if with_terms or not stored else None
    out = []
    for label in labels:
        site = None if prompts is None else read_site(source, layout, shard_id, label)
        if stored:
            summary = read_summary(source, shard_id, label, start)
        else:
            assert site is not None and prompts is not None
            summary = _summarize(site, prompts, start, layout.examples_per_feature)
        attribution = None
        if with_terms:
            assert site is not None and prompts is not None
            paired = None
            if layout.pairing is not None:  # the AtP sums need the corrupted side
                paired = read_paired_site(source, layout, f"{shard_prefix(shard_id)}sites/{label}/")
            terms = shard_attribution(site, prompts, start, paired, layout.site(label).d_sae)
            attribution = summarize_attribution(terms, layout.examples_per_feature)
        out.append((label, summary, attribution))
    return out


def _summarize(site: SiteShard, prompts: PromptShard, start: int, k: int) -> ShardSummary:
    lengths = np.diff(prompts.prompt_offsets).astype(np.int64)
    n_tokens = int(lengths.sum())
    token_prompt = start + np.repeat(np.arange(len(lengths)), lengths)
    token_position = np.arange(n_tokens) - np.repeat(prompts.prompt_offsets[:-1], lengths)
    token_index = np.repeat(np.arange(n_tokens), np.diff(site.token_offsets).astype(np.int64))
    return summarize_shard(
        site.feature_ids.astype(np.int64),
        site.activations,
        token_prompt,
        token_position,
        token_index,
        k,
    )
