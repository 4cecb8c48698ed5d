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

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution.atp import SaeMap, normalize_saes
from circuitscan.pipelines.attribution.errors import (
    AttributionInputError,
    NodeSelectionError,
    PositionError,
)
from circuitscan.pipelines.attribution.inputs import (
    Answers,
    check_node,
    checked_prompts,
)
from circuitscan.pipelines.attribution.node_kinds import NodeKindOps, ops
from circuitscan.pipelines.attribution.nodes import group_nodes
from circuitscan.pipelines.attribution.positions import (
    UNDEFINED,
    remap_positions,
    resolve_positions,
)
from circuitscan.pipelines.attribution.recording import Recorder, build_hooks, run_recorded
from circuitscan.pipelines.attribution.suffix import (
    cache_residuals,
    reads_one_position,
    suffix_metric,
)
from circuitscan.pipelines.metrics import read_positions
from circuitscan.schemas.attribution import Node, NodeKind, PatchMode
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec

Key = tuple[str, str]
# One kind's patch in a chunk: (kind row, chunk rows, positions, unit indices, new value or
# None for zero).
Edit = tuple[NodeKindOps, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def _record_key(node: Node) -> Key:
    return ops(node.kind).record_key(node.site)


def _record(
    model: HookedSAETransformer,
    saes: Mapping[str, SAE[Any]],
    tokens: torch.Tensor,
    keys: set[Key],
) -> dict[Key, torch.Tensor]:
    rec = Recorder(wanted=keys)
    with torch.no_grad():
        run_recorded(model, saes, tokens, rec)
    return rec.store


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
        return _record(model, saes, corrupt_tokens, keys)
    if reference is None:
        raise AttributionInputError("mode='mean' needs reference tokens and lengths")
    tokens, lengths = reference
    store = _record(model, saes, tokens, keys)
    real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return {key: value[real].mean(0)[None, None] for key, value in store.items()}


def _group_values(
    nodes: Sequence[Node],
    members: Sequence[int],
    values: torch.Tensor,
    positions: torch.Tensor,
    *,
    is_mean: bool = False,
) -> Float[torch.Tensor, "batch members rest"]:
    """Each member node's slice of a recorded tensor, per prompt at its position."""
    batch = positions.shape[0]
    pos = positions[:, list(members)].clamp(min=0)
    if is_mean:  # a reference mean [1, 1, ...]: the same for every prompt and position
        values = values.expand(batch, int(pos.max()) + 1, *values.shape[2:])
    rows = torch.arange(batch)[:, None]
    units = torch.tensor([nodes[m].index or 0 for m in members])[None, :]
    picked = ops(nodes[members[0]].kind).take(values, rows, pos, units)
    return picked.reshape(batch, len(members), -1)


def _unchanged(
    nodes: Sequence[Node],
    mode: PatchMode,
    clean: Mapping[Key, torch.Tensor],
    sources: Mapping[Key, torch.Tensor],
    positions: torch.Tensor,
) -> Bool[torch.Tensor, "batch n_nodes"]:
    """(prompt, node) pairs whose patch value equals the clean value: Δm is exactly 0.

    Nothing changes anywhere in such a forward pass (the transparent splice
    adds decode(a') − decode(a) and e' − e, both exactly zero), so it is not
    run. This is what keeps exhaustive patching of SAE features cheap: most
    features are inactive on both prompts.
    """
    out = torch.zeros(positions.shape, dtype=torch.bool)
    for members in group_nodes(nodes).values():
        key = _record_key(nodes[members[0]])
        now = _group_values(nodes, members, clean[key], positions)
        if mode == "zero":
            new = torch.zeros_like(now)
        else:
            new = _group_values(nodes, members, sources[key], positions, is_mean=mode == "mean").to(
                now.dtype
            )
        out[:, members] = (now == new).all(-1)
    return out & (positions != UNDEFINED)


def exact_patch(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    clean_tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    nodes: Sequence[Node],
    *,
    mode: PatchMode = "corrupt",
    corrupt_tokens: Int[torch.Tensor, "batch corrupt_seq"] | None = None,
    corrupt_lengths: Int[torch.Tensor, " batch"] | None = None,
    reference_tokens: Int[torch.Tensor, "ref seq"] | None = None,
    reference_lengths: Int[torch.Tensor, " ref"] | None = None,
    named_positions: Sequence[Mapping[str, int]] | None = None,
    position_map: Int[torch.Tensor, "batch seq"] | None = None,
    batch_size: int = 64,
    skip_unchanged: bool = True,
    freeze_later_patterns: bool = False,
    fraction: float = 1.0,
) -> Float[torch.Tensor, "batch n_nodes"]:
    """Δm = m(patched) − m(clean) in metric units, one node patched at a time.

    ``answer``/``wrong``: token ids, or strings of exactly one token each.
    NaN where a node's position does not exist in a prompt (absolute index
    past its end); a node that exists in no prompt is an error. Each patched
    row reruns only the layers from the node's own layer on (the clean
    residual stream entering that layer is cached), and only up to the
    position the metric reads. Rows whose patch changes nothing (the patch
    value equals the clean value, or the node sits after the position the
    metric reads) are exactly 0 and are not run unless ``skip_unchanged`` is
    False. ``position_map`` pairs clean positions with corrupted ones when
    their lengths differ (as in :func:`run_atp`); unpaired positions are 0.

    ``freeze_later_patterns`` holds the attention pattern of every block after
    the node's own block at its clean value: Δm through everything but later
    attention patterns. Its gap to the unfrozen Δm is the part of the effect
    that later heads carry by attending differently, which no linearisation
    at the clean point (AtP, or AtP*'s QK fix on the node's own head) sees
    once those softmaxes saturate.

    ``fraction`` moves each node only that far from its clean value towards
    the patch value (``a + fraction · (a' − a)``): Δm/fraction tends to the
    derivative AtP uses as ``fraction`` → 0, so a sweep shows where along the
    patch a node's effect stops being linear.
    """
    if not nodes:
        raise NodeSelectionError("no nodes to patch: the node list is empty")
    if batch_size < 1:
        raise AttributionInputError(f"batch_size must be positive, got {batch_size}")
    if mode not in ("corrupt", "zero", "mean"):
        raise AttributionInputError(f"unknown patch mode {mode!r} (corrupt, zero or mean)")
    if not 0.0 < fraction <= 1.0:
        raise AttributionInputError(f"fraction must be in (0, 1], got {fraction}")
    sae_map = normalize_saes(model, saes)
    answer, wrong, position_map = checked_prompts(
        model, clean_tokens, lengths, metric, answer, wrong,
        corrupt_tokens, corrupt_lengths, position_map,
    )  # fmt: skip
    if position_map is not None and mode != "corrupt":
        raise AttributionInputError("a position map only applies to mode='corrupt'")
    for node in nodes:
        check_node(model, sae_map, node)
    specs = [node.position for node in nodes]
    positions = resolve_positions(specs, lengths, named_positions, strict=False)
    dead = (positions == UNDEFINED).all(0)
    if bool(dead.any()):
        bad = int(torch.nonzero(dead)[0, 0])
        raise PositionError(
            f"node {nodes[bad]} is at position {nodes[bad].position}, out of range for every "
            f"prompt (lengths {lengths.tolist()})"
        )
    keys = {_record_key(node) for node in nodes}
    reference = None
    if reference_tokens is not None and reference_lengths is not None:
        reference = (reference_tokens, reference_lengths)
    n_layers = model.cfg.n_layers
    # The block holding the node's hook reruns (blocks.l.hook_resid_post fires
    # inside block l), so the cached stream is the one entering that block.
    node_start = [node.site.layer for node in nodes]
    batch = clean_tokens.shape[0]
    with torch.no_grad():
        sources = _sources(model, sae_map, keys, mode, corrupt_tokens, reference)
        clean = None
        if skip_unchanged or position_map is not None:
            clean = _record(model, sae_map, clean_tokens, keys)
        if position_map is not None:
            assert clean is not None
            sources = {
                key: remap_positions(value, position_map, clean[key])
                for key, value in sources.items()
            }
        resid = cache_residuals(model, clean_tokens, [*node_start, n_layers])
        patterns = clean_patterns(model, clean_tokens) if freeze_later_patterns else None
        base = suffix_metric(
            model,
            resid[n_layers],
            n_layers,
            metric,
            lengths=lengths,
            tokens=clean_tokens,
            answer=answer,
            wrong=wrong,
        )
        out = torch.full((batch, len(nodes)), float("nan"), dtype=base.dtype)
        skip = positions == UNDEFINED
        if skip_unchanged:
            assert clean is not None
            same = _unchanged(nodes, mode, clean, sources, positions)
            if reads_one_position(metric):
                read = read_positions(metric, lengths)
                same |= (positions > read[:, None]) & (positions != UNDEFINED)
            out[same] = 0.0
            skip |= same
        rows = [
            (node_start[n], b, n)
            for n in range(len(nodes))
            for b in range(batch)
            if not bool(skip[b, n])
        ]
        rows.sort(key=lambda row: row[0])
        by_group = group_nodes(nodes)
        for layer, members in itertools.groupby(rows, key=lambda row: row[0]):
            layer_rows = list(members)
            for begin in range(0, len(layer_rows), batch_size):
                chunk = layer_rows[begin : begin + batch_size]
                prompt = torch.tensor([b for _, b, _ in chunk])
                node_ix = torch.tensor([n for _, _, n in chunk])
                pos = positions[prompt, node_ix]
                raw_edits, sae_edits = patch_edits(
                    nodes, by_group, sources, mode,
                    torch.arange(len(chunk)), prompt, node_ix, pos, fraction,
                )  # fmt: skip
                if patterns is not None:
                    raw_edits.update(_frozen_after(patterns, layer, prompt))
                hooks = build_hooks(sae_map, Recorder(), raw_edits=raw_edits, sae_edits=sae_edits)
                value = suffix_metric(
                    model,
                    resid[layer][prompt],
                    layer,
                    metric,
                    lengths=lengths[prompt],
                    tokens=clean_tokens[prompt],
                    answer=None if answer is None else answer[prompt],
                    wrong=None if wrong is None else wrong[prompt],
                    hooks=hooks,
                )
                out[prompt, node_ix] = (value - base[prompt]).to(out.dtype)
    return out


def clean_patterns(
    model: HookedSAETransformer, tokens: Int[torch.Tensor, "batch seq"]
) -> dict[int, Float[torch.Tensor, "batch head query key"]]:
    """Every block's attention pattern on ``tokens`` (SAE splices leave them unchanged)."""
    out: dict[int, torch.Tensor] = {}
    names = {HookSite(layer=layer, point="pattern").hook_name: layer
             for layer in range(model.cfg.n_layers)}  # fmt: skip

    def keep(x: torch.Tensor, hook: Any) -> None:
        out[names[hook.name]] = x.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, keep) for name in names]):
        model(tokens, return_type=None)
    return out


