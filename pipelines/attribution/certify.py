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

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

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
from circuitscan.pipelines.attribution.node_kinds import ops
from circuitscan.pipelines.attribution.nodes import group_nodes
from circuitscan.pipelines.attribution.patching import (
    Edit,
    _record,
    _record_key,
    _sources,
    _unchanged,
)
from circuitscan.pipelines.attribution.positions import (
    UNDEFINED,
    remap_positions,
    resolve_positions,
)
from circuitscan.pipelines.attribution.recording import Recorder, build_hooks
from circuitscan.pipelines.attribution.suffix import (
    cache_residuals,
    reads_one_position,
    suffix_metric,
)
from circuitscan.pipelines.metrics import read_positions
from circuitscan.schemas.attribution import Node, PatchMode
from circuitscan.schemas.certification import CertificationResult, CertifiedNode
from circuitscan.schemas.metrics import MetricSpec

MAX_DF = 200  # t quantiles fall with df: capping it only widens the bound


def _t_two_sided_inside(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(2, df, 2):  # (1·3···(j−1))/(2·4···j) cos^j θ
            term *= c2 * (j - 1) / j
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term = math.cos(theta)
    total = term
    for j in range(3, df, 2):  # (2·4···(j−1))/(1·3···j) cos^j θ
        term *= c2 * (j - 1) / j
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


@functools.lru_cache(maxsize=4096)
def t_quantile_two_sided(tail: float, df: int) -> float:
    """The t with P(|T| > t) = ``tail`` for Student's t with ``df`` degrees of freedom."""
    if not 0.0 < tail < 1.0 or df < 1:
        raise AttributionInputError(f"t quantile needs tail in (0, 1) and df ≥ 1: {tail}, {df}")
    lo, hi = 0.0, 1.0
    while 1.0 - _t_two_sided_inside(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - _t_two_sided_inside(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def draw_subsets(n_nodes: int, samples: int, p: float, seed: int) -> Bool[torch.Tensor, "S n"]:
    """Row s: which nodes subset s patches (each independently with probability ``p``)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((samples, n_nodes), generator=generator, dtype=torch.float64) < p


def subset_bounds(
    delta_m: Float[torch.Tensor, "S batch"],
    subsets: Bool[torch.Tensor, "S n"],
    known_zero: Bool[torch.Tensor, "batch n"],
    undefined: Bool[torch.Tensor, "batch n"],
    delta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (prompt, node): difference-of-means estimate and its Bonferroni upper bound on |c|.

    Returns (estimate, upper, counted) as [batch, n]; ``upper`` is inf where a
    node was in (or out of) fewer than 2 subsets, NaN where undefined.
    """
    y = delta_m.to(torch.float64)
    inside = subsets.to(torch.float64)
    n_in = inside.sum(0)  # [n]
    n_out = subsets.shape[0] - n_in
    counted = ~(known_zero | undefined)
    m_pairs = max(int(counted.sum()), 1)
    tail = delta / m_pairs
    batch, n = known_zero.shape
    estimate = torch.zeros(batch, n, dtype=torch.float64)
    enough = (n_in >= 2) & (n_out >= 2)
    safe_in, safe_out = n_in.clamp(min=1), n_out.clamp(min=1)
    se = torch.zeros(batch, n, dtype=torch.float64)
    dfs = torch.zeros(batch, n, dtype=torch.long)
    for b in range(batch):
        yb = y[:, b : b + 1]  # [S, 1]
        mean_in = (inside * yb).sum(0) / safe_in
        mean_out = ((1 - inside) * yb).sum(0) / safe_out
        # Centred sums of squares (not Σy² − (Σy)²/n) so constant groups give exactly 0.
        ss_in = (inside * (yb - mean_in) ** 2).sum(0)
        ss_out = ((1 - inside) * (yb - mean_out) ** 2).sum(0)
        var_in = ss_in / (n_in - 1).clamp(min=1) / safe_in  # variance of the mean
        var_out = ss_out / (n_out - 1).clamp(min=1) / safe_out
        se[b] = (var_in + var_out).sqrt()
        estimate[b] = mean_in - mean_out
        dfs[b] = _welch_df(var_in, var_out, n_in, n_out)
    # One t quantile per distinct df (few: capped at MAX_DF), looked up per pair.
    quantiles = torch.zeros(MAX_DF + 1, dtype=torch.float64)
    for df in torch.unique(dfs).tolist():
        quantiles[df] = t_quantile_two_sided(tail, int(df))
    bounded = enough[None, :] & counted
    upper = torch.where(bounded, estimate.abs() + quantiles[dfs] * se, math.inf)
    estimate[known_zero] = 0.0
    upper[known_zero] = 0.0
    estimate[undefined] = float("nan")
    upper[undefined] = float("nan")
    return estimate, upper, counted


def _welch_df(
    var_in: torch.Tensor, var_out: torch.Tensor, n_in: torch.Tensor, n_out: torch.Tensor
) -> torch.Tensor:
    """Welch–Satterthwaite degrees of freedom of each difference of means, rounded down.

    In 1..MAX_DF; MAX_DF where there is no spread at all (the quantile then
    multiplies a zero standard error) or a group is too small to have any.
    """
    total = var_in + var_out
    denom = var_in**2 / (n_in - 1).clamp(min=1) + var_out**2 / (n_out - 1).clamp(min=1)
    df = torch.where(denom > 0, total**2 / denom.clamp(min=torch.finfo(total.dtype).tiny), MAX_DF)
    return df.floor().clamp(1, MAX_DF).long()


def _subset_edits(
    nodes: Sequence[Node],
    sources: Mapping[tuple[str, str], torch.Tensor],
    mode: PatchMode,
    entry_row: torch.Tensor,
    entry_prompt: torch.Tensor,
    entry_node: torch.Tensor,
    entry_pos: torch.Tensor,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Edit functions per hook name for a chunk in which a row patches several nodes.

    Entry e patches node ``entry_node[e]`` of prompt ``entry_prompt[e]`` into
    chunk row ``entry_row[e]``: exact patching's edits, with rows and nodes
    decoupled (there, row r patches node r).
    """
    raw: dict[str, list[Edit]] = {}
    sae: dict[str, list[Edit]] = {}
    for (kind, _, _), members in group_nodes(nodes).items():
        picked = torch.nonzero(torch.isin(entry_node, torch.tensor(members))).flatten()
        if picked.numel() == 0:
            continue
        row = ops(kind)
        units = torch.tensor([nodes[int(entry_node[e])].index or 0 for e in picked])
        key = _record_key(nodes[members[0]])
        src = sources.get(key)
        value: torch.Tensor | None = None
        if src is not None and mode == "mean":
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
                row.put(x, rows, at, units, new)
        return x

    raw_edits = {name: (lambda x, e=entries: apply(x, e, "act")) for name, entries in raw.items()}
    sae_edits = {
        name: (lambda a, err, e=entries: (apply(a, e, "feat"), apply(err, e, "err")))
        for name, entries in sae.items()
    }
    return raw_edits, sae_edits


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
        for layer, members in itertools.groupby(rows, key=lambda row: row[0]):
            layer_rows = list(members)
            for begin in range(0, len(layer_rows), batch_size):
                chunk = layer_rows[begin : begin + batch_size]
                subset_ix = torch.tensor([s for _, s, _ in chunk])
                prompt = torch.tensor([b for _, _, b in chunk])
                chosen = subsets[subset_ix] & active[prompt]  # [rows, n]
                entry_row, entry_node = torch.nonzero(chosen, as_tuple=True)
                entry_prompt = prompt[entry_row]
                raw_edits, sae_edits = _subset_edits(
                    nodes, sources, mode, entry_row, entry_prompt, entry_node,
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
) -> CertificationResult:
    """Upper confidence bound θ on the largest mean |Δm| any of ``nodes`` can have.

    ``nodes`` are the unverified ones; ``samples`` (S ≥ 2) random subsets,
    each node in each with probability ``p``, are patched (``mode`` as in
    :func:`exact_patch`, same inputs). With probability ≥ ``confidence``
    (under the module's assumptions: additive effects, normal differences of
    means) no node's mean |Δm| over the prompts exceeds θ. θ is infinite
    when some node was in, or out of, fewer than 2 subsets (raise S or move
    ``p`` towards 0.5).
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
    delta = 1.0 - confidence
    estimate, upper, _ = subset_bounds(delta_m, subsets, known_zero, undefined, delta)
    node_est = estimate.nanmean(0)
    node_abs = estimate.abs().nanmean(0)
    node_upper = upper.nanmean(0)  # inf stays inf: an unbounded prompt leaves the node unbounded
    included = subsets.sum(0)
    scored = [
        CertifiedNode(
            node=str(nodes[j]),
            estimate=float(node_est[j]),
            estimate_abs=float(node_abs[j]),
            upper=float(node_upper[j]),
            included=int(included[j]),
        )
        for j in range(len(nodes))
    ]
    order = sorted(range(len(nodes)), key=lambda j: (-float(node_upper[j]), j))
    closest = max(range(len(nodes)), key=lambda j: (float(node_abs[j]), -j))
    return CertificationResult(
        theta=float(node_upper.max()),
        samples=samples,
        p=p,
        confidence=confidence,
        delta=delta,
        seed=seed,
        mode=mode,
        n_nodes=len(nodes),
        n_prompts=int(clean_tokens.shape[0]),
        forward_passes=samples,
        patched_rows=rows,
        closest_node=str(nodes[closest]),
        binding_node=str(nodes[order[0]]),
        nodes=[scored[j] for j in order],
    )
