"""One feature's page: everything from the merged index, stored directions and a few chunks.

What each part reads (none scans the store):

- statistics, density and the activation histogram: one row of the merged
  per-feature index;
- top examples: the index's top slots, and for each the chunks of the site
  arrays that hold its context window (the feature's value on every token);
- weaker examples: the feature's entries in a fixed sample of shards (the
  first, middle and last committed shard, decoded once per open store), at
  activations spread evenly over their range below the top examples;
- promoted / suppressed tokens and reading heads: one row of the site's
  stored directions (``feature_directions.py``);
- where it pushes the metric most: the store's top-attributions index
  (``rankings.top_attributions``) in stores with gradients.
"""

from __future__ import annotations

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
from circuitscan.services.store.errors import StoreError
from circuitscan.services.store.feature_directions import feature_direction_row
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.queries import feature_summary, top_examples
from circuitscan.services.store.shard_io import decode_values
from circuitscan.services.store.summaries import histogram_edges

Decode = Callable[[Sequence[int]], list[str]]
SAMPLE_SHARDS = 3


def _prompt_span(store: FeatureStore, prompt: int) -> tuple[int, int, int]:
    """(shard id, first shard-local token, token count) of a prompt."""
    entry = store.shard_of_prompt(prompt)
    offsets = store.prompt_shard(entry.shard_id).prompt_offsets
    local = prompt - entry.prompt_start
    return entry.shard_id, int(offsets[local]), int(offsets[local + 1] - offsets[local])


def window_values(
    store: FeatureStore, site: str, feature: int, prompt: int, start: int, stop: int
) -> list[float]:
    """The feature's activation on positions ``start..stop-1`` of ``prompt`` (0: not stored)."""
    shard_id, first, _ = _prompt_span(store, prompt)
    lo_token, hi_token = first + start, first + stop
    data = store.cached_site_shard(shard_id, site)
    if data is not None:
        offsets = data.token_offsets[lo_token : hi_token + 1].astype(np.int64)
        ids = data.feature_ids[offsets[0] : offsets[-1]]
        values = data.activations[offsets[0] : offsets[-1]]
    else:  # only the chunks holding the window, as a point query reads
        base = f"sites/{site}/"
        offsets = store.read_rows(shard_id, base + "token_offsets", lo_token, hi_token + 1)
        offsets = offsets.astype(np.int64)
        lo, hi = int(offsets[0]), int(offsets[-1])
        ids = store.read_rows(shard_id, base + "feature_ids", lo, hi)
        raw = store.read_rows(shard_id, base + "activations", lo, hi)
        values = decode_values(raw, store.layout.value_dtype)
    token_of_entry = np.searchsorted(offsets - offsets[0], np.arange(len(ids)), side="right") - 1
    out = np.zeros(stop - start, dtype=np.float64)
    hit = ids.astype(np.int64) == feature
    out[token_of_entry[hit]] = values[hit]
    return out.tolist()


def _example(
    store: FeatureStore,
    site: str,
    feature: int,
    prompt: int,
    position: int,
    activation: float,
    context: int,
    decode: Decode | None,
) -> PageExample:
    tokens = store.prompt_tokens(prompt)
    start, stop = max(0, position - context), min(len(tokens), position + context + 1)
    window = [int(t) for t in tokens[start:stop]]
    return PageExample(
        prompt=prompt,
        position=position,
        activation=activation,
        token_ids=window,
        tokens=decode(window) if decode is not None else None,
        values=window_values(store, site, feature, prompt, start, stop),
        hit_index=position - start,
    )


def sample_shards(store: FeatureStore) -> list[int]:
    """The shards weaker examples come from: first, middle and last committed (fixed per store)."""
    ids = sorted(store.committed_shard_ids())
    if len(ids) <= SAMPLE_SHARDS:
        return ids
    picks = np.linspace(0, len(ids) - 1, SAMPLE_SHARDS).round().astype(int)
    return [ids[i] for i in sorted(set(picks.tolist()))]


def weaker_hits(
    store: FeatureStore, site: str, feature: int, below: float, n: int
) -> list[tuple[int, int, float]]:
    """Up to ``n`` (prompt, position, activation) hits under ``below``, spread over their range."""
    hits: list[tuple[float, int, int]] = []
    for shard_id in sample_shards(store):
        data = store.site_shard(shard_id, site)
        entries = np.flatnonzero(data.feature_ids.astype(np.int64) == feature)
        if not len(entries):
            continue
        values = data.activations[entries]
        keep = values < below
        entries, values = entries[keep], values[keep]
        tokens = np.searchsorted(data.token_offsets, entries, side="right") - 1
        start = store.committed_entry(shard_id)
        assert start is not None
        offsets = store.prompt_shard(shard_id).prompt_offsets
        local = np.searchsorted(offsets, tokens, side="right") - 1
        for token, prompt, value in zip(tokens, local, values, strict=True):
            position = int(token - offsets[prompt])
            hits.append((float(value), int(prompt) + start.prompt_start, position))
    if not hits:
        return []
    hits.sort(key=lambda h: (-h[0], h[1], h[2]))
    picks = np.linspace(0, len(hits) - 1, min(n, len(hits))).round().astype(int)
    return [(hits[i][1], hits[i][2], hits[i][0]) for i in sorted(set(picks.tolist()))]


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
    top = [
        _example(store, site, feature, ex.prompt, ex.position, ex.activation, context, decode)
        for ex in top_examples(store, site, feature, n=n_top, context=0)
    ]
    notes: list[str] = []
    sampled: list[PageExample] = []
    if summary.count > len(top):
        below = min(ex.activation for ex in top) if top else float("inf")
        sampled = [
            _example(store, site, feature, prompt, position, value, context, decode)
            for prompt, position, value in weaker_hits(store, site, feature, below, n_sampled)
        ]
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
