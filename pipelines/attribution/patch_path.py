"""Why an estimate and exact patching disagree on a node: the patch taken in steps.

For each node, on each clean/corrupted prompt pair:

- the exact effect Δm of the full patch;
- the exact effect with every later block's attention pattern frozen at its
  clean value: what the node does without later heads attending differently;
- Δm/f for partial patches ``n(x) + f·(n(x') − n(x))``: as f → 0 this is the
  derivative AtP multiplies out, at f = 1 it is the exact effect. Where it
  changes sign between a small f and 1, no first-order estimate at the clean
  point (AtP, AtP*'s QK fix and GradDrop included) can rank the node by its
  full effect;
- the AtP / AtP* estimates themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer

from circuitscan.pipelines.attribution.atp import SaeMap, run_atp
from circuitscan.pipelines.attribution.errors import AttributionInputError, NodeSelectionError
from circuitscan.pipelines.attribution.inputs import Answers
from circuitscan.pipelines.attribution.patching import exact_patch
from circuitscan.pipelines.attribution.positions import resolve_positions
from circuitscan.schemas.attribution import (
    AttributionMethod,
    Node,
    NodeKind,
    NodeSelection,
    PositionSpec,
)
from circuitscan.schemas.hooks import HookPoint, HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.node_kinds import NODE_KINDS

DEFAULT_FRACTIONS = (0.05, 0.25, 0.5, 0.75)
DEFAULT_METHODS = {
    "atp": AttributionMethod(),
    "atpstar": AttributionMethod(qk_fix=True, graddrop=True),
}


@dataclass
class PatchPath:
    """Per node and prompt pair, in metric units."""

    nodes: list[Node]
    exact: Float[torch.Tensor, "batch n_nodes"]
    frozen: Float[torch.Tensor, "batch n_nodes"]  # later attention patterns frozen
    fractions: list[float]
    partial: Float[torch.Tensor, "n_fractions batch n_nodes"]  # Δm/f
    estimates: dict[str, Float[torch.Tensor, "batch n_nodes"]]  # signed, per method
    scores: dict[str, Float[torch.Tensor, "batch n_nodes"]]  # ranking score, per method

    def sign_changes(self) -> Int[torch.Tensor, " n_nodes"]:
        """Prompts where Δm/f at the smallest fraction and the full Δm differ in sign."""
        small = self.partial[0]
        flipped = (torch.sign(small) * torch.sign(self.exact)) < 0
        return flipped.sum(0)


def _selections(nodes: Sequence[Node]) -> list[NodeSelection]:
    """The fewest node selections that score ``nodes``: one per kind, layer, site, position."""
    units: dict[tuple[NodeKind, int, HookPoint | None, PositionSpec], list[int]] = {}
    for node in nodes:
        key = (node.kind, node.layer, node.point, node.position)
        units.setdefault(key, [])
        if node.index is not None:
            units[key].append(node.index)
    out = []
    for (kind, layer, point, position), indices in units.items():
        site = None if point is None else HookSite(layer=layer, point=point)
        # Units the selection cannot narrow (neurons) are all scored and picked by name.
        narrow = NODE_KINDS[kind].restricted_by
        out.append(
            NodeSelection(
                kinds=[kind],
                layers=[layer],
                positions=[position],
                sae_sites=None if site is None else [site.label],
                **({narrow: indices} if narrow else {}),
            )
        )
    return out


def patch_path(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    clean_tokens: Int[torch.Tensor, "batch seq"],
    corrupt_tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    nodes: Sequence[Node],
    *,
    named_positions: Sequence[Mapping[str, int]] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    methods: Mapping[str, AttributionMethod] | None = None,
    batch_size: int = 64,
) -> PatchPath:
    """Exact, frozen-pattern and partial patches of ``nodes`` beside their estimates."""
    if not nodes:
        raise NodeSelectionError("no nodes to explain: the node list is empty")
    steps = sorted(set(fractions))
    if not steps or steps[0] <= 0.0 or steps[-1] > 1.0:
        raise AttributionInputError(f"fractions must lie in (0, 1], got {list(fractions)}")
    # The estimates need every node in every prompt; say so before any patching.
    resolve_positions([node.position for node in nodes], lengths, named_positions)
    methods = dict(methods or DEFAULT_METHODS)

    def patch(**options: object) -> torch.Tensor:
        return exact_patch(
            model, saes, clean_tokens, lengths, metric, answer, wrong, list(nodes),
            corrupt_tokens=corrupt_tokens, named_positions=named_positions,
            batch_size=batch_size, **options,
        )  # fmt: skip

    exact = patch()
    frozen = patch(freeze_later_patterns=True)
    partial = torch.stack([exact if f == 1.0 else patch(fraction=f) / f for f in steps])
    names = [str(node) for node in nodes]
    estimates: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}
    for name, method in methods.items():
        signed_cols: dict[str, torch.Tensor] = {}
        score_cols: dict[str, torch.Tensor] = {}
        for selection in _selections(nodes):
            result = run_atp(
                model, saes, clean_tokens, corrupt_tokens, lengths, metric, answer, wrong,
                selection, method=method, named_positions=named_positions,
            )  # fmt: skip
            scored = [str(n) for n in result.nodes()]
            signed, ranking = result.per_prompt_signed(), result.per_prompt()
            for column, node in enumerate(scored):
                signed_cols[node], score_cols[node] = signed[:, column], ranking[:, column]
        estimates[name] = torch.stack([signed_cols[n] for n in names], 1).to(exact.dtype)
        scores[name] = torch.stack([score_cols[n] for n in names], 1).to(exact.dtype)
    return PatchPath(
        nodes=list(nodes),
        exact=exact,
        frozen=frozen,
        fractions=steps,
        partial=partial,
        estimates=estimates,
        scores=scores,
    )
