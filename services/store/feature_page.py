"""One feature's page: everything from the merged index, stored directions and a few chunks.

What each part reads (none scans the store):

- statistics, density and the activation histogram: one row of the merged
  per-feature index;
- top examples: the index's top slots, and for each the chunks of the site
  arrays that hold its context window (the feature's value on every token),
  read shard by shard with each chunk decoded once and kept by the store;
- weaker examples: the feature's entries in a fixed sample of shards (the
  first, middle and last committed shard, decoded and sorted by feature once
  per open store), at activations spread evenly over their range below the
  top examples;
- promoted / suppressed tokens and reading heads: one row of the site's
  stored directions (``feature_directions.py``);
- where it pushes the metric most: the store's top-attributions index
  (``rankings.top_attributions``) in stores with gradients.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import numpy as np

from circuitscan.schemas.analyses import TokenEffect
from circuitscan.schemas.feature_page import (
    ActivationHistogram,
    FeaturePage,
    MetricPush,
    PageExample,
    ReadingHead,
)
from circuitscan.schemas.store import ShardEntry
from circuitscan.services.store.errors import StoreError
from circuitscan.services.store.feature_directions import feature_direction_row
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.queries import feature_summary
from circuitscan.services.store.shard_io import decode_values
from circuitscan.services.store.summaries import EMPTY, histogram_edges

Decode = Callable[[Sequence[int]], list[str]]
SAMPLE_SHARDS = 3


def _prompt_span(store: FeatureStore, prompt: int) -> tuple[int, int, int]:
    """(shard id, first shard-local token, token count) of a prompt.

    Read as rows of the shard's prompt offsets (one small chunk, decoded once
    and kept), not by decoding the whole prompt shard through zarr, which
    costs a page several milliseconds for each shard it has not seen yet.
    """
    entry = store.shard_of_prompt(prompt)
    local = prompt - entry.prompt_start
    bounds = store.read_rows(entry.shard_id, "prompts/prompt_offsets", local, local + 2)
    return entry.shard_id, int(bounds[0]), int(bounds[1] - bounds[0])


def _values_in(
    ids: np.ndarray, values: np.ndarray, offsets: np.ndarray, feature: int, n: int
) -> list[float]:
    """The feature's value on each of ``n`` tokens whose entries ``offsets`` delimit."""
    offsets = offsets.astype(np.int64) - int(offsets[0])
    token_of_entry = np.searchsorted(offsets, np.arange(len(ids)), side="right") - 1
    out = np.zeros(n, dtype=np.float64)
    hit = ids.astype(np.int64) == feature
    out[token_of_entry[hit]] = values[hit]
    return out.tolist()


def shard_windows(
    store: FeatureStore, site: str, feature: int, shard_id: int, windows: Sequence[tuple[int, int]]
) -> list[list[float]]:
    """The feature's activation on shard-local tokens ``lo..hi-1`` of each window (0: not stored).

    All the windows of one shard are read together: its token offsets once,
    then the entry rows of each window, whose chunks the store decodes once
    and keeps (``FeatureStore.chunk_cache_bytes``), so a chunk holding the
    context of several examples is verified and decompressed once.
    """
    data = store.cached_site_shard(shard_id, site)
    if data is not None:
        return [
            _values_in(
                data.feature_ids[data.token_offsets[lo] : data.token_offsets[hi]],
                data.activations[data.token_offsets[lo] : data.token_offsets[hi]],
                data.token_offsets[lo : hi + 1],
                feature,
                hi - lo,
            )
            for lo, hi in windows
        ]
    base = f"sites/{site}/"
    first = min(lo for lo, _ in windows)
    last = max(hi for _, hi in windows)
    offsets = store.read_rows(shard_id, base + "token_offsets", first, last + 1).astype(np.int64)
    out = []
    for lo, hi in windows:
        bounds = offsets[lo - first : hi - first + 1]
        start, stop = int(bounds[0]), int(bounds[-1])
        ids = store.read_rows(shard_id, base + "feature_ids", start, stop)
        raw = store.read_rows(shard_id, base + "activations", start, stop)
        out.append(
            _values_in(ids, decode_values(raw, store.layout.value_dtype), bounds, feature, hi - lo)
        )
    return out


def window_values(
    store: FeatureStore, site: str, feature: int, prompt: int, start: int, stop: int
) -> list[float]:
    """The feature's activation on positions ``start..stop-1`` of ``prompt`` (0: not stored)."""
    shard_id, first, _ = _prompt_span(store, prompt)
    return shard_windows(store, site, feature, shard_id, [(first + start, first + stop)])[0]


