"""The worker-side base of every job kind's shard computation, and the tokenization they share.

A kind's runner implements ``compute`` (one shard's prompts → token lists,
site caches and a typed partial); :meth:`ShardRunner.run_shard` owns what
every kind does around it: the retry short-cut for a shard already
committed, writing the shard's prompts and data, writing the partial under
the shard's prefix and returning the manifest entry the driver commits.

torch and the store are imported when a worker runs, not when a kind module
is imported (the kinds' registry is read by torch-free store commands too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.job_kind import ComputedShard
from circuitscan.services.jobs.planning import PromptSlice, ShardPlan

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from circuitscan.pipelines.batching import TokenBatch
    from circuitscan.schemas.store import ShardEntry
    from circuitscan.services.jobs.prompt_sources import PromptSet
    from circuitscan.services.store import FeatureStore


@dataclass
class ShardResult:
    """A written shard: its manifest entry (JSON form), the real tokens it holds, and how many
    of its prompts were cut to the token cap."""

    entry: dict[str, Any]
    tokens: int
    truncated: int = 0
    # The entry's index summaries (ShardEntry.index_summaries): not part of its JSON form.
    index_summaries: dict[str, bytes] | None = None


class ShardRunner:
    """One job's shard computation in a worker: the model, the store handle, the token cap."""

    _store: FeatureStore | None = None
    _prompts: PromptSet | None = None

    def __init__(self, spec: JobSpec, model: HookedSAETransformer) -> None:
        self.spec = spec
        self.model = model
        self.cap = token_cap(spec, model)

    def compute(
        self, plan: ShardPlan, records: list[PromptRecord], context: list[PromptRecord] | None
    ) -> ComputedShard:
        """The kind's work on one shard (``context``: the job's reference prompts, if any)."""
        raise NotImplementedError

    def records_of(self, prompts: list[PromptRecord] | PromptSlice) -> list[PromptRecord]:
        """The records of a shard sent as its source ranges, built here from the job's spec."""
        from circuitscan.services.jobs.prompt_sources import open_prompts, slice_records
        from circuitscan.services.model_loading import load_tokenizer

        if not isinstance(prompts, PromptSlice):
            return list(prompts)
        if self._prompts is None:  # kept: a generator keeps its place between shards
            spec = self.spec
            self._prompts = open_prompts(spec.prompts, lambda: load_tokenizer(spec.model))
        return slice_records(self._prompts, prompts)

    def run_shard(
        self,
        store_url: str,
        plan: ShardPlan,
        prompts: list[PromptRecord] | PromptSlice,
        context: list[PromptRecord] | None = None,
    ) -> ShardResult:
        from circuitscan.services.store.results import write_shard_outputs

        store = self._open(store_url)
        committed = already_committed(store, plan.shard_id)
        if committed is not None:  # a retry of a shard that made it: nothing to redo
            return ShardResult(committed.model_dump(mode="json"), committed.n_tokens)
        records = self.records_of(prompts)
        computed = self.compute(plan, records, context)
        entry = store.write_shard(
            plan.shard_id, records, computed.token_lists, computed.site_caches, computed.pairs
        )
        if computed.partial is not None:
            arrays, documents = computed.partial.to_outputs()
            entry = write_shard_outputs(store, entry, arrays=arrays, documents=documents)
        return ShardResult(
            entry=entry.model_dump(mode="json"),
            tokens=sum(len(tokens) for tokens in computed.token_lists),
            truncated=self._truncated(records, computed.token_lists),
            index_summaries=entry.index_summaries,
        )

    def _truncated(self, records: list[PromptRecord], token_lists: list[list[int]]) -> int:
        """Prompts cut to the cap: only one that fills the cap exactly can have been cut."""
        if self.spec.overlong == "reject":  # the driver dropped every over-long prompt
            return 0
        full = [r for r, ids in zip(records, token_lists, strict=True) if len(ids) == self.cap]
        return sum(
            1
            for r in full
            if self.model.to_tokens(r.text, prepend_bos=True, truncate=False).shape[1] > self.cap
        )

    def _open(self, url: str) -> FeatureStore:
        from circuitscan.services.store import FeatureStore

        if self._store is None or self._store.url != url:
            self._store = FeatureStore.open(url)
        # The driver commits between our calls; nothing here reads a cached
        # manifest (see already_committed), so there is nothing to refresh.
        return self._store


