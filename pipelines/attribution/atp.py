"""Feature attribution, attribution patching (AtP) and AtP* (QK fix, GradDrop).

AtP(n) = (n(x') − n(x)) · ∂m/∂n |_x for every node at once: one forward pass
on the corrupted prompts, one on the clean prompts, one backward pass. AtP*
adds the QK fix for query/key nodes (see qk_fix.py) and GradDrop (see
graddrop.py): (1/(L−1)) Σ_l |AtP_l(n)|. The second-order methods (atp2,
atpstar2) add ½ Δ_n·(H Δ)_n from one more backward pass (see second_order.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch
from jaxtyping import Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution import graddrop as gd
from circuitscan.pipelines.attribution import second_order as so
from circuitscan.pipelines.attribution.errors import AttributionInputError
from circuitscan.pipelines.attribution.inputs import (
    Answers,
    checked_prompts,
)
from circuitscan.pipelines.attribution.node_kinds import ops
from circuitscan.pipelines.attribution.nodes import NodeGroup, build_groups, select
from circuitscan.pipelines.attribution.positions import remap_positions, resolve_positions
from circuitscan.pipelines.attribution.qk_fix import (
    KeyTerms,
    QueryTerms,
    fix_effect,
    fix_terms,
    qk_sites,
)
from circuitscan.pipelines.attribution.recording import (
    Recorder,
    check_saes,
    frozen_parameters,
    run_recorded,
)
from circuitscan.pipelines.attribution.result import AttributionResult
from circuitscan.pipelines.attribution.suffix import final_metric
from circuitscan.pipelines.sae_splice import SaeArg, saes_by_hook
from circuitscan.schemas.attribution import AttributionMethod, NodeSelection, PositionSpec
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec

Key = tuple[str, str]
# A sequence of SAEs, each at the site its config names (or the older mapping
# from HookSite, site label or hook name to SAE).
SaeMap: TypeAlias = SaeArg


def normalize_saes(model: HookedSAETransformer, saes: SaeMap | None) -> dict[str, SAE[Any]]:
    """SAEs keyed by TransformerLens hook name, after checking the model can take them."""
    out = saes_by_hook(saes)
    check_saes(model, out)
    return out


def position_specs(
    selection: NodeSelection, lengths: Int[torch.Tensor, " batch"]
) -> tuple[list[PositionSpec], bool]:
    """The selection's position specs and whether out-of-range ones are errors."""
    if selection.positions == "all":
        return list(range(int(lengths.max()))), False
    if selection.positions == "last":
        return ["last"], True
    return list(selection.positions), True


def _qk_keys(model: HookedSAETransformer, groups: Sequence[NodeGroup]) -> dict[int, list[Key]]:
    """Per layer with nodes the QK fix applies to: (q, k, scores, pattern) record keys."""
    out = {}
    for layer in sorted({g.layer for g in groups if ops(g.kind).spec.qk_fix}):
        q_site, k_site = qk_sites(model.cfg, layer)
        scores = HookSite(layer=layer, point="attn_scores").hook_name
        pattern = HookSite(layer=layer, point="pattern").hook_name
        out[layer] = [
            ("act", q_site.hook_name),
            ("act", k_site.hook_name),
            ("act", scores),
            ("act", pattern),
        ]
    return out


QKTerms = dict[int, QueryTerms | KeyTerms]


