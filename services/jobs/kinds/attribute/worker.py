"""The ``attribute`` kind's worker side: per-shard AtP / AtP* node sums and exact verification.

A shard stores, per node it scored, the sum of the per-prompt scores, the sum
of their absolute values and the number of prompts where the node exists
(float64), so the driver's means over the whole prompt set are exact whatever
the sharding. Node names are their string form (``feature:L0.resid_post:7@3``),
the same in every shard. It also keeps every node's per-prompt signed
estimate (``per_prompt``, [prompt, node] float32, NaN where the node does not
exist; zstd-compressed, so the zeros of inactive features cost little), and
the signed sums are summed from exactly those float32 values: a breakdown of
the per-prompt values by any prompt field adds up to the stored aggregates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from circuitscan.schemas.attribution import AttributionMethod, NodeSelection
from circuitscan.schemas.jobs import AttributeParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.job_kind import ComputedShard, ShardPartial
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.jobs.shard_runner import (
    ShardRunner,
    named_positions,
    tokenize_capped,
    tokenize_capped_counting,
)

if TYPE_CHECKING:
    import torch
    from sae_lens import HookedSAETransformer

    from circuitscan.services.sae_loading import LoadedSAE


# --- node kinds: the job's node selection for the engine --------------------------------


def node_selection(params: AttributeParams) -> NodeSelection:
    """The pipeline's node selection for a job's AttributeParams."""
    positions = params.positions if isinstance(params.positions, str) else list(params.positions)
    return NodeSelection(kinds=params.node_kinds, positions=positions)


def attribution_method(params: AttributeParams) -> AttributionMethod:
    return AttributionMethod.parse(params.method)


# --- worker → driver -------------------------------------------------------------------


class NodeSumsPartial(ShardPartial):
    """Per-node sums over one shard's prompts (also the shape of a verification pass)."""

    nodes: list[str] = Field(description="Node names, in the order of the arrays.")
    node_sum: np.ndarray = Field(description="[node] sum of per-prompt signed values (float64).")
    node_sum_abs: np.ndarray = Field(description="[node] sum of per-prompt ranking scores.")
    node_count: np.ndarray = Field(description="[node] prompts where the node exists (int64).")
    per_prompt: np.ndarray | None = Field(
        default=None,
        description="[prompt, node] signed per-prompt values (float32, NaN: node absent); "
        "node_sum is their float64 sum. None in stores written before it was kept.",
    )


class CertifySumsPartial(ShardPartial):
    """One shard's random-subset patching sums (every shard patches the same subsets)."""

    nodes: list[str] = Field(description="Unverified node names, in the order of the arrays.")
    estimate_sum: np.ndarray = Field(description="[node] sum over prompts of the estimate.")
    estimate_abs_sum: np.ndarray = Field(description="[node] sum over prompts of |estimate|.")
    upper_sum: np.ndarray = Field(description="[node] sum over prompts of the upper bound.")
    defined: np.ndarray = Field(description="[node] prompts where the node exists.")
    included: np.ndarray = Field(description="[node] subsets that patch the node.")
    rows: int = Field(ge=0, description="(subset, prompt) suffix passes run.")