def _examples(
    store: FeatureStore,
    site: str,
    feature: int,
    hits: Sequence[tuple[int, int, float]],
    context: int,
    decode: Decode | None,
) -> list[PageExample]:
    """Pages' examples of (prompt, position, activation) hits, read shard by shard."""
    windows: list[tuple[int, int, int, list[int]]] = []  # shard, local start, window start, ids
    by_shard: dict[int, list[int]] = {}
    for i, (prompt, position, _) in enumerate(hits):
        shard_id, first, length = _prompt_span(store, prompt)
        start, stop = max(0, position - context), min(length, position + context + 1)
        tokens = store.read_rows(shard_id, "prompts/token_ids", first + start, first + stop)
        windows.append((shard_id, first + start, start, [int(t) for t in tokens]))
        by_shard.setdefault(shard_id, []).append(i)
    values: dict[int, list[float]] = {}
    for shard_id, members in by_shard.items():
        spans = [(windows[i][1], windows[i][1] + len(windows[i][3])) for i in members]
        for i, got in zip(
            members, shard_windows(store, site, feature, shard_id, spans), strict=True
        ):
            values[i] = got
    return [
        PageExample(
            prompt=prompt,
            position=position,
            activation=activation,
            token_ids=ids,
            tokens=decode(ids) if decode is not None else None,
            values=values[i],
            hit_index=position - start,
        )
        for i, ((prompt, position, activation), (_, _, start, ids)) in enumerate(
            zip(hits, windows, strict=True)
        )
    ]


def sample_shards(store: FeatureStore) -> list[int]:
    """The shards weaker examples come from: first, middle and last committed (fixed per store)."""
    ids = sorted(store.committed_shard_ids())
    if len(ids) <= SAMPLE_SHARDS:
        return ids
    picks = np.linspace(0, len(ids) - 1, SAMPLE_SHARDS).round().astype(int)
    return [ids[i] for i in sorted(set(picks.tolist()))]


def _entries(store: FeatureStore, shard_ids: list[int]) -> tuple[ShardEntry | None, ...]:
    """The open store's cached manifest entries (no read: a refresh replaces the objects)."""
    committed = store.manifest.committed()
    return tuple(committed.get(s) for s in shard_ids)


class _SampleHits:
    """Every entry of the sample shards of one site, sorted by feature (built once per store).

    A page then finds its feature's weaker examples by a binary search
    instead of a pass over the sample shards' entries.
    """

    def __init__(self, store: FeatureStore, site: str, shard_ids: list[int]) -> None:
        self.entries = _entries(store, shard_ids)
        parts: list[tuple[np.ndarray, ...]] = []
        for shard_id, start in zip(shard_ids, self.entries, strict=True):
            data = store.site_shard(shard_id, site)
            assert start is not None
            offsets = store.prompt_shard(shard_id).prompt_offsets
            tokens = np.searchsorted(data.token_offsets, np.arange(len(data.feature_ids)), "right")
            tokens = tokens - 1
            local = np.searchsorted(offsets, tokens, side="right") - 1
            parts.append(
                (
                    data.feature_ids.astype(np.int32),  # 4 bytes an entry each: kept per store
                    data.activations.astype(np.float32),
                    (local + start.prompt_start).astype(np.int32),
                    (tokens - offsets[local]).astype(np.int32),
                )
            )
        if parts:
            ids, values, prompts, positions = (np.concatenate(p) for p in zip(*parts, strict=True))
        else:
            ids = prompts = positions = np.zeros(0, dtype=np.int32)
            values = np.zeros(0, dtype=np.float32)
        order = np.argsort(ids, kind="stable")
        self.ids, self.values = ids[order], values[order]
        self.prompts, self.positions = prompts[order], positions[order]

    def current(self, store: FeatureStore, shard_ids: list[int]) -> bool:
        entries = _entries(store, shard_ids)
        return len(entries) == len(self.entries) and all(
            a is b for a, b in zip(entries, self.entries, strict=True)
        )


_SAMPLES: weakref.WeakKeyDictionary[FeatureStore, dict[str, _SampleHits]] = (
    weakref.WeakKeyDictionary()
)


def _sample_hits(store: FeatureStore, site: str) -> _SampleHits:
    shard_ids = sample_shards(store)
    per_site = _SAMPLES.setdefault(store, {})
    known = per_site.get(site)
    if known is None or not known.current(store, shard_ids):
        known = per_site[site] = _SampleHits(store, site, shard_ids)
    return known