def _score_groups(
    model: HookedSAETransformer,
    groups: Sequence[NodeGroup],
    clean: Mapping[Key, torch.Tensor],
    corrupt: Mapping[Key, torch.Tensor] | None,
    grads: Mapping[Key, torch.Tensor],
    positions: torch.Tensor,
    qk: Mapping[int, list[Key]],
    qk_terms: QKTerms,
    only: Sequence[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Scores of the groups (indices ``only``, default all) under the gradients ``grads``.

    The QK fix's exact attention rows do not depend on the gradient; they are
    computed once into ``qk_terms`` and reused (GradDrop rescores L times).
    """
    out: dict[int, torch.Tensor] = {}
    for index in range(len(groups)) if only is None else only:
        group = groups[index]
        row = ops(group.kind)
        key = group.record_key
        side = row.spec.qk_fix
        if group.layer in qk and side is not None:
            assert corrupt is not None
            q_key, k_key, s_key, p_key = qk[group.layer]
            if index not in qk_terms:
                q, k = clean[q_key].detach(), clean[k_key].detach()
                scores, pattern = clean[s_key].detach(), clean[p_key].detach()
                qk_terms[index] = fix_terms(
                    side, model.blocks[group.layer].attn, q, k, corrupt[q_key], corrupt[k_key],
                    scores, pattern,
                )  # fmt: skip
            per_unit = fix_effect(qk_terms[index], grads[p_key])
        else:
            base = clean[key].detach()
            delta = (corrupt[key] - base) if corrupt is not None else -base
            per_unit = row.reduce(delta * grads[key])
        out[index] = select(group, per_unit, positions)
    return out


def _last_layer(model: HookedSAETransformer, keys: Sequence[Key]) -> int:
    """The last block any of ``keys`` lives in (resid_pre of block l counts as block l)."""
    return max(HookSite.from_hook_name(name).layer for _, name in keys)


def run_atp(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    clean_tokens: Int[torch.Tensor, "batch seq"],
    corrupt_tokens: Int[torch.Tensor, "batch corrupt_seq"] | None,
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    nodes: NodeSelection,
    *,
    method: AttributionMethod | None = None,
    named_positions: Sequence[Mapping[str, int]] | None = None,
    corrupt_lengths: Int[torch.Tensor, " batch"] | None = None,
    position_map: Int[torch.Tensor, "batch seq"] | None = None,
) -> AttributionResult:
    """AtP / AtP* scores (metric units) of every selected node on every prompt pair.

    ``corrupt_tokens=None`` scores against a zero baseline: the estimate of
    zero-ablating each node, ``−a·∂m/∂a`` (see :func:`feature_attribution`).
    Prompts are right-padded; ``lengths`` counts real tokens (BOS included).
    Clean and corrupted prompts pair position by position, or through
    ``position_map`` (clean position → corrupted position, -1: no counterpart,
    not patched; see ``positions.end_aligned_map``) when their lengths differ.
    """
    method = method or AttributionMethod()
    sae_map = normalize_saes(model, saes)
    answer, wrong, position_map = checked_prompts(
        model, clean_tokens, lengths, metric, answer, wrong,
        corrupt_tokens, corrupt_lengths, position_map,
    )  # fmt: skip
    if corrupt_tokens is None and position_map is not None:
        raise AttributionInputError("a position map needs corrupted prompts")
    if corrupt_tokens is None and method.qk_fix:
        raise AttributionInputError("the QK fix needs corrupted prompts")
    specs, strict = position_specs(nodes, lengths)
    positions = resolve_positions(specs, lengths, named_positions, strict=strict)
    groups = build_groups(model, sae_map, nodes, specs)
    qk = _qk_keys(model, groups) if method.qk_fix else {}
    node_keys = list(dict.fromkeys(g.record_key for g in groups))
    qk_keys = [key for keys in qk.values() for key in keys]
    grad_keys = list(dict.fromkeys(node_keys + [keys[3] for keys in qk.values()]))
    seeds = gd.seed_keys(model.cfg.n_layers, grad_keys) if method.graddrop else set()
    post_keys = [key for key in seeds if "resid_post" in key[1]]

    n_layers = model.cfg.n_layers
    with frozen_parameters(model):
        corrupt: dict[Key, torch.Tensor] | None = None
        if corrupt_tokens is not None:
            wanted = set(node_keys) | set(qk_keys[0::4] + qk_keys[1::4])
            rec = Recorder(wanted=wanted)
            # Nothing after the last recorded block is needed from the corrupted run.
            stop = min(_last_layer(model, list(wanted)) + 1, n_layers)
            run_recorded(model, sae_map, corrupt_tokens, rec, stop_at_layer=stop)
            corrupt = rec.store
        clean = Recorder(wanted=set(node_keys) | set(qk_keys) | seeds, grad=True)
        resid = run_recorded(model, sae_map, clean_tokens, clean, stop_at_layer=n_layers)
        if corrupt is not None and position_map is not None:
            corrupt = {
                key: remap_positions(value, position_map, clean.store[key].detach())
                for key, value in corrupt.items()
            }
        # Only the position the metric reads is unembedded, forward and backward.
        value = final_metric(
            model,
            resid,
            metric,
            lengths=lengths,
            tokens=clean_tokens,
            answer=answer,
            wrong=wrong,
        )
        inputs = grad_keys + [key for key in post_keys if key not in grad_keys]
        raw = torch.autograd.grad(
            value.sum(),
            [clean.store[key] for key in inputs],
            retain_graph=method.graddrop or method.second_order,
            create_graph=method.second_order,
            allow_unused=True,
        )
        grads = {
            key: torch.zeros_like(clean.store[key]) if g is None else g
            for key, g in zip(inputs, raw, strict=True)
        }
        second: dict[int, torch.Tensor] = {}
        if method.second_order:
            # One more backward pass through the first one's graph: H v along the joint patch.
            direction = so.patch_direction(groups, clean.store, corrupt, positions)
            hv = so.hessian_vector_product(grads, clean.store, direction)
            grads = {key: g.detach() for key, g in grads.items()}
            fixed = {i for i, g in enumerate(groups) if g.layer in qk and ops(g.kind).spec.qk_fix}
            second = so.second_order_terms(groups, direction, hv, positions, skip=fixed)
        qk_terms: QKTerms = {}
        by_index = _score_groups(
            model, groups, clean.store, corrupt, grads, positions, qk, qk_terms
        )
        scores = [
            by_index[i] + second[i] if i in second else by_index[i] for i in range(len(groups))
        ]
        signed = None
        if method.graddrop:
            signed = scores
            scores = _graddrop(
                model, groups, clean.store, corrupt, grads, grad_keys, positions, qk, qk_terms,
                scores, second,
            )  # fmt: skip
    return AttributionResult(method=method.name, groups=list(groups), scores=scores, signed=signed)


def _graddrop(
    model: HookedSAETransformer,
    groups: Sequence[NodeGroup],
    store: Mapping[Key, torch.Tensor],
    corrupt: Mapping[Key, torch.Tensor] | None,
    grads: Mapping[Key, torch.Tensor],
    grad_keys: Sequence[Key],
    positions: torch.Tensor,
    qk: Mapping[int, list[Key]],
    qk_terms: QKTerms,
    clean_scores: Sequence[torch.Tensor],
    second: Mapping[int, torch.Tensor],
) -> list[torch.Tensor]:
    """(1/(L−1)) Σ_l |AtP_l| per node, rescoring only the groups dropping layer l changes.

    Groups above layer l (and at its resid_post) keep their clean gradient, so
    their AtP_l is the clean score; groups inside layer l get exactly 0. A
    second-order term (``second``, by group) is added to AtP_l undropped:
    dropping a layer inside it would take one more HVP per layer.
    """
    n_layers = model.cfg.n_layers
    total = [torch.zeros_like(score) for score in clean_scores]
    for layer in range(n_layers):
        changed = []
        for index, group in enumerate(groups):
            where = gd.relation(layer, group.record_key)
            if where == "kept":
                total[index] = total[index] + clean_scores[index].abs()
            elif where == "changed":
                changed.append(index)
        if not changed:
            continue
        dropped = gd.dropped_gradients(
            layer, [k for k in grad_keys if gd.relation(layer, k) == "changed"], store, grads
        )
        rescored = _score_groups(
            model, groups, store, corrupt, dropped, positions, qk, qk_terms, only=changed
        )
        for index, score in rescored.items():
            if index in second:
                score = score + second[index]
            total[index] = total[index] + score.abs()
    return [t / max(n_layers - 1, 1) for t in total]


def feature_attribution(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    nodes: NodeSelection | None = None,
    *,
    named_positions: Sequence[Mapping[str, int]] | None = None,
) -> AttributionResult:
    """Single-prompt attribution ``a · ∂m/∂a`` (metric units) of each node.

    For SAE features this is ``a_i · (d_i · ∂m/∂x)``; it is minus the linear
    estimate of zero-ablating the node. Defaults to every feature of every SAE
    at every position.
    """
    nodes = nodes or NodeSelection(kinds=["feature"])
    result = run_atp(
        model,
        saes,
        tokens,
        None,
        lengths,
        metric,
        answer,
        wrong,
        nodes,
        named_positions=named_positions,
    )
    return AttributionResult(
        method="feature_attribution", groups=result.groups, scores=[-s for s in result.scores]
    )
