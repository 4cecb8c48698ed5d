"""Ablation-scan jobs in a worker: exact Δm of ablating every active SAE feature, per shard.

Mean and resample ablation values come from the job's reference prompts (its
first ``reference_prompts`` prompts, sent by the driver as context), so every
shard ablates to the same values and the result does not depend on how the
job was cut into shards. The shard stores the features it scanned, the
per-prompt Δm matrix and the clean baseline.
"""

from __future__ import annotations

import numpy as np
from sae_lens import HookedSAETransformer

from circuitscan.pipelines.attribution import ablation_scan
from circuitscan.pipelines.attribution.ablation_scan import reference_slots
from circuitscan.schemas.jobs import AblationScanParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.kinds import (
    ShardResult,
    StoreWriter,
    named_positions,
    tokenize_capped_counting,
)
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.sae_loading import LoadedSAE
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.results import write_shard_outputs


def scanned_site(spec: JobSpec, labels: list[str]) -> str:
    """The SAE site label an ablation scan runs on (default: the job's first SAE)."""
    assert isinstance(spec.job, AblationScanParams)
    site = spec.job.site or labels[0]
    if site not in labels:
        raise ValueError(f"ablation site {site!r} is not one of the job's SAEs {labels}")
    return site


class AblationRunner(StoreWriter):
    """One shard's feature-ablation scan at one SAE site."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, AblationScanParams)
        super().__init__(spec, model)
        self.params = spec.job
        label = scanned_site(spec, [loaded.site.label for loaded in saes])
        self.loaded = next(loaded for loaded in saes if loaded.site.label == label)

    def compute_shard(
        self,
        store: FeatureStore,
        plan: ShardPlan,
        records: list[PromptRecord],
        context: list[PromptRecord] | None,
    ) -> ShardResult:
        batch, removed = tokenize_capped_counting(self.model, records, self.cap)
        truncated = sum(1 for n in removed if n)
        positions = self.params.positions
        named = named_positions(records, removed)
        reference = None
        if self.params.mode != "zero":
            if not context:
                raise ValueError(f"{self.params.mode} ablation shards need the reference prompts")
            ref_batch, ref_removed = tokenize_capped_counting(self.model, context, self.cap)
            reference = reference_slots(
                self.model,
                self.loaded.sae,
                self.loaded.site,
                ref_batch.tokens,
                ref_batch.lengths,
                positions if isinstance(positions, str) else list(positions),
                named_positions(context, ref_removed),
            )
        scan = ablation_scan(
            self.model,
            self.loaded.sae,
            self.loaded.site,
            batch.tokens,
            batch.lengths,
            self.spec.metric,
            batch.answer,
            batch.wrong,
            mode=self.params.mode,
            positions=positions if isinstance(positions, str) else list(positions),
            named_positions=named,
            batch_size=self.params.batch_size,
            seed=plan.shard_id,
            reference=reference,
        )
        token_lists = batch.token_lists()
        entry = store.write_shard(plan.shard_id, records, token_lists, {})
        entry = write_shard_outputs(
            store,
            entry,
            arrays={
                "features": scan.features.cpu().numpy().astype(np.int64),
                "delta": scan.delta.detach().cpu().double().numpy(),
                "baseline": scan.baseline.detach().cpu().double().numpy(),
            },
            documents={"scan": {"site": self.loaded.site.label, "n_ablations": scan.n_ablations}},
        )
        return ShardResult(
            entry=entry.model_dump(mode="json"),
            tokens=sum(len(t) for t in token_lists),
            prompts=len(records),
            truncated=truncated,
            rejected=0,
        )
