"""Folding many shards into the merged index at once gives the bytes of shard-by-shard merges,
whatever the batches and their order (random shards with ties and full top-K rows)."""

from __future__ import annotations

import numpy as np
import pytest

from circuitscan.services.store.attribution_index import (
    AttributionIndex,
    shard_attribution,
    summarize_attribution,
)
from circuitscan.services.store.index_fold import fold_attributions, fold_summaries
from circuitscan.services.store.shard_io import PromptShard, SiteShard
from circuitscan.services.store.summaries import FeatureIndex, summarize_shard

D_SAE, K, PROMPTS, TOKENS = 40, 3, 6, 5


def _shard(seed: int) -> tuple[SiteShard, PromptShard, int]:
    rng = np.random.default_rng(seed)
    n_tokens = PROMPTS * TOKENS
    per_token = rng.integers(0, 6, n_tokens)
    ids = np.concatenate([np.sort(rng.choice(D_SAE, n, replace=False)) for n in per_token])
    # Few distinct values, so ties (broken by prompt, position) are common.
    activations = rng.choice([0.5, 1.0, 2.0, 3.0], len(ids)).astype(np.float32)
    gradients = rng.choice([-1.0, 0.25, 1.0], len(ids)).astype(np.float32)
    site = SiteShard(
        token_offsets=np.r_[0, np.cumsum(per_token)].astype(np.int64),
        feature_ids=ids.astype(np.int64),
        activations=activations,
        gradients=gradients,
        error_norm=np.zeros(n_tokens, dtype=np.float32),
        dropped_mass=None,
    )
    prompts = PromptShard(
        token_ids=np.zeros(n_tokens, dtype=np.int64),
        prompt_offsets=np.arange(0, n_tokens + 1, TOKENS, dtype=np.int64),
    )
    return site, prompts, seed * PROMPTS


def _summary(site: SiteShard, prompts: PromptShard, start: int):  # type: ignore[no-untyped-def]
    n_tokens = PROMPTS * TOKENS
    token_index = np.repeat(np.arange(n_tokens), np.diff(site.token_offsets))
    return summarize_shard(
        site.feature_ids,
        site.activations,
        start + np.repeat(np.arange(PROMPTS), TOKENS),
        np.tile(np.arange(TOKENS), PROMPTS),
        token_index,
        K,
    )


def _same(a: object, b: object) -> None:
    for name in a.__dataclass_fields__:  # type: ignore[attr-defined]
        left, right = getattr(a, name), getattr(b, name)
        if left is None or right is None:
            assert left is right, name
            continue
        assert left.dtype == right.dtype, name
        assert left.tobytes() == right.tobytes(), name


@pytest.mark.parametrize("k", [3, 8])  # the insertion's binary search: 2 and 4 steps
@pytest.mark.parametrize(
    "batches", [[list(range(12))], [[5, 1], [0, 11, 3], [6, 7, 8, 9, 10, 2, 4]]]
)
def test_a_fold_equals_shard_by_shard_merges(
    batches: list[list[int]], k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setattr(sys.modules[__name__], "K", k)
    shards = {seed: _shard(seed) for seed in range(12)}
    merged, attribution = FeatureIndex.empty(D_SAE, K), AttributionIndex.empty(D_SAE, K)
    for seed in sorted(shards):
        site, prompts, start = shards[seed]
        merged.merge(_summary(site, prompts, start))
        attribution.merge(shard_attribution(site, prompts, start))
    folded, folded_attribution = FeatureIndex.empty(D_SAE, K), AttributionIndex.empty(D_SAE, K)
    for batch in batches:
        fold_summaries(folded, [_summary(*shards[s]) for s in batch])
        terms = [summarize_attribution(shard_attribution(*shards[s]), K) for s in batch]
        fold_attributions(folded_attribution, terms)
    assert (merged.top_prompt[:, K - 1] != -1).sum() > D_SAE // 2  # rows fill: the filter acts
    _same(merged, folded)
    _same(attribution, folded_attribution)


def _awkward(seed: int) -> tuple[SiteShard, PromptShard, int]:
    """A shard whose a·g terms span 16 orders of magnitude: float sums of them depend on
    their order (the shard's own sums, in entry order, are still one fixed value)."""
    site, prompts, start = _shard(seed)
    rng = np.random.default_rng(1000 + seed)
    n = len(site.feature_ids)
    site.activations = (rng.random(n) * 10.0 ** rng.integers(-8, 5, n)).astype(np.float32)
    site.gradients = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 5, n)).astype(np.float32)
    return site, prompts, start


def test_attribution_totals_are_the_same_bytes_in_any_order_and_batches() -> None:
    shards = [_awkward(seed) for seed in range(24)]
    terms = [summarize_attribution(shard_attribution(*shard), K) for shard in shards]
    rng = np.random.default_rng(7)
    folded = []
    for _ in range(4):
        order = rng.permutation(len(shards))
        index = AttributionIndex.empty(D_SAE, K)
        cuts = np.sort(rng.choice(np.arange(1, len(order)), 3, replace=False))
        for batch in np.split(order, cuts):
            fold_attributions(index, [terms[i] for i in batch])
        folded.append(index)
    merged = AttributionIndex.empty(D_SAE, K)
    for i in reversed(range(len(shards))):
        merged.merge(shard_attribution(*shards[i]))
    for index in folded:
        _same(merged, index)
    # Plain float addition of the same per-shard sums does depend on the order here.
    naive = [np.zeros(D_SAE), np.zeros(D_SAE)]
    for total, order in zip(naive, [range(len(terms)), reversed(range(len(terms)))], strict=True):
        for i in order:
            total[terms[i].features] += terms[i].total
    assert not np.array_equal(naive[0], naive[1])
    # Each total is the exact sum of the shards' sums, rounded once.
    from fractions import Fraction

    for feature in range(D_SAE):
        exact = sum(
            (Fraction(float(t.total[t.features == feature].sum())) for t in terms), Fraction(0)
        )
        assert merged.total[feature] == float(exact)
