"""Feature attribution, attribution patching (AtP) and AtP* (QK fix, GradDrop).

AtP(n) = (n(x') − n(x)) · ∂m/∂n |_x for every node at once: one forward pass
on the corrupted prompts, one on the clean prompts, one backward pass. AtP*
adds the QK fix for query/key nodes (see qk_fix.py) and GradDrop (see
graddrop.py): (1/(L−1)) Σ_l |AtP_l(n)|.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution import graddrop as gd
from circuitscan.pipelines.attribution.errors import AttributionInputError
from circuitscan.pipelines.attribution.inputs import (
    Answers,
    answer_ids,
    check_answers,
    check_pair,
    check_tokens,
)
from circuitscan.pipelines.attribution.nodes import NodeGroup, build_groups, select, unit_scores
from circuitscan.pipelines.attribution.positions import resolve_positions
from circuitscan.pipelines.attribution.qk_fix import key_scores, qk_sites, query_scores
from circuitscan.pipelines.attribution.result import AttributionResult
from circuitscan.pipelines.attribution.splice import (
    Recorder,
    check_saes,
    frozen_parameters,
    run_recorded,
)
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.schemas.attribution import AttributionMethod, NodeSelection, PositionSpec
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec

Key = tuple[str, str]
SaeMap = Mapping[HookSite | str, SAE[Any]]


def normalize_saes(model: HookedSAETransformer, saes: SaeMap | None) -> dict[str, SAE[Any]]:
    """SAEs keyed by TransformerLens hook name; keys may be HookSites, labels or hook names."""
    out: dict[str, SAE[Any]] = {}
    for key, sae in (saes or {}).items():
        site = key if isinstance(key, HookSite) else HookSite.parse(key)
        out[site.hook_name] = sae
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
    """Per layer with q/k nodes: (q, k, scores, pattern) record keys."""
    out = {}
    for layer in sorted({g.layer for g in groups if g.kind in ("q", "k")}):
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


def _score_groups(
    model: HookedSAETransformer,
    groups: Sequence[NodeGroup],
    clean: Mapping[Key, torch.Tensor],
    corrupt: Mapping[Key, torch.Tensor] | None,
    grads: Mapping[Key, torch.Tensor],
    positions: torch.Tensor,
    qk: Mapping[int, list[Key]],
) -> list[torch.Tensor]:
    out = []
    for group in groups:
        key = group.record_key
        base = clean[key].detach()
        if group.layer in qk and group.kind in ("q", "k"):
            assert corrupt is not None
            q_key, k_key, s_key, p_key = qk[group.layer]
            attn = model.blocks[group.layer].attn
            q, k = clean[q_key].detach(), clean[k_key].detach()
            scores, pattern = clean[s_key].detach(), clean[p_key].detach()
            if group.kind == "q":
                per_unit = query_scores(attn, q, corrupt[q_key], k, scores, pattern, grads[p_key])
            else:
                per_unit = key_scores(attn, q, k, corrupt[k_key], scores, pattern, grads[p_key])
        else:
            delta = (corrupt[key] - base) if corrupt is not None else -base
            per_unit = unit_scores(group.kind, delta * grads[key])
        out.append(select(group, per_unit, positions))
    return out


def run_atp(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    clean_tokens: Int[torch.Tensor, "batch seq"],
    corrupt_tokens: Int[torch.Tensor, "batch seq"] | None,
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    nodes: NodeSelection,
    *,
    method: AttributionMethod | None = None,
    named_positions: Sequence[Mapping[str, int]] | None = None,
    corrupt_lengths: Int[torch.Tensor, " batch"] | None = None,
) -> AttributionResult:
    """AtP / AtP* scores (metric units) of every selected node on every prompt pair.

    ``corrupt_tokens=None`` scores against a zero baseline: the estimate of
    zero-ablating each node, ``−a·∂m/∂a`` (see :func:`feature_attribution`).
    Prompts are right-padded; ``lengths`` counts real tokens (BOS included).
    """
    method = method or AttributionMethod()
    sae_map = normalize_saes(model, saes)
    check_tokens(clean_tokens, lengths, "clean_tokens")
    answer = answer_ids(model, answer, "answer")
    wrong = answer_ids(model, wrong, "wrong")
    check_answers(model, clean_tokens.shape[0], metric, answer, wrong)
    if corrupt_tokens is not None:
        check_pair(clean_tokens, corrupt_tokens, lengths, corrupt_lengths)
    elif method.qk_fix:
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

    with frozen_parameters(model):
        corrupt: dict[Key, torch.Tensor] | None = None
        if corrupt_tokens is not None:
            rec = Recorder(wanted=set(node_keys) | set(qk_keys[0::4] + qk_keys[1::4]))
            run_recorded(model, sae_map, corrupt_tokens, rec)
            corrupt = rec.store
        clean = Recorder(wanted=set(node_keys) | set(qk_keys) | seeds, grad=True)
        logits = run_recorded(model, sae_map, clean_tokens, clean)
        value = metric_per_prompt(
            logits, metric, lengths=lengths, tokens=clean_tokens, answer=answer, wrong=wrong
        )
        inputs = grad_keys + [key for key in post_keys if key not in grad_keys]
        raw = torch.autograd.grad(
            value.sum(),
            [clean.store[key] for key in inputs],
            retain_graph=method.graddrop,
            allow_unused=True,
        )
        grads = {
            key: torch.zeros_like(clean.store[key]) if g is None else g
            for key, g in zip(inputs, raw, strict=True)
        }
        scores = _score_groups(model, groups, clean.store, corrupt, grads, positions, qk)
        signed = None
        if method.graddrop:
            signed = scores
            scores = _graddrop(model, groups, clean.store, corrupt, grads, grad_keys, positions, qk)
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
) -> list[torch.Tensor]:
    n_layers = model.cfg.n_layers
    total: list[torch.Tensor] | None = None
    for layer in range(n_layers):
        dropped = gd.dropped_gradients(layer, grad_keys, store, grads)
        scores = _score_groups(model, groups, store, corrupt, dropped, positions, qk)
        if total is None:
            total = [s.abs() for s in scores]
        else:
            total = [t + s.abs() for t, s in zip(total, scores, strict=True)]
    assert total is not None
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
