"""Exact activation patching (ground truth), many single-node patches per forward pass.

Each (prompt, node) pair is one row of an expanded batch: the row runs the
clean prompt with that one node replaced by its value on the corrupted
prompt, by zero, or by its mean over a reference set (mean over all real
tokens of the reference prompts, so it is position-independent). SAE nodes
are patched inside the transparent splice: the feature's activation (or the
error term) changes and the rest of the SAE output stays, so
``out = x + decode(a') − decode(a)`` for a feature and ``x + e' − e`` for the
error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution.atp import SaeMap, normalize_saes
from circuitscan.pipelines.attribution.errors import AttributionInputError, PositionError
from circuitscan.pipelines.attribution.nodes import group_nodes
from circuitscan.pipelines.attribution.positions import (
    UNDEFINED,
    check_aligned,
    resolve_positions,
)
from circuitscan.pipelines.attribution.splice import Recorder, run_recorded
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.schemas.attribution import Node, PatchMode
from circuitscan.schemas.metrics import MetricSpec

Key = tuple[str, str]


def _record_key(node: Node) -> Key:
    what = {"feature": "feat", "sae_error": "err"}.get(node.kind, "act")
    return (what, node.site.hook_name)


def _sources(
    model: HookedSAETransformer,
    saes: Mapping[str, SAE[Any]],
    keys: set[Key],
    mode: PatchMode,
    corrupt_tokens: torch.Tensor | None,
    reference: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[Key, torch.Tensor]:
    """Per key: [batch, pos, ...] corrupted values, or [1, 1, ...] means (zero: empty)."""
    if mode == "zero":
        return {}
    if mode == "corrupt":
        if corrupt_tokens is None:
            raise AttributionInputError("mode='corrupt' needs corrupt_tokens")
        rec = Recorder(wanted=keys)
        run_recorded(model, saes, corrupt_tokens, rec)
        return rec.store
    if reference is None:
        raise AttributionInputError("mode='mean' needs reference tokens and lengths")
    tokens, lengths = reference
    rec = Recorder(wanted=keys)
    run_recorded(model, saes, tokens, rec)
    real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return {key: value[real].mean(0)[None, None] for key, value in rec.store.items()}


def exact_patch(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    clean_tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Int[torch.Tensor, " batch"] | None,
    wrong: Int[torch.Tensor, " batch"] | None,
    nodes: Sequence[Node],
    *,
    mode: PatchMode = "corrupt",
    corrupt_tokens: Int[torch.Tensor, "batch seq"] | None = None,
    corrupt_lengths: Int[torch.Tensor, " batch"] | None = None,
    reference_tokens: Int[torch.Tensor, "ref seq"] | None = None,
    reference_lengths: Int[torch.Tensor, " ref"] | None = None,
    named_positions: Sequence[Mapping[str, int]] | None = None,
    batch_size: int = 64,
) -> Float[torch.Tensor, "batch n_nodes"]:
    """Δm = m(patched) − m(clean) in metric units, one node patched at a time.

    NaN where a node's position does not exist in a prompt (absolute index
    past its end); a node that exists in no prompt is an error.
    """
    if not nodes:
        raise AttributionInputError("no nodes to patch")
    sae_map = normalize_saes(model, saes)
    if corrupt_tokens is not None:
        check_aligned(lengths, corrupt_lengths if corrupt_lengths is not None else lengths)
    for node in nodes:
        if node.kind in ("feature", "sae_error") and node.site.hook_name not in sae_map:
            from circuitscan.pipelines.attribution.errors import MissingSAEError

            raise MissingSAEError(f"node {node} needs an SAE at {node.site.label}; none given")
    specs = [node.position for node in nodes]
    positions = resolve_positions(specs, lengths, named_positions, strict=False)
    dead = (positions == UNDEFINED).all(0)
    if bool(dead.any()):
        raise PositionError(
            f"node {nodes[int(torch.nonzero(dead)[0, 0])]} is out of range for every prompt"
        )
    keys = {_record_key(node) for node in nodes}
    reference = None
    if reference_tokens is not None and reference_lengths is not None:
        reference = (reference_tokens, reference_lengths)
    batch = clean_tokens.shape[0]
    with torch.no_grad():
        sources = _sources(model, sae_map, keys, mode, corrupt_tokens, reference)
        base_logits = model(clean_tokens, return_type="logits")
        base = metric_per_prompt(
            base_logits, metric, lengths=lengths, tokens=clean_tokens, answer=answer, wrong=wrong
        )
        rows = [(b, n) for n in range(len(nodes)) for b in range(batch) if positions[b, n] >= 0]
        out = torch.full((batch, len(nodes)), float("nan"), dtype=base.dtype)
        by_group = group_nodes(nodes)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompt = torch.tensor([b for b, _ in chunk])
            node_ix = torch.tensor([n for _, n in chunk])
            pos = positions[prompt, node_ix]
            raw_edits, sae_edits = _edits(nodes, by_group, sources, mode, prompt, node_ix, pos)
            logits = run_recorded(
                model,
                sae_map,
                clean_tokens[prompt],
                Recorder(),
                raw_edits=raw_edits,
                sae_edits=sae_edits,
            )
            value = metric_per_prompt(
                logits,
                metric,
                lengths=lengths[prompt],
                tokens=clean_tokens[prompt],
                answer=None if answer is None else answer[prompt],
                wrong=None if wrong is None else wrong[prompt],
            )
            out[prompt, node_ix] = (value - base[prompt]).to(out.dtype)
    return out


def _edits(
    nodes: Sequence[Node],
    by_group: Mapping[tuple[str, int, str], list[int]],
    sources: Mapping[Key, torch.Tensor],
    mode: PatchMode,
    prompt: torch.Tensor,
    node_ix: torch.Tensor,
    pos: torch.Tensor,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Edit functions per hook name for one expanded chunk (row r patches node_ix[r])."""
    raw: dict[str, list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    sae: dict[str, list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for (kind, _, _), members in by_group.items():
        rows = torch.nonzero(torch.isin(node_ix, torch.tensor(members))).flatten()
        if rows.numel() == 0:
            continue
        node0 = nodes[members[0]]
        units = torch.tensor([nodes[int(node_ix[r])].index or 0 for r in rows])
        key = _record_key(node0)
        src = sources.get(key)
        if src is None:
            value = None
        elif src.shape[0] == 1:  # mean over the reference set, position-independent
            value = src[0, 0]
            value = (
                value[units]
                if kind not in ("sae_error", "mlp")
                else value.expand(len(rows), *value.shape)
            )
        else:
            value = src[prompt[rows], pos[rows]]
            if kind not in ("sae_error", "mlp"):
                value = value[torch.arange(len(rows)), units]
        entry = (kind, rows, pos[rows], units, value)
        target = sae if kind in ("feature", "sae_error") else raw
        target.setdefault(key[1], []).append(entry)  # type: ignore[arg-type]

    def apply(x: torch.Tensor, entries: list[Any], kinds: tuple[str, ...]) -> torch.Tensor:
        x = x.clone()
        for kind, rows, at, units, value in entries:
            if kind not in kinds:
                continue
            new = torch.zeros((), dtype=x.dtype) if value is None else value.to(x.dtype)
            if kind in ("sae_error", "mlp"):
                x[rows, at] = new
            else:
                x[rows, at, units] = new
        return x

    raw_edits = {
        name: (lambda x, e=entries: apply(x, e, ("z", "q", "k", "v", "neuron", "mlp")))
        for name, entries in raw.items()
    }
    sae_edits = {
        name: (lambda a, err, e=entries: (apply(a, e, ("feature",)), apply(err, e, ("sae_error",))))
        for name, entries in sae.items()
    }
    return raw_edits, sae_edits