class NodeSums:
    """Per-node per-prompt values of a shard's ``n_prompts`` prompts (NaN = node absent there)."""

    def __init__(self, n_prompts: int) -> None:
        self.n_prompts = n_prompts
        self.index: dict[str, int] = {}
        self.total_abs: list[float] = []
        self.blocks: list[tuple[int, list[int], np.ndarray]] = []  # (first row, slots, values)

    def add(
        self,
        names: Sequence[str],
        per_prompt: torch.Tensor,
        ranking: torch.Tensor | None = None,
        *,
        start: int = 0,
    ) -> None:
        """Add per-prompt signed values of prompts ``start…``; ``ranking`` (default: the
        values) feeds the |·| sums.

        AtP*'s GradDrop ranking scores are unsigned, so its signed estimates
        and its ranking scores are summed separately.
        """
        values = per_prompt.detach().double().cpu()
        rank = values if ranking is None else ranking.detach().double().cpu()
        sums_abs = rank.abs().nan_to_num(0.0).sum(0).tolist()
        slots = []
        for column, name in enumerate(names):
            slot = self.index.setdefault(name, len(self.index))
            if slot == len(self.total_abs):
                self.total_abs.append(0.0)
            self.total_abs[slot] += sums_abs[column]
            slots.append(slot)
        if values.shape[0]:
            self.blocks.append((start, slots, values.numpy().astype(np.float32)))

    def partial(self) -> NodeSumsPartial:
        per_prompt = np.full((self.n_prompts, len(self.index)), np.nan, dtype=np.float32)
        for start, slots, values in self.blocks:
            per_prompt[start : start + values.shape[0], slots] = values
        wide = per_prompt.astype(np.float64)
        return NodeSumsPartial(
            nodes=list(self.index),
            node_sum=np.nansum(wide, axis=0),
            node_sum_abs=np.asarray(self.total_abs, dtype=np.float64),
            node_count=(~np.isnan(per_prompt)).sum(axis=0).astype(np.int64),
            per_prompt=per_prompt,
        )


Means = dict[str, tuple[float, float, int]]  # node → (mean, mean |·|, prompts)


def merge_node_sums(partials: Iterable[NodeSumsPartial]) -> Means:
    """Node → (mean, mean |score|, prompts) over the partials."""
    total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for part in partials:
        for i, name in enumerate(part.nodes):
            slot = total[name]
            slot[0] += float(part.node_sum[i])
            slot[1] += float(part.node_sum_abs[i])
            slot[2] += float(part.node_count[i])
    return {
        name: (s / n, a / n, int(n)) if n else (math.nan, math.nan, 0)
        for name, (s, a, n) in total.items()
    }


# --- worker side -----------------------------------------------------------------------