def weaker_hits(
    store: FeatureStore, site: str, feature: int, below: float, n: int
) -> list[tuple[int, int, float]]:
    """Up to ``n`` (prompt, position, activation) hits under ``below``, spread over their range."""
    sample = _sample_hits(store, site)
    lo, hi = np.searchsorted(sample.ids, [feature, feature + 1])
    values = sample.values[lo:hi]
    keep = values < below
    values = values[keep]
    if not len(values):
        return []
    prompts, positions = sample.prompts[lo:hi][keep], sample.positions[lo:hi][keep]
    order = np.lexsort((positions, prompts, -values))  # largest first, then by place
    picks = np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int)
    return [
        (int(prompts[order[i]]), int(positions[order[i]]), float(values[order[i]]))
        for i in sorted(set(picks.tolist()))
    ]


def _effects(ids: list[int], values: list[float], decode: Decode | None) -> list[TokenEffect]:
    names = decode(ids) if decode is not None else [None] * len(ids)
    return [
        TokenEffect(token_id=int(i), token=name, logit=float(v))
        for i, name, v in zip(ids, names, values, strict=True)
    ]


def _pushes(store: FeatureStore, site: str, feature: int, n: int) -> list[MetricPush] | None:
    if not store.layout.gradients:
        return None
    from circuitscan.services.store.rankings import top_attributions

    try:
        ranking = top_attributions(store, site, per="position", feature=feature, n=n)
    except StoreError:  # a store written before the attribution index
        return None
    return [
        MetricPush(prompt=int(r.prompt), position=int(r.position), attribution=r.value)
        for r in ranking.rows
        if r.prompt is not None and r.position is not None
    ]


def feature_page(
    store: FeatureStore,
    site: str,
    feature: int,
    *,
    n_top: int = 10,
    n_sampled: int = 6,
    context: int = 6,
    decode: Decode | None = None,
) -> FeaturePage:
    """The feature page of ``feature`` at ``site`` (see the module docstring for its sources)."""
    summary = feature_summary(store, site, feature)  # QueryRangeError for a bad feature
    index = store.feature_index(site)
    counts = [int(c) for c in index.hist[feature]]
    top_hits = []  # the index's top slots, as top_examples reads them
    for slot in range(min(n_top, index.top_prompt.shape[1])):
        prompt = int(index.top_prompt[feature, slot])
        if prompt == EMPTY:
            break
        position, value = int(index.top_position[feature, slot]), index.top_value[feature, slot]
        top_hits.append((prompt, position, float(value)))
    notes: list[str] = []
    weaker: list[tuple[int, int, float]] = []
    if summary.count > len(top_hits):
        below = min(h[2] for h in top_hits) if top_hits else float("inf")
        weaker = weaker_hits(store, site, feature, below, n_sampled) if n_sampled else []
    # Top and weaker examples together: one read per shard, each chunk decoded once.
    examples = _examples(store, site, feature, top_hits + weaker, context, decode)
    top, sampled = examples[: len(top_hits)], examples[len(top_hits) :]
    if sum(counts) < summary.count:
        notes.append(
            f"the histogram counts {sum(counts)} of {summary.count} activations: some shards "
            "were written before stores kept histograms"
        )
    row = feature_direction_row(store, site, feature)
    if row is None:
        notes.append(
            "no logit effects or reading heads: run `circuitscan analyze feature-directions "
            f"{store.url}` where the model and SAE are available"
        )
    pushes = _pushes(store, site, feature, n_top)
    if pushes is None:
        notes.append("no metric pushes: the store keeps no gradients")
    return FeaturePage(
        site=site,
        feature=feature,
        summary=summary,
        density=summary.frequency,
        histogram=ActivationHistogram(
            edges=histogram_edges().tolist(), counts=counts, covered=sum(counts)
        ),
        top=top,
        sampled=sampled,
        promoted=None if row is None else _effects(row["top_ids"], row["top_values"], decode),
        suppressed=None
        if row is None
        else _effects(row["bottom_ids"], row["bottom_values"], decode),
        reading_heads=None
        if row is None
        else [
            ReadingHead(layer=int(layer), head=int(head), gain=float(gain))
            for layer, head, gain in zip(
                row["head_layers"], row["head_indices"], row["head_gains"], strict=True
            )
        ],
        pushes=pushes,
        notes=notes,
    )
