"""Estimated rankings against exhaustive exact patching: recall@K and cost of verified recall.

Every node of a node set is patched exactly (the ground truth); each
estimator's ranking (mean |score| over prompts) is then scored against the
true ranking (mean |Δm|). Used by the default-model tests and the attribution
benchmark on IOI; production code never imports it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from sae_lens import HookedSAETransformer

from circuitscan.pipelines.attribution.atp import SaeMap, run_atp
from circuitscan.pipelines.attribution.patching import exact_patch
from circuitscan.pipelines.attribution.verification import recall_at_k, verify
from circuitscan.pipelines.prompt_pairs import PromptPairs
from circuitscan.schemas.attribution import (
    AttributionMethod,
    Node,
    NodeSelection,
    VerificationReport,
)
from circuitscan.schemas.metrics import MetricSpec

METHODS: dict[str, AttributionMethod] = {
    "atp": AttributionMethod(),
    "atpstar": AttributionMethod(qk_fix=True, graddrop=True),
}


@dataclass
class RankingComparison:
    """How well each estimator ranks one node set, by exhaustive exact patching."""

    nodes: list[Node]
    truth: Float[torch.Tensor, " n_nodes"]  # mean |Δm| over prompts, metric units
    estimates: dict[str, Float[torch.Tensor, " n_nodes"]]  # mean |score| per method
    reports: dict[str, dict[int, VerificationReport]]  # method → K → report
    seconds: dict[str, float] = field(default_factory=dict)  # method / "patching" → wall s
    # Per-prompt values (NaN = node absent), kept so subsets can be rescored.
    truth_per_prompt: Float[torch.Tensor, "batch n_nodes"] | None = None
    estimates_per_prompt: dict[str, Float[torch.Tensor, "batch n_nodes"]] | None = None

    def recall(self, method: str, k: int) -> float:
        return self.reports[method][k].recall_at_k

    def cost(self, method: str, k: int) -> int | None:
        return self.reports[method][k].cost_of_verified_recall

    def misses(self, method: str, k: int) -> list[int]:
        """Indices of the true top-K nodes outside ``method``'s top-K, in true order."""
        truth_order = self.truth.argsort(descending=True, stable=True)[:k].tolist()
        estimated = set(self.estimates[method].argsort(descending=True, stable=True)[:k].tolist())
        return [index for index in truth_order if index not in estimated]

    def subset_recalls(self, method: str, k: int, n_subsets: int) -> list[float]:
        """Recall@K of ``method`` on each of ``n_subsets`` disjoint, equal, consecutive prompt
        subsets: how much the figure moves with the prompts drawn."""
        if self.truth_per_prompt is None or self.estimates_per_prompt is None:
            raise ValueError("this comparison kept no per-prompt values")
        n_prompts = self.truth_per_prompt.shape[0]
        if not 1 <= n_subsets <= n_prompts:
            raise ValueError(f"cannot cut {n_prompts} prompts into {n_subsets} subsets")
        size = n_prompts // n_subsets
        out = []
        for index in range(n_subsets):
            rows = slice(index * size, (index + 1) * size)
            truth = self.truth_per_prompt[rows].abs().nanmean(0).nan_to_num(0.0)
            estimate = self.estimates_per_prompt[method][rows].abs().nanmean(0).nan_to_num(0.0)
            out.append(recall_at_k(estimate, truth, k))
        return out


def ioi_pairs(
    model: HookedSAETransformer, n_prompts: int, *, seed: int = 0, template: str | None = None
) -> PromptPairs:
    """IOI clean prompts and their ABC-corrupted counterparts (token-aligned); see
    :meth:`PromptPairs.from_ioi`."""
    return PromptPairs.from_ioi(model, n_prompts, seed=seed, template=template)


def patch_pairs(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    pairs: PromptPairs,
    nodes: Sequence[Node],
    *,
    metric: MetricSpec | None = None,
    batch_size: int = 64,
    freeze_later_patterns: bool = False,
) -> Float[torch.Tensor, "batch n_nodes"]:
    """Exact Δm of patching each node's corrupted value into its clean prompt.

    ``freeze_later_patterns``: with every later attention pattern frozen at its
    clean value; next to the plain Δm it tells how much of a node's effect
    later heads carry by attending differently, which a first-order estimate
    at the clean point misses when those softmaxes saturate.
    """
    return exact_patch(
        model,
        saes,
        pairs.clean,
        pairs.lengths,
        metric or MetricSpec(),
        pairs.answer,
        pairs.wrong,
        list(nodes),
        corrupt_tokens=pairs.corrupt,
        named_positions=pairs.named_positions,
        batch_size=batch_size,
        freeze_later_patterns=freeze_later_patterns,
    )


def compare_rankings(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    pairs: PromptPairs,
    selections: Sequence[NodeSelection],
    *,
    metric: MetricSpec | None = None,
    methods: Mapping[str, AttributionMethod] | None = None,
    ks: Sequence[int] = (10, 20),
    batch_size: int = 64,
) -> RankingComparison:
    """Score every node of ``selections`` by each method and by exact patching.

    Nodes of all selections form one node set, ranked together.
    """
    metric = metric or MetricSpec()
    methods = dict(methods or METHODS)
    args = (pairs.clean, pairs.corrupt, pairs.lengths, metric, pairs.answer, pairs.wrong)
    estimates: dict[str, torch.Tensor] = {}
    per_prompt: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    nodes: list[Node] = []
    for name, method in methods.items():
        start = time.perf_counter()
        parts, nodes = [], []
        for selection in selections:
            result = run_atp(
                model,
                saes,
                *args,
                selection,
                method=method,
                named_positions=pairs.named_positions,
            )
            parts.append(result.per_prompt())
            nodes += result.nodes()
        seconds[name] = time.perf_counter() - start
        per_prompt[name] = torch.cat(parts, dim=1)
        estimates[name] = per_prompt[name].abs().nanmean(0).nan_to_num(0.0)
    start = time.perf_counter()
    exact = patch_pairs(model, saes, pairs, nodes, metric=metric, batch_size=batch_size)
    seconds["patching"] = time.perf_counter() - start
    truth = exact.abs().nanmean(0).nan_to_num(0.0)
    reports = {
        name: {k: verify(estimate, truth, k) for k in ks} for name, estimate in estimates.items()
    }
    return RankingComparison(nodes, truth, estimates, reports, seconds, exact, per_prompt)


def ioi_head_selections(layers: Sequence[int] | None = None) -> list[NodeSelection]:
    """Attention-head nodes where IOI happens: queries/outputs at the end, keys/values at names.

    The name-mover and S-inhibition heads read at the last token (``END``) and
    attend to the names, so z and q are taken at ``END`` and k and v at the
    first two names (``IO``, ``S1``): the nodes whose effects the QK fix and
    GradDrop are meant to get right. ``layers``: only these layers (default all).
    """
    chosen = None if layers is None else list(layers)
    return [
        NodeSelection(kinds=["z", "q"], layers=chosen, positions=["END"]),
        NodeSelection(kinds=["k", "v"], layers=chosen, positions=["IO", "S1"]),
    ]


def ioi_feature_selections(sae_sites: Sequence[str]) -> list[NodeSelection]:
    """Every feature of the given SAEs at the IOI name positions and the end."""
    return [
        NodeSelection(
            kinds=["feature"],
            sae_sites=list(sae_sites),
            positions=["IO", "S1", "S2", "END"],
        )
    ]
