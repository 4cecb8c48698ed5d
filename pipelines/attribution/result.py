"""Attribution results: per-prompt scores for every node, and their aggregates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from circuitscan.pipelines.attribution.nodes import NodeGroup
from circuitscan.schemas.attribution import AttributionSummary, Node, NodeScore


@dataclass
class AttributionResult:
    """Scores in metric units (e.g. logits of logit difference), per prompt and node.

    ``scores[i]`` belongs to ``groups[i]`` and has shape
    ``[batch, n_positions, n_units]``; NaN marks a node undefined for a prompt
    (a position past the prompt's end under the 'all' selection).

    ``scores`` rank nodes. For AtP they are the signed estimates themselves;
    AtP*'s GradDrop scores are unsigned magnitudes, so AtP* also keeps the
    signed (QK-fixed) estimates in ``signed``: the sign a verification by
    exact patching is compared with.
    """

    method: str
    groups: list[NodeGroup]
    scores: list[torch.Tensor]
    signed: list[torch.Tensor] | None = None

    def nodes(self) -> list[Node]:
        """All nodes, in the column order of :meth:`per_prompt`."""
        return [node for group in self.groups for node in group.nodes()]

    def per_prompt(self) -> Float[torch.Tensor, "batch n_nodes"]:
        """Ranking scores per prompt (metric units)."""
        return torch.cat([score.flatten(1) for score in self.scores], dim=1)

    def per_prompt_signed(self) -> Float[torch.Tensor, "batch n_nodes"]:
        """Signed effect estimates per prompt (metric units)."""
        if self.signed is None:
            return self.per_prompt()
        return torch.cat([score.flatten(1) for score in self.signed], dim=1)

    def mean(self) -> Float[torch.Tensor, " n_nodes"]:
        """Mean signed estimate over the prompts where each node is defined."""
        return self.per_prompt_signed().nanmean(0)

    def mean_abs(self) -> Float[torch.Tensor, " n_nodes"]:
        """Mean absolute ranking score over the prompts where each node is defined."""
        return self.per_prompt().abs().nanmean(0)

    def top(self, k: int, *, by: str = "mean_abs") -> list[NodeScore]:
        """The ``k`` nodes with the largest mean absolute (or |mean| signed) score."""
        mean, mean_abs = self.mean(), self.mean_abs()
        key = (mean_abs if by == "mean_abs" else mean.abs()).nan_to_num(-1.0)
        order = torch.argsort(key, descending=True)[:k].tolist()
        nodes = self.nodes()
        return [
            NodeScore(node=str(nodes[i]), mean=float(mean[i]), mean_abs=float(mean_abs[i]))
            for i in order
        ]

    def summary(self, k: int = 50) -> AttributionSummary:
        return AttributionSummary(
            method=self.method,
            n_prompts=int(self.scores[0].shape[0]) if self.scores else 0,
            n_nodes=sum(group.size for group in self.groups),
            top=self.top(k),
        )
