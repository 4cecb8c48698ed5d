"""Splice-eval jobs in a worker: metric and KL with SAE reconstructions spliced in, per shard.

Every shard evaluates against the same reference prompts (the job's first
``reference_prompts`` prompts, sent by the driver as context), so the
mean-ablation and mean-error baselines are the same in every shard and the
driver can pool the shards' rows exactly (weighted means; pooled variance).
"""

from __future__ import annotations

from sae_lens import HookedSAETransformer

from circuitscan.pipelines.analyses.splice_eval import splice_eval
from circuitscan.schemas.jobs import JobSpec, SpliceEvalParams
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.kinds import ShardResult, StoreWriter, tokenize_capped
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.sae_loading import LoadedSAE
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.results import write_shard_outputs


def site_sets(spec: JobSpec, labels: list[str]) -> list[list[str]]:
    """Each SAE alone, then the spec's extra sets (duplicates dropped)."""
    assert isinstance(spec.job, SpliceEvalParams)
    sets: list[list[str]] = [[label] for label in labels]
    for group in spec.job.layer_sets:
        unknown = [label for label in group if label not in labels]
        if unknown:
            raise ValueError(f"splice set {group} names sites without an SAE: {unknown}")
        if group not in sets:
            sets.append(list(group))
    return sets


class SpliceEvalRunner(StoreWriter):
    """One shard's splice evaluation rows."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, SpliceEvalParams)
        super().__init__(spec, model)
        self.saes = [loaded.sae for loaded in saes]
        self.sets = site_sets(spec, [loaded.site.label for loaded in saes])

    def compute_shard(
        self,
        store: FeatureStore,
        plan: ShardPlan,
        records: list[PromptRecord],
        context: list[PromptRecord] | None,
    ) -> ShardResult:
        if not context:
            raise ValueError("splice_eval shards need the job's reference prompts as context")
        batch, truncated = tokenize_capped(self.model, records, self.cap)
        reference, _ = tokenize_capped(self.model, context, self.cap)
        rows = splice_eval(
            self.model,
            self.saes,
            batch.tokens,
            batch.lengths,
            self.spec.metric,
            batch.answer,
            batch.wrong,
            layer_sets=self.sets,
            reference_tokens=reference.tokens,
            reference_lengths=reference.lengths,
            batch_size=self.spec.execution.batch_size,
        )
        token_lists = batch.token_lists()
        entry = store.write_shard(plan.shard_id, records, token_lists, {})
        entry = write_shard_outputs(
            store, entry, documents={"rows": [row.model_dump(mode="json") for row in rows]}
        )
        return ShardResult(
            entry=entry.model_dump(mode="json"),
            tokens=sum(len(t) for t in token_lists),
            prompts=len(records),
            truncated=truncated,
            rejected=0,
        )
