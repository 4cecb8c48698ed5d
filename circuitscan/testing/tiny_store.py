"""Write a small, real feature store in-process (no Ray, no job spec), for examples and tests.

Every shard goes through the same calls a cache job's worker and driver make
(``cache_batch``, ``write_shard``, ``commit_shard``, ``flush_index``), so what
it writes opens and queries like any job's store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.caching import cache_batch, site_label
from circuitscan.pipelines.fingerprint import fingerprint_tensors
from circuitscan.pipelines.sae_splice import sae_hook_name
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import SiteLayout, StoreLayout
from circuitscan.services.store import FeatureStore


def write_tiny_store(
    url: str,
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]],
    prompts: Sequence[PromptRecord | Mapping[str, Any]],
    *,
    metric: MetricSpec | None = None,
    shard_size: int = 4,
    examples_per_feature: int = 8,
) -> str:
    """Cache ``prompts`` (records or dicts with answers) into a new store at ``url``; return it."""
    records = [p if isinstance(p, PromptRecord) else PromptRecord(**p) for p in prompts]
    layout = StoreLayout(
        sites=[
            SiteLayout(
                label=site_label(sae),
                hook_name=sae_hook_name(sae),
                d_sae=int(sae.cfg.d_sae),
                sae_fingerprint=fingerprint_tensors(sae.state_dict()),
            )
            for sae in saes
        ],
        shard_size=shard_size,
        examples_per_feature=examples_per_feature,
        model_fingerprint=fingerprint_tensors(model.state_dict()),
        job_hash="tiny-store",
    )
    store = FeatureStore.create(url, layout, overwrite=True)
    for shard_id in range(-(-len(records) // shard_size)):
        shard = records[shard_id * shard_size : (shard_id + 1) * shard_size]
        batch = tokenize_prompts(model, shard)
        caches = cache_batch(
            model,
            saes,
            batch.tokens,
            batch.lengths,
            metric or MetricSpec(),
            answer=batch.answer,
            wrong=batch.wrong,
        )
        store.commit_shard(store.write_shard(shard_id, shard, batch.token_lists(), caches))
    store.flush_index()
    return url