def _frozen_after(
    patterns: Mapping[int, torch.Tensor], layer: int, prompt: torch.Tensor
) -> dict[str, Any]:
    """Raw edits replacing each later block's pattern by the clean one of each row's prompt."""

    def frozen(x: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        # Suffix passes may stop at the last position the metric reads; causal
        # rows before that cut are the full pass's rows.
        return clean[..., : x.shape[-2], : x.shape[-1]].to(x.dtype)

    return {
        HookSite(layer=later, point="pattern").hook_name: (
            lambda x, clean=patterns[later][prompt]: frozen(x, clean)
        )
        for later in patterns
        if later > layer
    }


def patch_edits(
    nodes: Sequence[Node],
    by_group: Mapping[tuple[NodeKind, int, str], list[int]],
    sources: Mapping[Key, torch.Tensor],
    mode: PatchMode,
    entry_row: torch.Tensor,
    entry_prompt: torch.Tensor,
    entry_node: torch.Tensor,
    entry_pos: torch.Tensor,
    fraction: float = 1.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Edit functions per hook name for one expanded chunk.

    Entry e patches node ``entry_node[e]`` of prompt ``entry_prompt[e]`` (at
    ``entry_pos[e]``) into chunk row ``entry_row[e]``. Exact patching has one
    entry per row; subset patching puts several nodes into one row. Each row
    reruns from its earliest patched layer on the clean stream, so the value
    an edit sees at a node is the clean one: the partial patch needs no
    separate record of it.
    """
    raw: dict[str, list[Edit]] = {}  # edits of hook activations
    sae: dict[str, list[Edit]] = {}  # edits inside an SAE's splice (features, error)
    for (kind, _, _), members in by_group.items():
        picked = torch.nonzero(torch.isin(entry_node, torch.tensor(members))).flatten()
        if picked.numel() == 0:
            continue
        row = ops(kind)
        units = torch.tensor([nodes[int(entry_node[e])].index or 0 for e in picked])
        key = _record_key(nodes[members[0]])
        src = sources.get(key)
        value: torch.Tensor | None = None
        if src is not None and mode == "mean":  # mean over the reference set, position-free
            value = src[0, 0]
            value = value[units] if row.spec.indexed else value.expand(len(picked), *value.shape)
        elif src is not None:
            value = row.take(src, entry_prompt[picked], entry_pos[picked], units)
        target = raw if row.slot == "act" else sae
        target.setdefault(key[1], []).append(
            (row, entry_row[picked], entry_pos[picked], units, value)
        )

    def apply(x: torch.Tensor, entries: list[Edit], slot: str) -> torch.Tensor:
        x = x.clone()
        for row, rows, at, units, value in entries:
            if row.slot == slot:
                new = torch.zeros((), dtype=x.dtype) if value is None else value.to(x.dtype)
                row.put(x, rows, at, units, new, fraction)
        return x

    raw_edits = {name: (lambda x, e=entries: apply(x, e, "act")) for name, entries in raw.items()}
    sae_edits = {
        name: (lambda a, err, e=entries: (apply(a, e, "feat"), apply(err, e, "err")))
        for name, entries in sae.items()
    }
    return raw_edits, sae_edits
