"""Second-order attribution patching: the Hessian-vector-product (HVP) correction.

AtP is the first-order term of patching node n: ``m(a + Δ_n) − m(a) ≈ g_n·Δ_n``.
Zhang & Wang (2026, arXiv 2606.09899, "When Attribution Patching Lies") trace
its dominant error to the non-linearities *downstream* of the patched node
(later heads attending differently, later MLPs), not to the node's own
curvature, and remove the leading error term with one Hessian-vector product:

    atp2(n) = g_n·Δ_n + ½ Δ_n·(H v)_n

Here ``m̃(u)`` is the metric with an additive perturbation ``u_n`` applied at
every selected node's slice of its hook (everything downstream recomputed),
``g = ∇m̃(0)`` (AtP's gradients) and ``H = ∇²m̃(0)``. ``H v`` comes from one
extra backward pass through the first backward pass's graph (Pearlmutter's
trick: ``∇_u (g(u)·v)``), for every node at once.

The direction ``v``: one HVP serves every node only along one direction, and
we take ``v = Σ_n Δ_n`` over the selected nodes (every selected node patched
at once). Then:

- a node selected alone (or one whose Hessian block with the other selected
  nodes is zero) gets exactly the second-order Taylor term of its own patch,
  ``½ Δ_nᵀ H_nn Δ_n``: equal to exact patching where the path from the node to
  the metric is quadratic, and to the slope of ``Δm(f)/f`` at f = 0 along a
  partial patch ``a + fΔ_n`` in general;
- with many nodes selected, node n's term also carries half of each pairwise
  interaction ``Δ_nᵀ H_nm Δ_m`` with the other selected nodes (the second-order
  term of integrated gradients along the joint patch; the terms sum to the
  joint patch's second-order Taylor term). Nodes nested in one another (a
  head's value and the same head's output, or two layers at one position)
  interact strongly, so select the nodes of one cut together when the
  single-node effect is what matters. This is where we depart from a
  per-node curvature, which would cost one HVP per node.

Nodes the QK fix scores (queries, keys) keep the QK fix's score and get no
second-order term: the fix already computes their own softmax exactly, and a
plain second-order term in q or k would count that curvature twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Int

from circuitscan.pipelines.attribution.node_kinds import ops
from circuitscan.pipelines.attribution.nodes import NodeGroup, select
from circuitscan.pipelines.attribution.positions import UNDEFINED

Key = tuple[str, str]


def _group_mask(
    group: NodeGroup, like: torch.Tensor, positions: Int[torch.Tensor, "batch n_positions"]
) -> torch.Tensor:
    """1 on the group's slices of its hook tensor (its units at each prompt's positions)."""
    mask = torch.zeros_like(like)
    row = ops(group.kind)
    rows, slot = torch.nonzero(positions != UNDEFINED, as_tuple=True)
    if rows.numel() == 0:
        return mask
    at = positions[rows, slot].to(like.device)
    rows = rows.to(like.device)
    units = torch.tensor(group.units, device=like.device)
    if row.spec.indexed:
        row.put(mask, rows[:, None], at[:, None], units[None, :], torch.ones((), dtype=like.dtype))
    else:
        row.put(mask, rows, at, units, torch.ones((), dtype=like.dtype))
    return mask


def patch_direction(
    groups: Sequence[NodeGroup],
    clean: Mapping[Key, torch.Tensor],
    corrupt: Mapping[Key, torch.Tensor] | None,
    positions: Int[torch.Tensor, "batch n_positions"],
) -> dict[Key, torch.Tensor]:
    """v: every selected node's Δ (corrupted − clean, or −clean against zero) on its slice."""
    masks: dict[Key, torch.Tensor] = {}
    for group in groups:
        key = group.record_key
        mask = _group_mask(group, clean[key].detach(), positions)
        masks[key] = torch.maximum(masks[key], mask) if key in masks else mask
    out = {}
    for key, mask in masks.items():
        base = clean[key].detach()
        delta = (corrupt[key] - base) if corrupt is not None else -base
        out[key] = (delta * mask).detach()
    return out


def hessian_vector_product(
    grads: Mapping[Key, torch.Tensor],
    clean: Mapping[Key, torch.Tensor],
    direction: Mapping[Key, torch.Tensor],
) -> dict[Key, torch.Tensor]:
    """(H v) at each direction key: ∇ of Σ g·v, with ``grads`` taken with ``create_graph``."""
    keys = list(direction)
    total = sum(((grads[key] * direction[key]).sum() for key in keys), torch.zeros(()))
    if not total.requires_grad:  # no selected node reaches the metric: H v is 0
        return {key: torch.zeros_like(direction[key]) for key in keys}
    raw = torch.autograd.grad(
        total, [clean[key] for key in keys], retain_graph=True, allow_unused=True
    )
    return {
        key: torch.zeros_like(direction[key]) if h is None else h.detach()
        for key, h in zip(keys, raw, strict=True)
    }


def second_order_terms(
    groups: Sequence[NodeGroup],
    direction: Mapping[Key, torch.Tensor],
    hv: Mapping[Key, torch.Tensor],
    positions: Int[torch.Tensor, "batch n_positions"],
    skip: set[int],
) -> dict[int, torch.Tensor]:
    """½ Δ_n·(H v)_n per group (indices not in ``skip``), as [batch, n_positions, n_units]."""
    out = {}
    for index, group in enumerate(groups):
        if index in skip:
            continue
        key = group.record_key
        per_unit = ops(group.kind).reduce(direction[key] * hv[key])
        out[index] = 0.5 * select(group, per_unit, positions)
    return out
