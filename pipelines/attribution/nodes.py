"""Node groups: the nodes of one kind at one hook, scored together as one tensor.

A group holds the units (features, heads, neurons) and position specs of one
(kind, layer, point); its scores are a dense ``[batch, n_positions, n_units]``
tensor, and its nodes are listed position-major.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution.errors import MissingSAEError, NodeSelectionError
from circuitscan.pipelines.attribution.positions import UNDEFINED
from circuitscan.schemas.attribution import KIND_POINT, Node, NodeKind, NodeSelection, PositionSpec
from circuitscan.schemas.hooks import HookPoint, HookSite

SAE_KINDS = ("feature", "sae_error")
HEAD_KINDS = ("z", "q", "k", "v")


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one kind at one hook: ``units × positions``."""

    kind: NodeKind
    layer: int
    point: HookPoint
    units: tuple[int, ...]  # (0,) for unindexed kinds
    positions: tuple[PositionSpec, ...]

    @property
    def site(self) -> HookSite:
        return HookSite(layer=self.layer, point=self.point)

    @property
    def hook_name(self) -> str:
        return self.site.hook_name

    @property
    def record_key(self) -> tuple[str, str]:
        """Which recorded tensor holds this group's activation."""
        what = {"feature": "feat", "sae_error": "err"}.get(self.kind, "act")
        return (what, self.hook_name)

    def node(self, position: int, unit: int) -> Node:
        """The node at (position slot, unit slot)."""
        unindexed = self.kind in ("sae_error", "mlp")
        return Node(
            kind=self.kind,
            layer=self.layer,
            point=self.point if self.kind in SAE_KINDS else None,
            index=None if unindexed else self.units[unit],
            position=self.positions[position],
        )

    def nodes(self) -> list[Node]:
        return [self.node(p, u) for p in range(len(self.positions)) for u in range(len(self.units))]

    @property
    def size(self) -> int:
        return len(self.positions) * len(self.units)


def unit_scores(kind: str, product: torch.Tensor) -> Float[torch.Tensor, "batch pos units"]:
    """Sum an elementwise (Δactivation · gradient) over everything inside one unit."""
    if kind in HEAD_KINDS:
        return product.sum(-1)
    if kind in ("sae_error", "mlp"):
        return product.flatten(2).sum(-1, keepdim=True)
    return product


def select(
    group: NodeGroup,
    per_unit: Float[torch.Tensor, "batch pos all_units"],
    positions: Int[torch.Tensor, "batch n_positions"],
) -> Float[torch.Tensor, "batch n_positions n_units"]:
    """Pick the group's units at each prompt's resolved positions (NaN where undefined)."""
    units = torch.tensor(group.units, device=per_unit.device)
    safe = positions.clamp(min=0).to(per_unit.device)
    rows = torch.arange(per_unit.shape[0], device=per_unit.device)[:, None]
    picked = per_unit[rows, safe][..., units]
    undefined = (positions == UNDEFINED).to(per_unit.device)[..., None]
    return picked.masked_fill(undefined, float("nan"))


def _sae_sites(saes: Mapping[str, SAE[Any]], wanted: list[str] | None) -> list[HookSite]:
    sites = {HookSite.from_hook_name(name).label: HookSite.from_hook_name(name) for name in saes}
    if wanted is None:
        return sorted(sites.values(), key=lambda s: (s.layer, s.point))
    out = []
    for label in wanted:
        site = HookSite.parse(label)
        if site.label not in sites:
            raise MissingSAEError(f"no SAE at hook site {site.label} (SAEs at {sorted(sites)})")
        out.append(site)
    return out


def build_groups(
    model: HookedSAETransformer,
    saes: Mapping[str, SAE[Any]],
    selection: NodeSelection,
    position_specs: Sequence[PositionSpec],
) -> list[NodeGroup]:
    """Every node group a selection names, validated against the model and SAEs."""
    cfg = model.cfg
    if not selection.kinds:
        raise NodeSelectionError("the node selection has no kinds: nothing to attribute")
    if not position_specs:
        raise NodeSelectionError("the node selection has no positions: nothing to attribute")
    for what in ("features", "heads", "sae_sites"):
        if getattr(selection, what) == []:
            raise NodeSelectionError(
                f"the node selection's {what} list is empty: nothing to attribute"
            )
    layers = list(range(cfg.n_layers)) if selection.layers is None else selection.layers
    if not layers:
        raise NodeSelectionError("the node selection has an empty layer list")
    for layer in layers:
        if not 0 <= layer < cfg.n_layers:
            raise NodeSelectionError(f"layer {layer} does not exist (model has {cfg.n_layers})")
    positions = tuple(position_specs)
    groups: list[NodeGroup] = []
    for kind in dict.fromkeys(selection.kinds):
        if kind in SAE_KINDS:
            if not saes:
                raise MissingSAEError(f"{kind} nodes need at least one SAE; none was given")
            for site in _sae_sites(saes, selection.sae_sites):
                if selection.layers is not None and site.layer not in layers:
                    continue
                units: tuple[int, ...] = (0,)
                if kind == "feature":
                    d_sae = saes[site.hook_name].cfg.d_sae
                    units = tuple(selection.features or range(d_sae))
                    if max(units) >= d_sae:
                        raise NodeSelectionError(
                            f"feature {max(units)} does not exist at {site.label} (d_sae {d_sae})"
                        )
                groups.append(NodeGroup(kind, site.layer, site.point, units, positions))
            continue
        if kind in ("neuron", "mlp") and (cfg.attn_only or cfg.d_mlp is None):
            raise NodeSelectionError(f"{kind} nodes need MLPs; this model is attention-only")
        for layer in layers:
            units = (0,)
            if kind in HEAD_KINDS:
                n = _n_kv_heads(model) if kind in ("k", "v") else cfg.n_heads
                units = tuple(selection.heads or range(n))
                if max(units) >= n:
                    raise NodeSelectionError(f"head {max(units)} does not exist for {kind} ({n})")
            elif kind == "neuron":
                units = tuple(range(cfg.d_mlp))
            groups.append(NodeGroup(kind, layer, KIND_POINT[kind], units, positions))
    if not groups:
        raise NodeSelectionError(f"the node selection {selection} names no nodes")
    return groups


def _n_kv_heads(model: HookedSAETransformer) -> int:
    """Key/value heads as hook_k/hook_v expose them (fewer than query heads under GQA)."""
    cfg = model.cfg
    if cfg.n_key_value_heads is None or cfg.ungroup_grouped_query_attention:
        return cfg.n_heads
    return int(cfg.n_key_value_heads)


def group_nodes(nodes: Sequence[Node]) -> dict[tuple[str, int, str], list[int]]:
    """Indices of ``nodes`` by (kind, layer, point)."""
    out: dict[tuple[str, int, str], list[int]] = {}
    for i, node in enumerate(nodes):
        out.setdefault((node.kind, node.layer, node.site.point), []).append(i)
    return out
