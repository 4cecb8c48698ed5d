"""Per-job-kind shard computation, run inside a worker.

Each runner turns one shard's PromptRecords into stored data and returns the
store's manifest entry; the driver commits it. Runners share tokenization
(with the spec's token cap and truncation) and batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from sae_lens import HookedSAETransformer

from circuitscan.pipelines.batching import TokenBatch, pad_right, single_token
from circuitscan.pipelines.caching import cache_batch, merge_site_caches
from circuitscan.schemas.jobs import CacheParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.sae_loading import LoadedSAE
from circuitscan.services.store import FeatureStore


@dataclass
class ShardResult:
    entry: dict[str, Any]
    tokens: int
    prompts: int
    truncated: int
    rejected: int


class KindRunner(Protocol):
    def run_shard(
        self,
        store_url: str,
        plan: ShardPlan,
        records: list[PromptRecord],
        context: list[PromptRecord] | None = None,
    ) -> ShardResult: ...


class StoreWriter:
    """What every runner shares: the store handle and the retry short-cut.

    ``run_shard`` returns a committed shard's entry untouched (a retry of a
    shard that made it) and otherwise calls the kind's ``compute_shard``.
    """

    _store: FeatureStore | None = None

    def __init__(self, spec: JobSpec, model: HookedSAETransformer) -> None:
        self.spec = spec
        self.model = model
        self.cap = token_cap(spec, model)

    def run_shard(
        self,
        store_url: str,
        plan: ShardPlan,
        records: list[PromptRecord],
        context: list[PromptRecord] | None = None,
    ) -> ShardResult:
        store = self._open(store_url)
        done = self._already_committed(store, plan)
        if done is not None:
            return done
        return self.compute_shard(store, plan, records, context)

    def compute_shard(
        self,
        store: FeatureStore,
        plan: ShardPlan,
        records: list[PromptRecord],
        context: list[PromptRecord] | None,
    ) -> ShardResult:
        raise NotImplementedError

    def _open(self, url: str) -> FeatureStore:
        if self._store is None or self._store.url != url:
            self._store = FeatureStore.open(url)
        # The driver commits between our calls: always read the manifest afresh.
        self._store.refresh()
        return self._store

    @staticmethod
    def _already_committed(store: FeatureStore, plan: ShardPlan) -> ShardResult | None:
        """A retry of a shard that made it: nothing to redo (its committed entry)."""
        committed = store.committed_entries().get(plan.shard_id)
        if committed is None:
            return None
        entry = committed.model_dump(mode="json")
        return ShardResult(entry, committed.n_tokens, committed.n_prompts, 0, 0)


def token_cap(spec: JobSpec, model: HookedSAETransformer) -> int:
    cap = int(model.cfg.n_ctx)
    return min(cap, spec.max_prompt_tokens) if spec.max_prompt_tokens else cap


def tokenize_capped(
    model: HookedSAETransformer, records: Sequence[PromptRecord], cap: int
) -> tuple[TokenBatch, int]:
    """BOS-prepended token ids, left-truncated to ``cap`` (BOS kept), right-padded.

    Over-long prompts were already removed on the driver when the spec says
    'reject'; anything still over the cap here is truncated, keeping the end
    of the prompt because the metric reads its last position.
    """
    batch, removed = tokenize_capped_counting(model, records, cap)
    return batch, sum(1 for n in removed if n)


def tokenize_capped_counting(
    model: HookedSAETransformer, records: Sequence[PromptRecord], cap: int
) -> tuple[TokenBatch, list[int]]:
    """:func:`tokenize_capped`, returning how many tokens were cut from each prompt."""
    sequences: list[list[int]] = []
    removed: list[int] = []
    for record in records:
        ids = model.to_tokens(record.text, prepend_bos=True)[0].tolist()
        removed.append(max(0, len(ids) - cap))
        if len(ids) > cap:
            ids = ids[:1] + ids[len(ids) - (cap - 1) :]
        sequences.append(ids)
    pad_id = (model.tokenizer.pad_token_id if model.tokenizer is not None else None) or 0
    tokens, lengths = pad_right(sequences, pad_id=pad_id, device=model.cfg.device or "cpu")

    def answer_ids(texts: list[str | None]) -> torch.Tensor | None:
        if any(text is None for text in texts):
            return None
        return torch.tensor([single_token(model, t) for t in texts], device=tokens.device)  # type: ignore[arg-type]

    batch = TokenBatch(
        tokens=tokens,
        lengths=lengths,
        answer=answer_ids([r.answer for r in records]),
        wrong=answer_ids([r.wrong for r in records]),
    )
    return batch, removed


def named_positions(
    records: Sequence[PromptRecord], removed: Sequence[int]
) -> list[dict[str, int]] | None:
    """The prompts' named positions after left-truncation (a name whose token was cut is dropped)."""
    if not any(record.positions for record in records):
        return None
    return [
        {name: at - cut for name, at in record.positions.items() if at - cut >= 1 or at == 0}
        for record, cut in zip(records, removed, strict=True)
    ]


class CacheRunner(StoreWriter):
    """Cache job: sparse activations, gradients and error norms for every SAE site."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, CacheParams)
        super().__init__(spec, model)
        self.params = spec.job
        self.saes = [loaded.sae for loaded in saes]

    def compute_shard(
        self,
        store: FeatureStore,
        plan: ShardPlan,
        records: list[PromptRecord],
        context: list[PromptRecord] | None,
    ) -> ShardResult:
        batch_size = self.spec.execution.batch_size
        caches = []
        token_lists: list[list[int]] = []
        truncated = 0
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            batch, cut = tokenize_capped(self.model, chunk, self.cap)
            truncated += cut
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
        entry = store.write_shard(plan.shard_id, records, token_lists, merge_site_caches(caches))
        return ShardResult(
            entry=entry.model_dump(mode="json"),
            tokens=sum(len(t) for t in token_lists),
            prompts=len(records),
            truncated=truncated,
            rejected=0,
        )


def make_runner(spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]) -> KindRunner:
    # Imported here: those modules build on this one.
    from circuitscan.services.jobs.kind_ablation import AblationRunner
    from circuitscan.services.jobs.kind_attribute import AttributeRunner
    from circuitscan.services.jobs.kind_dfa import DFARunner
    from circuitscan.services.jobs.kind_splice import SpliceEvalRunner

    runners: dict[str, type] = {
        "cache": CacheRunner,
        "attribute": AttributeRunner,
        "ablation_scan": AblationRunner,
        "splice_eval": SpliceEvalRunner,
        "dfa": DFARunner,
    }
    runner: KindRunner = runners[spec.job.kind](spec, model, saes)
    return runner
