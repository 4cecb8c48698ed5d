"""Node kinds' tensor behaviour: one row per row of ``schemas/node_kinds.py``.

A row says, for one kind, which recorded tensor at its hook holds its value
(and which edit patches it), how many units a layer has, how an elementwise
``Δactivation · ∂m/∂activation`` is summed into one score per unit, and how a
unit's slice is read and written. AtP (atp.py), the QK fix (by the schema
row's ``qk_fix``, see qk_fix.py), exact patching (patching.py), patch paths
and node groups (nodes.py) read these rows and test no kind names.

Tensor layouts at the hooks: SAE features and MLP neurons are
``[batch, pos, units]``; heads are ``[batch, pos, heads, d_head]``; an SAE
error term or a whole MLP layer is ``[batch, pos, ...]`` and is one unit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from sae_lens import SAE, HookedSAETransformer

from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.node_kinds import NODE_KINDS, NodeKind, NodeKindSpec

Slot = Literal["feat", "err", "act"]
_SLOTS: dict[str, Slot] = {"sae_feature": "feat", "sae_error": "err", "hook": "act"}
Reduce = Callable[[torch.Tensor], Float[torch.Tensor, "batch pos units"]]


def _per_unit(product: torch.Tensor) -> torch.Tensor:
    return product


def _per_head(product: torch.Tensor) -> torch.Tensor:
    return product.sum(-1)  # over d_head


def _whole(product: torch.Tensor) -> torch.Tensor:
    return product.flatten(2).sum(-1, keepdim=True)


def has_mlp(model: HookedSAETransformer) -> bool:
    return not (model.cfg.attn_only or model.cfg.d_mlp is None)


def n_kv_heads(model: HookedSAETransformer) -> int:
    """Key/value heads as hook_k/hook_v expose them (fewer than query heads under GQA)."""
    cfg = model.cfg
    if cfg.n_key_value_heads is None or cfg.ungroup_grouped_query_attention:
        return int(cfg.n_heads)
    return int(cfg.n_key_value_heads)


def _count(spec: NodeKindSpec, model: HookedSAETransformer, sae: SAE[Any] | None) -> int:
    """Units of ``spec``'s kind at one site (``sae``: the SAE there, for SAE kinds)."""
    if spec.unit is None:
        return 1
    if spec.unit == "feature":
        assert sae is not None, f"{spec.name} units are counted on an SAE"
        return int(sae.cfg.d_sae)
    if spec.unit == "head":
        return int(model.cfg.n_heads)
    if spec.unit == "kv_head":
        return n_kv_heads(model)
    return int(model.cfg.d_mlp or 0)


@dataclass(frozen=True)
class NodeKindOps:
    """The tensor side of one node kind."""

    spec: NodeKindSpec
    reduce: Reduce  # elementwise Δa·∂m/∂a at the hook → one score per unit

    @property
    def slot(self) -> Slot:
        """Recorder key part and edit target: SAE features, SAE error, or the hook's value."""
        return _SLOTS[self.spec.reads]

    def record_key(self, site: HookSite) -> tuple[str, str]:
        """Which recorded tensor holds this kind's value at ``site``."""
        return (self.slot, site.hook_name)

    def n_units(self, model: HookedSAETransformer, sae: SAE[Any] | None = None) -> int:
        return _count(self.spec, model, sae)

    def _where(self, rows: torch.Tensor, at: torch.Tensor, units: torch.Tensor) -> tuple[Any, ...]:
        return (rows, at, units) if self.spec.indexed else (rows, at)

    def take(
        self, values: torch.Tensor, rows: torch.Tensor, at: torch.Tensor, units: torch.Tensor
    ) -> torch.Tensor:
        """The units' slices at (prompt ``rows``, position ``at``); broadcasting as indexing."""
        return values[self._where(rows, at, units)]

    def put(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        at: torch.Tensor,
        units: torch.Tensor,
        new: torch.Tensor,
        fraction: float = 1.0,
    ) -> None:
        """Set those slices of ``x`` in place, ``fraction`` of the way from their value to ``new``."""
        where = self._where(rows, at, units)
        if fraction != 1.0:
            new = x[where] + fraction * (new - x[where])
        x[where] = new


NODE_KIND_OPS: dict[NodeKind, NodeKindOps] = {
    name: NodeKindOps(spec=NODE_KINDS[name], reduce=reduce)
    for name, reduce in (
        ("feature", _per_unit),
        ("sae_error", _whole),
        ("z", _per_head),
        ("q", _per_head),
        ("k", _per_head),
        ("v", _per_head),
        ("neuron", _per_unit),
        ("mlp", _whole),
    )
}
if set(NODE_KIND_OPS) != set(NODE_KINDS):
    raise RuntimeError("every node kind in schemas/node_kinds.py needs a row here")


def ops(kind: NodeKind) -> NodeKindOps:
    """The row of a kind name (not an alias: the engine speaks names only)."""
    return NODE_KIND_OPS[kind]