def already_committed(store: FeatureStore, shard_id: int) -> ShardEntry | None:
    """The committed entry of the shard a worker is about to run, None when it is not committed.

    One read of the shard's own manifest entry as stored now (the driver may
    have committed it since this worker last looked), never a listing of the
    manifest: a shard's bookkeeping costs the same in a store of ten shards
    and in one of a hundred thousand.
    """
    return store.committed_entry(shard_id)


def token_cap(spec: JobSpec, model: HookedSAETransformer) -> int:
    cap = int(model.cfg.n_ctx)
    return min(cap, spec.max_prompt_tokens) if spec.max_prompt_tokens else cap


def capped_length(model: HookedSAETransformer, text: str, cap: int) -> int:
    """Tokens (BOS included) ``text`` takes in a batch once cut to ``cap``."""
    return min(int(model.to_tokens(text, prepend_bos=True, truncate=False).shape[1]), cap)


def budget_batches(
    lengths: Sequence[int], batch_size: int, batch_tokens: int | None
) -> list[range]:
    """Consecutive batches of at most ``batch_size`` prompts whose padded size (prompts x
    longest) stays within ``batch_tokens`` (None: no token budget).

    ``lengths`` are the prompts' lengths after the cap, so a batch's memory is bounded
    by the budget (and by the cap), never by the raw text. A prompt longer than the
    budget runs alone: a batch of one is as small as it can be.
    """
    batches: list[range] = []
    start, longest = 0, 0
    for i, length in enumerate(lengths):
        wider = max(longest, length)
        full = i - start >= batch_size or (
            batch_tokens is not None and (i - start + 1) * wider > batch_tokens
        )
        if full and i > start:
            batches.append(range(start, i))
            start, wider = i, length
        longest = wider
    if start < len(lengths):
        batches.append(range(start, len(lengths)))
    return batches


def record_batches(
    model: HookedSAETransformer, records: Sequence[PromptRecord], cap: int, spec: JobSpec
) -> list[list[PromptRecord]]:
    """A shard's records in forward-pass batches: ``execution.batch_size`` prompts at most,
    and within ``execution.batch_tokens`` padded tokens when set (paired corrupted texts
    count with their clean prompts)."""
    execution = spec.execution
    if execution.batch_tokens is None:
        lengths = [0] * len(records)  # by count only: no need to tokenize twice
    else:
        lengths = [
            max(
                capped_length(model, r.text, cap),
                capped_length(model, r.corrupted, cap) if r.corrupted is not None else 0,
            )
            for r in records
        ]
    return [
        [records[i] for i in part]
        for part in budget_batches(lengths, execution.batch_size, execution.batch_tokens)
    ]


def tokenize_capped(
    model: HookedSAETransformer, records: Sequence[PromptRecord], cap: int
) -> TokenBatch:
    """BOS-prepended token ids, left-truncated to ``cap`` (BOS kept), right-padded.

    Over-long prompts were already removed on the driver when the spec says
    'reject'; anything still over the cap here is truncated, keeping the end
    of the prompt because the metric reads its last position.
    """
    return tokenize_capped_counting(model, records, cap)[0]


def tokenize_capped_counting(
    model: HookedSAETransformer, records: Sequence[PromptRecord], cap: int
) -> tuple[TokenBatch, list[int]]:
    """:func:`tokenize_capped`, returning how many tokens were cut from each prompt."""
    import torch

    from circuitscan.pipelines.batching import TokenBatch, pad_right, single_token

    sequences: list[list[int]] = []
    removed: list[int] = []
    for record in records:
        # truncate=False: TransformerLens would otherwise keep the first n_ctx
        # tokens, and the cut below must keep the prompt's end instead.
        ids = model.to_tokens(record.text, prepend_bos=True, truncate=False)[0].tolist()
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
