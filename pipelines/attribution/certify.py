"""A bound on missed effects: random-subset patching of the unverified nodes.

The AtP* paper (Kramár, Lieberum, Shah, Nanda 2024, arXiv 2403.00745) ends
with a diagnostic for false negatives: patch random subsets of the nodes
(each node in a subset independently with probability ``p``), estimate each
node's effect as the mean Δm of the subsets that include it minus the mean Δm
of those that exclude it, and put an upper confidence bound on the effect of
every node left unverified. Here, S subsets are drawn once (seeded) and each
is patched into every prompt: one row per (subset, prompt), many rows per
forward pass, each row rerunning only the blocks from its earliest patched
node's own on and only up to the position the metric reads, on the clean
residual stream cached once (as exact patching does).

Choices where the paper leaves freedom (all stated in the result):

- The bound is per (node, prompt): ``|ĉ| + t·se`` with ``se`` the Welch
  standard error of the difference of means and ``t`` the two-sided Student-t
  quantile at ``δ / M`` (Welch's degrees of freedom rounded down, capped at
  200: both conservative), M the number of (node, prompt) pairs bounded —
  a Bonferroni union bound, so all hold together with probability ≥ 1 − δ
  (under the normal approximation). A node's bound is the mean of its
  per-prompt bounds, which then bounds its mean |Δm| over the prompts (the
  quantity verification ranks by) and, a fortiori, |mean Δm|. θ is the largest.
- (node, prompt) pairs whose patch value equals the clean value, or that
  sit after the position the metric reads, have effect exactly 0 (exact
  patching skips them for the same reason): they get estimate and bound 0
  and do not count in M. Pairs whose position does not exist in a prompt are
  left out of that node's mean.

Assumptions: effects add up across patched nodes (then each estimate is
unbiased for the node's single-node effect; with interactions it estimates
the node's mean marginal effect over random subsets, which smaller ``p`` keeps
closer to the single-node effect), and the difference of means is close to
normal (see ``schemas.certification.ASSUMPTIONS``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import HookedSAETransformer

from circuitscan.pipelines.attribution.atp import SaeMap, normalize_saes
from circuitscan.pipelines.attribution.errors import (
    AttributionInputError,
    NodeSelectionError,
    PositionError,
)
from circuitscan.pipelines.attribution.inputs import Answers, check_node, checked_prompts
from circuitscan.pipelines.attribution.nodes import group_nodes
from circuitscan.pipelines.attribution.patching import (
    _record,
    _record_key,
    _sources,
    _unchanged,
    exact_patch,
    patch_edits,
)
from circuitscan.pipelines.attribution.positions import (
    UNDEFINED,
    remap_positions,
    resolve_positions,
)
from circuitscan.pipelines.attribution.recording import Recorder, build_hooks
from circuitscan.pipelines.attribution.subset_stats import (
    auto_schedule,
    auto_stop,
    certification_result,
    certification_sums,
    draw_subsets,
    smallest_top_effect,
)
from circuitscan.pipelines.attribution.suffix import (
    cache_residuals,
    reads_one_position,
    suffix_metric,
)
from circuitscan.pipelines.metrics import read_positions
from circuitscan.schemas.attribution import Node, PatchMode
from circuitscan.schemas.certification import AutoVerification, CertificationResult
from circuitscan.schemas.metrics import MetricSpec


def subset_patch(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    clean_tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    nodes: Sequence[Node],
    subsets: Bool[torch.Tensor, "S n_nodes"],
    *,
    mode: PatchMode = "corrupt",
    corrupt_tokens: Int[torch.Tensor, "batch corrupt_seq"] | None = None,
    corrupt_lengths: Int[torch.Tensor, " batch"] | None = None,
    reference_tokens: Int[torch.Tensor, "ref seq"] | None = None,
    reference_lengths: Int[torch.Tensor, " ref"] | None = None,
    named_positions: Sequence[Mapping[str, int]] | None = None,
    position_map: Int[torch.Tensor, "batch seq"] | None = None,
    batch_size: int = 64,
    allow_absent: bool = False,
) -> tuple[
    Float[torch.Tensor, "S batch"],
    Bool[torch.Tensor, "batch n"],
    Bool[torch.Tensor, "batch n"],
    int,
]:
    """Δm of patching each subset of ``nodes`` together into every prompt.

    Returns (Δm [S, batch], known-zero [batch, n], undefined [batch, n], rows
    run). Within a row, nodes that change nothing there (known zero) or do
    not exist in that prompt are not patched; a row with nothing left is 0.
    A node that exists in no prompt is an error unless ``allow_absent`` (a
    shard of a larger prompt set, whose subsets span every node).
    """
    if not nodes:
        raise NodeSelectionError("no nodes to certify: the node list is empty")
    if batch_size < 1:
        raise AttributionInputError(f"batch_size must be positive, got {batch_size}")
    if mode not in ("corrupt", "zero", "mean"):
        raise AttributionInputError(f"unknown patch mode {mode!r} (corrupt, zero or mean)")
    if subsets.ndim != 2 or subsets.shape[1] != len(nodes):
        raise AttributionInputError(
            f"subsets {tuple(subsets.shape)} must be [samples, {len(nodes)} nodes]"
        )
    sae_map = normalize_saes(model, saes)
    answer, wrong, position_map = checked_prompts(
        model, clean_tokens, lengths, metric, answer, wrong,
        corrupt_tokens, corrupt_lengths, position_map,
    )  # fmt: skip
    if position_map is not None and mode != "corrupt":
        raise AttributionInputError("a position map only applies to mode='corrupt'")
    for node in nodes:
        check_node(model, sae_map, node)
    positions = resolve_positions([n.position for n in nodes], lengths, named_positions,
                                  strict=False)  # fmt: skip
    dead = (positions == UNDEFINED).all(0)
    if bool(dead.any()) and not allow_absent:
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
    node_start = torch.tensor([node.site.layer for node in nodes])
    samples, batch = subsets.shape[0], clean_tokens.shape[0]
    with torch.no_grad():
        sources = _sources(model, sae_map, keys, mode, corrupt_tokens, reference)
        clean = _record(model, sae_map, clean_tokens, keys)
        if position_map is not None:
            sources = {
                key: remap_positions(value, position_map, clean[key])
                for key, value in sources.items()
            }
        undefined = positions == UNDEFINED
        known_zero = _unchanged(nodes, mode, clean, sources, positions)
        if reads_one_position(metric):
            read = read_positions(metric, lengths)
            known_zero |= (positions > read[:, None]) & ~undefined
        active = ~(known_zero | undefined)  # [batch, n]
        resid = cache_residuals(model, clean_tokens, [*node_start.tolist(), n_layers])
        base = suffix_metric(model, resid[n_layers], n_layers, metric, lengths=lengths,
                             tokens=clean_tokens, answer=answer, wrong=wrong)  # fmt: skip
        out = torch.zeros((samples, batch), dtype=base.dtype)
        rows: list[tuple[int, int, int]] = []  # (start layer, subset, prompt)
        for s in range(samples):
            for b in range(batch):
                chosen = subsets[s] & active[b]
                if bool(chosen.any()):
                    rows.append((int(node_start[chosen].min()), s, b))
        rows.sort()
        by_group = group_nodes(nodes)
        for layer, members in itertools.groupby(rows, key=lambda row: row[0]):
            layer_rows = list(members)
            for begin in range(0, len(layer_rows), batch_size):
                chunk = layer_rows[begin : begin + batch_size]
                subset_ix = torch.tensor([s for _, s, _ in chunk])
                prompt = torch.tensor([b for _, _, b in chunk])
                chosen = subsets[subset_ix] & active[prompt]  # [rows, n]
                entry_row, entry_node = torch.nonzero(chosen, as_tuple=True)
                entry_prompt = prompt[entry_row]
                raw_edits, sae_edits = patch_edits(
                    nodes, by_group, sources, mode, entry_row, entry_prompt, entry_node,
                    positions[entry_prompt, entry_node],
                )  # fmt: skip
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
                out[subset_ix, prompt] = (value - base[prompt]).to(out.dtype)
    return out, known_zero, undefined, len(rows)


def certify(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    clean_tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    nodes: Sequence[Node],
    *,
    samples: int,
    p: float = 0.25,
    confidence: float = 0.95,
    seed: int = 0,
    mode: PatchMode = "corrupt",
    corrupt_tokens: Int[torch.Tensor, "batch corrupt_seq"] | None = None,
    corrupt_lengths: Int[torch.Tensor, " batch"] | None = None,
    reference_tokens: Int[torch.Tensor, "ref seq"] | None = None,
    reference_lengths: Int[torch.Tensor, " ref"] | None = None,
    named_positions: Sequence[Mapping[str, int]] | None = None,
    position_map: Int[torch.Tensor, "batch seq"] | None = None,
    batch_size: int = 64,
    union_size: int | None = None,
    control: Float[torch.Tensor, "batch n_nodes"] | None = None,
    control_name: str = "estimate",
) -> CertificationResult:
    """Upper confidence bound θ on the largest mean |Δm| any of ``nodes`` can have.

    ``nodes`` are the unverified ones; ``samples`` (S ≥ 2) random subsets,
    each node in each with probability ``p``, are patched (``mode`` as in
    :func:`exact_patch`, same inputs). With probability ≥ ``confidence``
    (under the module's assumptions: additive effects, normal differences of
    means) no node's mean |Δm| over the prompts exceeds θ. θ is infinite
    when some node was in, or out of, fewer than 2 subsets (raise S or move
    ``p`` towards 0.5). ``union_size``: how many (node, prompt) bounds the
    union bound covers (default: those not exactly zero here); a job cut into
    shards passes nodes × all its prompts, so every shard's bounds share it.

    ``control``: each (prompt, node)'s estimate, fixed before the draw (e.g.
    AtP*'s per-prompt scores of ``nodes``, NaN where absent), as a control
    variate: the bound is on the same quantity, with the spread of the
    estimator's errors in place of the spread of the other nodes' effects
    (``control_name`` is recorded in the result).
    """
    if samples < 2:
        raise AttributionInputError(f"samples must be at least 2, got {samples}")
    if not 0.0 < p < 1.0:
        raise AttributionInputError(f"p (inclusion probability) must be in (0, 1), got {p}")
    if not 0.0 < confidence < 1.0:
        raise AttributionInputError(f"confidence must be in (0, 1), got {confidence}")
    subsets = draw_subsets(len(nodes), samples, p, seed)
    delta_m, known_zero, undefined, rows = subset_patch(
        model, saes, clean_tokens, lengths, metric, answer, wrong, nodes, subsets,
        mode=mode, corrupt_tokens=corrupt_tokens, corrupt_lengths=corrupt_lengths,
        reference_tokens=reference_tokens, reference_lengths=reference_lengths,
        named_positions=named_positions, position_map=position_map, batch_size=batch_size,
    )  # fmt: skip
    sums = certification_sums(
        delta_m, subsets, known_zero, undefined, 1.0 - confidence, rows=rows,
        union_size=union_size, control=control,
    )  # fmt: skip
    return certification_result(
        nodes, sums, samples=samples, p=p, confidence=confidence, seed=seed, mode=mode,
        n_prompts=int(clean_tokens.shape[0]), control=None if control is None else control_name,
    )  # fmt: skip


def verify_until_certified(
    model: HookedSAETransformer,
    saes: SaeMap | None,
    clean_tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    ranked: Sequence[Node],
    *,
    top_k: int,
    samples: int,
    budget: int | None = None,
    p: float = 0.25,
    confidence: float = 0.95,
    seed: int = 0,
    corrupt_tokens: Int[torch.Tensor, "batch corrupt_seq"] | None = None,
    corrupt_lengths: Int[torch.Tensor, " batch"] | None = None,
    named_positions: Sequence[Mapping[str, int]] | None = None,
    position_map: Int[torch.Tensor, "batch seq"] | None = None,
    batch_size: int = 64,
) -> tuple[Float[torch.Tensor, "batch n_verified"], CertificationResult | None, AutoVerification]:
    """``verify_top_k: auto``: verify ``ranked`` (estimate order) ``top_k`` at a time until
    the bound on the rest is below the smallest exact mean |Δm| in the verified top-K.

    Returns (exact Δm of the verified nodes [prompts, verified], the last round's
    certification, what ended it). Each round certifies the unverified nodes
    (ordered by name, as a job does) at δ / R for the R rounds the budget allows,
    with the union over every (node, prompt) pair, as a job cut into shards does.
    """
    if not 0.0 < confidence < 1.0:
        raise AttributionInputError(f"confidence must be in (0, 1), got {confidence}")
    schedule = auto_schedule(len(ranked), top_k, budget)
    round_confidence = 1.0 - (1.0 - confidence) / len(schedule)
    n_prompts = int(clean_tokens.shape[0])
    parts: list[torch.Tensor] = []
    certification: CertificationResult | None = None
    stop, passes, done, rounds = None, 0, 0, 0
    for size in schedule:
        rounds += 1
        batch = list(ranked[done:size])
        parts.append(exact_patch(
            model, saes, clean_tokens, lengths, metric, answer, wrong, batch, mode="corrupt",
            corrupt_tokens=corrupt_tokens, corrupt_lengths=corrupt_lengths,
            named_positions=named_positions, position_map=position_map, batch_size=batch_size,
        ))  # fmt: skip
        passes += len(batch)
        done = size
        exact = torch.cat(parts, dim=1)
        smallest = smallest_top_effect(exact.abs().nanmean(0).nan_to_num(0.0).tolist(), top_k)
        rest = sorted(ranked[size:], key=str)
        certification = None
        if rest:
            certification = certify(
                model, saes, clean_tokens, lengths, metric, answer, wrong, rest,
                samples=samples, p=p, confidence=round_confidence, seed=seed,
                union_size=len(rest) * n_prompts, corrupt_tokens=corrupt_tokens,
                corrupt_lengths=corrupt_lengths, named_positions=named_positions,
                position_map=position_map, batch_size=batch_size,
            )  # fmt: skip
            passes += certification.forward_passes
        theta = None if certification is None else certification.theta
        stop = auto_stop(theta, smallest, size, len(ranked), schedule[-1])
        if stop is not None:
            break
    assert stop is not None  # the last round always ends it
    summary = AutoVerification(
        top_k=top_k, budget=schedule[-1], verified=done, rounds=rounds,
        max_rounds=len(schedule), stopped_by=stop,  # type: ignore[arg-type]
        smallest_top_effect=smallest, theta=theta, confidence=confidence,
        forward_passes=passes,
    )  # fmt: skip
    return torch.cat(parts, dim=1), certification, summary
