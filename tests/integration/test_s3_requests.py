"""Object-storage requests per shard are a constant, whatever the store's size.

A real moto S3 server behind a counting proxy (s3_counting.py). A job's shard
tail (the worker's committed check, ``write_shard``, the driver's commit with
its manifest in memory, the index flushes every 16 commits and the job's last
one) runs for a 16-shard and a 64-shard store of a small layout, request by
request: each phase costs the same in both stores and in every shard of them,
each flush the same (the first has no old generation to delete), and the
job's requests over its shards are equal within 5 %. The worker's
committed check is one GET of the shard's own entry, for a new shard and for
a committed one, at any store size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from s3_counting import PHASES, RequestCounter, TailRequests, counted_s3, shard_tail_requests

from circuitscan.pipelines.site_cache import SiteCache
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import SiteLayout, StoreLayout
from circuitscan.services.jobs.shard_runner import already_committed
from circuitscan.services.store import FeatureStore
from circuitscan.testing.random_sites import random_site_cache

pytestmark = pytest.mark.integration

SIZES = (16, 64)
FLUSH_EVERY = 16  # divides both sizes: every shard of either store pays the same flush share
PROMPTS, TOKENS, D_SAE, K = 4, 5, 64, 4


def _layout() -> StoreLayout:
    site = SiteLayout(label="L0.resid_post", hook_name="blocks.0.hook_resid_post", d_sae=D_SAE)
    return StoreLayout(
        sites=[site], gradients=True, top_k_per_token=K, shard_size=PROMPTS, job_hash="s3-req"
    )


def _shard() -> tuple[list[PromptRecord], list[list[int]], dict[str, SiteCache]]:
    """One shard's prompts, token ids and site cache (K random features a token)."""
    rng = np.random.default_rng(0)
    n_tokens = PROMPTS * TOKENS
    cache = random_site_cache(rng, n_tokens, D_SAE, K)
    prompts = [PromptRecord(text=f"prompt {i}") for i in range(PROMPTS)]
    tokens = [rng.integers(0, 100, TOKENS).tolist() for _ in prompts]
    return prompts, tokens, {"L0.resid_post": cache}


@pytest.fixture(scope="module")
def s3() -> Any:
    with counted_s3() as (bucket, counter):
        yield bucket, counter


@pytest.fixture(scope="module")
def tails(s3: tuple[str, RequestCounter]) -> dict[int, TailRequests]:
    bucket, counter = s3
    shard = _shard()
    return {
        n: shard_tail_requests(counter, f"s3://{bucket}/n{n}", _layout(), shard, n, FLUSH_EVERY)
        for n in SIZES
    }


def test_requests_per_shard_do_not_grow_with_the_store(tails: dict[int, TailRequests]) -> None:
    small, large = tails[16], tails[64]
    assert small.interval == large.interval == FLUSH_EVERY
    for phase in PHASES:
        counts = {shard[phase] for tail in tails.values() for shard in tail.shards[1:]}
        assert len(counts) == 1, (phase, counts)  # every shard of both stores alike
        first = {tail.shards[0][phase] for tail in tails.values()}
        # A driver's first commit also reads the persisted index pointer, once.
        assert first == counts or (phase == "commit" and first == {counts.pop() + 1}), phase
    assert small.shards[1]["check"] == 1  # one GET of the shard's own entry
    # The commits' flushes (1 and 4) and the job's last: flushes after the first also
    # remove the generation before (a DELETE, a listing), so they may exceed it by those,
    # and none grows with the store.
    assert len(small.flushes) == 2 and len(large.flushes) == 5
    assert len(set(large.flushes[1:4])) == 1
    assert 0 <= large.flushes[1] - small.flushes[0] <= 2
    assert large.flushes[-1] <= large.flushes[1] and small.flushes[-1] <= large.flushes[1]
    assert large.per_shard() == pytest.approx(small.per_shard(), rel=0.05)


def test_committed_check_is_one_get_at_any_store_size(s3: tuple[str, RequestCounter]) -> None:
    bucket, counter = s3
    for n in SIZES:
        store = FeatureStore.open(f"s3://{bucket}/n{n}")  # the tails fixture's stores
        for shard_id, committed in ((n - 1, True), (n, False)):
            counter.reset()
            found = already_committed(store, shard_id)
            assert (found is not None) is committed
            assert counter.by_method == {"GET": 1}, (n, shard_id, counter.by_method)


def test_tails_fixture_committed_every_shard(tails: dict[int, TailRequests], s3: Any) -> None:
    bucket, _ = s3
    for n in SIZES:
        assert FeatureStore.open(f"s3://{bucket}/n{n}").committed_shard_ids() == set(range(n))