class AttributeRunner(ShardRunner):
    """AtP or AtP* scores of every selected node, summed over a shard's prompt pairs."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, AttributeParams)
        super().__init__(spec, model)
        self.params = spec.job
        self.saes = [loaded.sae for loaded in saes]
        self.selection = node_selection(self.params)
        self.method = attribution_method(self.params)

    def _pairs(self, records: list[PromptRecord]):
        from circuitscan.pipelines.attribution.positions import end_aligned_map

        clean, removed = tokenize_capped_counting(self.model, records, self.cap)
        missing = [i for i, r in enumerate(records) if r.corrupted is None]
        if missing:
            raise ValueError(f"attribute jobs need a corrupted prompt for every prompt: {missing}")
        corrupted = [r.model_copy(update={"text": r.corrupted}) for r in records]
        corrupt = tokenize_capped(self.model, corrupted, self.cap)
        named = named_positions(records, removed)
        pairing: dict[str, Any] = {"corrupt_lengths": corrupt.lengths}
        if self.params.align == "end":
            pairing["position_map"] = end_aligned_map(
                clean.lengths, corrupt.lengths, clean.tokens.shape[1]
            )
        return clean, corrupt, named, pairing

    def compute(
        self, plan: ShardPlan, records: list[PromptRecord], context: list[PromptRecord] | None
    ) -> ComputedShard:
        from circuitscan.pipelines.attribution import run_atp

        sums = NodeSums(len(records))
        token_lists: list[list[int]] = []
        batch_size = self.spec.execution.batch_size
        for start in range(0, len(records), batch_size):
            clean, corrupt, named, pairing = self._pairs(records[start : start + batch_size])
            result = run_atp(
                self.model,
                self.saes,
                clean.tokens,
                corrupt.tokens,
                clean.lengths,
                self.spec.metric,
                clean.answer,
                clean.wrong,
                self.selection,
                method=self.method,
                named_positions=named,
                **pairing,
            )
            sums.add(
                [str(node) for node in result.nodes()],
                result.per_prompt_signed(),
                ranking=result.per_prompt(),
                start=start,
            )
            token_lists += clean.token_lists()
        return ComputedShard(token_lists, partial=sums.partial())

    def verify_nodes(self, records: list[PromptRecord], nodes: list[str]) -> NodeSumsPartial:
        """Exact Δm of patching each node clean → corrupted: per-node sum, |sum| and count."""
        import torch

        from circuitscan.pipelines.attribution import exact_patch
        from circuitscan.schemas.attribution import Node

        parsed = [Node.parse(name) for name in nodes]
        sums = NodeSums(len(records))
        for name in nodes:
            sums.add([name], torch.empty(0, 1))
        batch_size = self.spec.execution.batch_size
        for start in range(0, len(records), batch_size):
            clean, corrupt, named, pairing = self._pairs(records[start : start + batch_size])
            longest = int(clean.lengths.max())
            # An absolute position past every prompt of the batch exists nowhere: skip it.
            keep = [
                i
                for i, node in enumerate(parsed)
                if not isinstance(node.position, int) or node.position < longest
            ]
            if not keep:
                continue
            delta = exact_patch(
                self.model,
                self.saes,
                clean.tokens,
                clean.lengths,
                self.spec.metric,
                clean.answer,
                clean.wrong,
                [parsed[i] for i in keep],
                mode="corrupt",
                corrupt_tokens=corrupt.tokens,
                named_positions=named,
                **pairing,
            )
            sums.add([nodes[i] for i in keep], delta, start=start)
        return sums.partial()

    def certify_nodes(
        self,
        records: list[PromptRecord],
        nodes: list[str],
        union_size: int,
        delta: float | None = None,
    ) -> CertifySumsPartial:
        """Random-subset patching of ``nodes`` on ``records``: the per-node certification sums
        (bounds at ``delta``, default 1 − the spec's confidence)."""
        import torch

        from circuitscan.pipelines.attribution.certify import subset_patch
        from circuitscan.pipelines.attribution.subset_stats import (
            CertificationSums,
            certification_sums,
            draw_subsets,
        )
        from circuitscan.schemas.attribution import Node

        certify = self.params.certify
        assert certify is not None
        parsed = [Node.parse(name) for name in nodes]
        subsets = draw_subsets(len(parsed), certify.samples, certify.p, certify.seed)
        parts = []
        batch_size = self.spec.execution.batch_size
        for start in range(0, len(records), batch_size):
            clean, corrupt, named, pairing = self._pairs(records[start : start + batch_size])
            delta_m, zero, undefined, rows = subset_patch(
                self.model,
                self.saes,
                clean.tokens,
                clean.lengths,
                self.spec.metric,
                clean.answer,
                clean.wrong,
                parsed,
                subsets,
                mode="corrupt",
                corrupt_tokens=corrupt.tokens,
                named_positions=named,
                batch_size=batch_size,
                allow_absent=True,
                **pairing,
            )
            parts.append(
                certification_sums(
                    delta_m,
                    subsets,
                    zero,
                    undefined,
                    1.0 - certify.confidence if delta is None else delta,
                    rows=rows,
                    union_size=union_size,
                )
            )
        if not parts:
            zeros = torch.zeros(len(parsed), dtype=torch.float64)
            parts.append(
                CertificationSums(zeros, zeros, zeros, zeros, subsets.sum(0).to(torch.float64), 0)
            )
        total = CertificationSums.merge(parts)
        return CertifySumsPartial(
            nodes=nodes,
            estimate_sum=total.estimate.numpy(),
            estimate_abs_sum=total.estimate_abs.numpy(),
            upper_sum=total.upper.numpy(),
            defined=total.defined.numpy(),
            included=total.included.numpy(),
            rows=total.rows,
        )
