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
from circuitscan.pipelines.attribution.node_kinds import has_mlp, ops
from circuitscan.pipelines.attribution.positions import UNDEFINED
from circuitscan.schemas.attribution import Node, NodeKind, NodeSelection, PositionSpec
from circuitscan.schemas.hooks import HookPoint, HookSite


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
        return ops(self.kind).record_key(self.site)

    def node(self, position: int, unit: int) -> Node:
        """The node at (position slot, unit slot)."""
        spec = ops(self.kind).spec
        return Node(
            kind=self.kind,
            layer=self.layer,
            point=self.point if spec.sae else None,
            index=self.units[unit] if spec.indexed else None,
            position=self.positions[position],
        )

    def nodes(self) -> list[Node]:
        return [self.node(p, u) for p in range(len(self.positions)) for u in range(len(self.units))]

    @property
    def size(self) -> int:
        return len(self.positions) * len(self.units)


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
        row = ops(kind)
        spec = row.spec
        if spec.needs_mlp and not has_mlp(model):
            raise NodeSelectionError(f"{kind} nodes need MLPs; this model is attention-only")
        if spec.sae:
            if not saes:
                raise MissingSAEError(f"{kind} nodes need at least one SAE; none was given")
            sites = [s for s in _sae_sites(saes, selection.sae_sites) if s.layer in layers]
        else:
            assert spec.point is not None
            sites = [HookSite(layer=layer, point=spec.point) for layer in layers]
        for site in sites:
            units: tuple[int, ...] = (0,)
            if spec.indexed:
                n = row.n_units(model, saes.get(site.hook_name))
                wanted = getattr(selection, spec.restricted_by) if spec.restricted_by else None
                units = tuple(wanted or range(n))
                if max(units) >= n:
                    raise NodeSelectionError(
                        f"{spec.unit} {max(units)} does not exist for {kind} at {site.label} "
                        f"({n} {spec.unit} units)"
                    )
            groups.append(NodeGroup(kind, site.layer, site.point, units, positions))
    if not groups:
        raise NodeSelectionError(f"the node selection {selection} names no nodes")
    return groups


def group_nodes(nodes: Sequence[Node]) -> dict[tuple[NodeKind, int, str], list[int]]:
    """Indices of ``nodes`` by (kind, layer, point)."""
    out: dict[tuple[NodeKind, int, str], list[int]] = {}
    for i, node in enumerate(nodes):
        out.setdefault((node.kind, node.layer, node.site.point), []).append(i)
    return out
