"""The ``cache`` kind: sparse SAE activations, their gradients and error norms for every site.

A cache job's output is the store's per-site data itself (written by
``write_shard``), so it has no partial and no job-level result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from circuitscan.schemas.jobs import CacheParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import PairingLayout, SiteLayout, StoreLayout
from circuitscan.services.jobs.job_kind import ComputedShard, JobKind, KindCheckError
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.jobs.shard_runner import (
    ShardRunner,
    named_positions,
    record_batches,
    tokenize_capped,
    tokenize_capped_counting,
)

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from circuitscan.services.jobs.worker import WorkerInfo
    from circuitscan.services.sae_loading import LoadedSAE


class CacheRunner(ShardRunner):
    """One shard's activations (and gradients of the metric) at every SAE site."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, CacheParams)
        super().__init__(spec, model)
        self.params = spec.job
        self.saes = [loaded.sae for loaded in saes]

    def compute(
        self, plan: ShardPlan, records: list[PromptRecord], context: list[PromptRecord] | None
    ) -> ComputedShard:
        from circuitscan.pipelines.caching import cache_batch, merge_site_caches

        if self.params.paired:
            return self._paired(records)
        caches = []
        token_lists: list[list[int]] = []
        for part in record_batches(self.model, records, self.cap, self.spec):
            batch = tokenize_capped(self.model, part, self.cap)
            caches.append(
                cache_batch(
                    self.model,
                    self.saes,
                    batch.tokens,
                    batch.lengths,
                    self.spec.metric if self.params.gradients else None,
                    answer=batch.answer,
                    wrong=batch.wrong,
                    top_k=self.params.top_k,
                    gradients=self.params.gradients,
                )
            )
            token_lists += batch.token_lists()
        return ComputedShard(token_lists, site_caches=merge_site_caches(caches))

    def _paired(self, records: list[PromptRecord]) -> ComputedShard:
        """Clean forward + backward and corrupted forward per batch (pipelines.paired_caching)."""
        import torch

        from circuitscan.pipelines.attribution.positions import end_aligned_map
        from circuitscan.pipelines.caching import merge_site_caches
        from circuitscan.pipelines.paired_caching import cache_pairs
        from circuitscan.services.store.paired_io import shard_pairs

        caches, paired_positions = [], []
        token_lists: list[list[int]] = []
        named: list[dict[str, int]] = []
        for part in record_batches(self.model, records, self.cap, self.spec):
            clean, removed = tokenize_capped_counting(self.model, part, self.cap)
            corrupted = [r.model_copy(update={"text": r.corrupted}) for r in part]
            corrupt = tokenize_capped(self.model, corrupted, self.cap)
            position_map = None
            if self.params.align == "end":
                position_map = end_aligned_map(
                    clean.lengths, corrupt.lengths, clean.tokens.shape[1]
                )
            sites, paired = cache_pairs(
                self.model,
                self.saes,
                clean.tokens,
                clean.lengths,
                corrupt.tokens,
                corrupt.lengths,
                self.spec.metric,
                answer=clean.answer,
                wrong=clean.wrong,
                top_k=self.params.top_k,
                position_map=position_map,
            )
            caches.append(sites)
            paired_positions.append(paired)
            token_lists += clean.token_lists()
            named += named_positions(part, removed) or [{} for _ in part]
        pairs = shard_pairs(named, torch.cat(paired_positions), len(records))
        return ComputedShard(token_lists, site_caches=merge_site_caches(caches), pairs=pairs)


class CacheKind(JobKind[CacheParams, BaseModel]):
    name = "cache"
    params = CacheParams

    def runner(
        self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]
    ) -> ShardRunner:
        return CacheRunner(spec, model, saes)

    def reads_metric(self, params: CacheParams) -> bool:
        return params.gradients

    def check_prompts(self, params: CacheParams, records: list[PromptRecord]) -> None:
        if not params.paired:
            return
        missing = [i for i, r in enumerate(records) if r.corrupted is None]
        if missing:
            raise KindCheckError(
                f"paired caches need a corrupted prompt for every prompt; {len(missing)} of "
                f"{len(records)} have none (first: prompt {missing[0]})"
            )

    def store_layout(self, spec: JobSpec, info: WorkerInfo) -> StoreLayout:
        """Per-site sparse activations (and gradients) as the params ask."""
        assert isinstance(spec.job, CacheParams)
        params = spec.job
        return StoreLayout(
            sites=[
                SiteLayout(
                    label=label,
                    hook_name=info.sae_hooks[label],
                    d_sae=info.sae_widths[label],
                    sae_fingerprint=info.sae_fingerprints[label],
                )
                for label in info.sae_hooks
            ],
            value_dtype=params.value_dtype,
            gradients=params.gradients,
            top_k_per_token=params.top_k,
            examples_per_feature=params.examples_per_feature,
            pairing=PairingLayout(align=params.align) if params.paired else None,
            shard_size=spec.shard_size,
            model_fingerprint=info.model_fingerprint,
            job_hash=spec.content_hash(),
            job_spec=spec.model_dump(mode="json"),
        )
