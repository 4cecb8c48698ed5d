"""Pair-level targeted ablation scans (``candidates.granularity: pair``).

A feature-level targeted scan must ablate a feature on every prompt where it
is active before it can report it, so its count can never fall below the
top-K's own active pairs. Most of a feature's mean |Δm| comes from a few
prompts, though, and the cache estimates each (prompt, feature) pair on its
own (the prompt's −Σ a·∂m/∂a at the positions, or its AtP term). Here a
candidate is a pair, and a feature's reported mean Δm (and |Δm|) is the exact
Δm of its ablated pairs plus the estimate of its others, over all prompts
(FeatureDelta.n_exact: how many are exact).

The bound. An estimated pair's |Δm| is taken to lie within [lo, hi] × its
|estimate|: ``gap`` g gives [1/g, g]; ``gap: auto`` the smallest and largest
Σ|exact| / Σ|estimate| over each feature's ablated pairs, once at least K
features have one ([0, ∞) before). A feature's Σ|Δm| then lies in [exact part
+ lo × estimated part, exact part + hi × estimated part]. The top-K is settled
when every top-K feature's lower end reaches every other feature's upper end;
with whole features and lo = 0 this is the feature-level gap rule.

Rounds. Each round ablates the ``round_size`` largest-|estimate| pairs left
among the features still unsettled (a top-K feature whose lower end is below
some outsider's upper end, or an outsider whose upper end is above some top-K
feature's lower end), so exact work goes where the ranking is still in doubt.
Within a feature pairs are ablated largest |estimate| first (ties by prompt),
so a feature's exact pairs are its ``n_exact`` largest-|estimate| prompts.

Stopping, checked pair by pair: ``gap``: the top-K by reported mean |Δm| has
not changed for ``patience`` further pairs and is settled; ``budget`` pairs
spent; or every pair ablated. Patience alone is no stop here: the first top-K
comes from the estimates, and the largest pairs need not touch the features
that would reorder it (on the tiny test model patience alone stopped after 12
pairs with the wrong top 3), so a pair-level scan needs ``gap``. Nor is the
bound a guarantee: "auto" learns its range from the pairs ablated so far, the
largest ones, whose estimates are the best (on the tiny test model, with
patience 4 the range seen on its first 8 pairs, [0.95, 1.07], settled a wrong
top 3; with patience 20 it stopped after 40 of 165 pairs with the right one).
A per-pair range (smallest and largest |exact| / |estimate| of single pairs)
would be safer and spend more: 0.42 of the full scan on the benchmark's 64
prompts against 0.19 for the per-feature one, both recovering its top 10.

A round's pairs run as exact ablations on the actors, one call per shard and
set of features sharing the same prompts there (ablate_features on just those
prompts), so only the chosen pairs are ablated. Each pair's Δm is the full
scan's computation for that (prompt, feature): the same value, up to the
float rounding of a different batch (none in float64).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from circuitscan.schemas.job_results import FeatureDelta
from circuitscan.schemas.jobs import AblationScanParams
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.targeted_scan import StopRule, TargetedScan
from circuitscan.services.jobs.kinds.targeted_scan import Estimates
from circuitscan.services.jobs.planning import ShardPlan

# (pair indices into the estimate arrays) → (their exact Δm, ablations run)
ExactFn = Callable[[np.ndarray], tuple[np.ndarray, int]]


@dataclass
class PairScan:
    """Where a pair-level scan stopped: every pair's exact Δm (NaN: estimated)."""

    exact: np.ndarray  # float64 [pair], in the estimates' pair order
    n_ablations: int
    info: TargetedScan


def pair_order(estimates: Estimates) -> np.ndarray:
    """Pair indices, largest |estimate| first, ties by prompt then feature."""
    assert estimates.pair_estimate is not None and estimates.pair_prompt is not None
    assert estimates.pair_feature is not None
    return np.lexsort(
        (estimates.pair_feature, estimates.pair_prompt, -np.abs(estimates.pair_estimate))
    )


class _Tally:
    """Per feature: the exact part, the estimated part and the top-K they give."""

    def __init__(self, estimates: Estimates, top_k: int):
        assert estimates.pair_feature is not None and estimates.pair_estimate is not None
        self.features = np.flatnonzero(estimates.pairs > 0)
        self.slot = np.full(estimates.pairs.shape[0], -1, dtype=np.int64)
        self.slot[self.features] = np.arange(self.features.shape[0])
        size = self.features.shape[0]
        pair_slot = self.slot[estimates.pair_feature]
        value = estimates.pair_estimate
        self.rest = np.bincount(pair_slot, weights=value, minlength=size)
        self.rest_abs = np.bincount(pair_slot, weights=np.abs(value), minlength=size)
        self.exact = np.zeros(size)
        self.exact_abs = np.zeros(size)
        self.ablated_estimate_abs = np.zeros(size)  # Σ|estimate| of the ablated pairs
        self.n_exact = np.zeros(size, dtype=np.int64)
        self.nonzero = np.zeros(size, dtype=np.int64)
        self.top_k = min(top_k, size)

    def add(self, slot: int, estimate: float, exact: float) -> None:
        self.rest[slot] -= estimate
        self.rest_abs[slot] -= abs(estimate)
        self.exact[slot] += exact
        self.exact_abs[slot] += abs(exact)
        self.ablated_estimate_abs[slot] += abs(estimate)
        self.n_exact[slot] += 1
        self.nonzero[slot] += exact != 0

    def reported_abs(self) -> np.ndarray:
        # rest_abs is a running difference: clamp its float residue at 0 once all are exact.
        return self.exact_abs + np.maximum(self.rest_abs, 0.0)

    def top(self) -> np.ndarray:
        """Slots of the top-K by reported Σ|Δm| (ties: smaller feature id), as a sorted array."""
        order = np.lexsort((self.features, -self.reported_abs()))
        return np.sort(order[: self.top_k])

    def ratios(self, gap: float | str) -> tuple[float, float]:
        """The range an estimated pair's |Δm| / |estimate| is taken to lie in (module
        docstring): ``gap`` g gives [1/g, g]; "auto" the smallest and largest Σ|exact| /
        Σ|estimate| over each feature's ablated pairs ([0, ∞) until K features have one,
        or when an ablated effect was estimated at 0)."""
        if not isinstance(gap, str):
            return 1.0 / float(gap), float(gap)
        seen = self.n_exact > 0
        if int(seen.sum()) < self.top_k:
            # A range seen on fewer features than the top-K it guards is no range: the
            # first pairs mostly belong to one or two features (on the default model the
            # first 16 were one feature's, a range of one value that "settled" a wrong
            # top 10).
            return 0.0, float("inf")
        if bool((seen & (self.ablated_estimate_abs == 0) & (self.exact_abs > 0)).any()):
            return 0.0, float("inf")
        usable = seen & (self.ablated_estimate_abs > 0)
        if not usable.any():
            return 0.0, float("inf")
        ratio = self.exact_abs[usable] / self.ablated_estimate_abs[usable]
        return float(ratio.min()), float(ratio.max())

    def unsettled(self, top: np.ndarray, ratios: tuple[float, float]) -> np.ndarray:
        """Slots whose bounds still cross the top-K's boundary (none: the bound holds). A
        top-K feature is unsettled while its lower end is below some outsider's upper end,
        an outsider while its upper end is above some top-K feature's lower end."""
        size = self.features.shape[0]
        if top.shape[0] in (0, size):
            return np.zeros(0, dtype=np.int64)
        rest = np.maximum(self.rest_abs, 0.0)
        with np.errstate(invalid="ignore"):  # ∞ × 0 for a feature with nothing estimated
            low = self.exact_abs + np.nan_to_num(ratios[0] * rest)
            high = self.exact_abs + np.where(rest > 0, ratios[1] * rest, 0.0)
        inside = np.zeros(size, dtype=bool)
        inside[top] = True
        floor, ceiling = float(low[inside].min()), float(high[~inside].max())
        if floor >= ceiling:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero((inside & (low < ceiling)) | (~inside & (high > floor)))


def run_pairs(params: AblationScanParams, estimates: Estimates, exact_of: ExactFn) -> PairScan:
    """Ablate pairs round by round (``exact_of`` runs a round) until a stopping rule fires."""
    candidates = params.candidates
    assert candidates is not None and candidates.gap is not None  # refused without a gap
    assert estimates.pair_estimate is not None and estimates.pair_feature is not None
    order = pair_order(estimates)
    tally = _Tally(estimates, candidates.top_k)
    pair_slot = tally.slot[estimates.pair_feature]
    exact = np.full(order.shape[0], np.nan)
    limit = min(order.shape[0], candidates.budget or order.shape[0])
    top = tally.top()
    ratios = tally.ratios(candidates.gap)
    unsettled = tally.unsettled(top, ratios)
    checked, last_change, stopped_after, n_ablations = 0, 0, 0, 0
    rule: StopRule = "exhausted"
    while checked < limit and not stopped_after:
        # The round: the largest-|estimate| pairs left of the features still unsettled
        # (every pair left once none is, or none of them has a pair left).
        left = order[np.isnan(exact[order])]
        wanted = left[np.isin(pair_slot[left], unsettled)]
        pool = wanted if wanted.shape[0] else left
        chunk = pool[: min(candidates.round_size, limit - checked)]
        values, ran = exact_of(chunk)
        exact[chunk] = values
        n_ablations += ran
        for pair, value in zip(chunk.tolist(), values.tolist(), strict=True):
            checked += 1
            tally.add(int(pair_slot[pair]), float(estimates.pair_estimate[pair]), value)
            now = tally.top()
            if not np.array_equal(now, top):
                top, last_change = now, checked
            ratios = tally.ratios(candidates.gap)
            unsettled = tally.unsettled(top, ratios)
            if (
                checked - last_change >= candidates.patience
                and checked < order.shape[0]
                and unsettled.shape[0] == 0
            ):
                stopped_after, rule = checked, "gap"
            elif candidates.budget is not None and checked >= candidates.budget:
                stopped_after, rule = checked, "budget"
            if stopped_after:
                break
    full = int(estimates.pairs.sum())
    info = TargetedScan(
        store=candidates.store,
        top_k=candidates.top_k,
        patience=candidates.patience,
        budget=candidates.budget,
        n_candidates=int(order.shape[0]),
        n_ablated=int((~np.isnan(exact)).sum()),
        stopped_after=stopped_after or checked,
        stop_rule=rule,
        gap=candidates.gap,
        gap_ratio=ratios[1] if np.isfinite(ratios[1]) else None,
        gap_ratio_low=ratios[0] if np.isfinite(ratios[1]) else None,
        full_scan_ablations=full,
        ablation_fraction=n_ablations / full if full else 0.0,
        granularity="pair",
    )
    return PairScan(exact=exact, n_ablations=n_ablations, info=info)


def shard_calls(
    chunk: np.ndarray, estimates: Estimates, plans: list[ShardPlan], kept: Sequence[PromptRecord]
) -> tuple[list[tuple[Any, ...]], list[list[tuple[int, int, int]]]]:
    """A round's ablate_features calls: per shard, one per set of features ablated on the
    same prompts there. Beside each call: (pair, row, column) of every pair it answers."""
    assert estimates.pair_prompt is not None and estimates.pair_feature is not None
    starts = np.array([plan.start for plan in plans])
    prompts_of: dict[tuple[int, int], list[int]] = defaultdict(list)  # (shard, feature) → pairs
    for pair in chunk.tolist():
        prompt = int(estimates.pair_prompt[pair])
        shard = int(np.searchsorted(starts, prompt, side="right")) - 1
        prompts_of[(shard, int(estimates.pair_feature[pair]))].append(pair)
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
    for (shard, feature), pairs in sorted(prompts_of.items()):
        prompts = tuple(sorted(int(estimates.pair_prompt[p]) for p in pairs))
        groups[(shard, prompts)].append(feature)
    calls: list[tuple[Any, ...]] = []
    answers: list[list[tuple[int, int, int]]] = []
    for (shard, prompts), features in groups.items():
        calls.append(([kept[p] for p in prompts], features, plans[shard].shard_id))
        row = {p: r for r, p in enumerate(prompts)}
        answers.append(
            [
                (pair, row[int(estimates.pair_prompt[pair])], column)
                for column, feature in enumerate(features)
                for pair in prompts_of[(shard, feature)]
            ]
        )
    return calls, answers


def actor_rounds(
    estimates: Estimates,
    plans: list[ShardPlan],
    kept: Sequence[PromptRecord],
    fan_out: Callable[[str, list[tuple[Any, ...]]], list[Any]],
    say: Callable[[str], None],
) -> ExactFn:
    """``exact_of`` for :func:`run_pairs`: each round's pairs ablated on the job's actors."""
    total = 0 if estimates.pair_estimate is None else estimates.pair_estimate.shape[0]
    done = [0]

    def exact_of(chunk: np.ndarray) -> tuple[np.ndarray, int]:
        calls, answers = shard_calls(chunk, estimates, plans, kept)
        parts = fan_out("ablate_features", calls)
        where = {int(pair): i for i, pair in enumerate(chunk.tolist())}
        values = np.zeros(chunk.shape[0])
        ran = 0
        for part, answered, call in zip(parts, answers, calls, strict=True):
            ran += part.scan.n_ablations
            dense = np.nan_to_num(part.dense_delta())
            # The partial's columns are the features it found active (sorted): map by id.
            column_of = {int(f): c for c, f in enumerate(part.features.tolist())}
            for pair, row, column in answered:
                feature = int(call[1][column])
                if feature in column_of:  # else inactive on the model's side: Δm exactly 0
                    values[where[pair]] = float(dense[row, column_of[feature]])
        done[0] += chunk.shape[0]
        say(f"targeted scan: {done[0]} of {total} pairs ablated")
        return values, ran

    return exact_of


def pair_features(site: str, estimates: Estimates, scan: PairScan) -> list[FeatureDelta]:
    """Every candidate feature's reported means: exact pairs plus estimated ones, over all
    prompts, largest mean |Δm| first."""
    assert estimates.pair_feature is not None and estimates.pair_estimate is not None
    n = max(estimates.n_prompts, 1)
    d_sae = estimates.pairs.shape[0]
    done = ~np.isnan(scan.exact)
    value = np.where(done, scan.exact, estimates.pair_estimate)
    feature = estimates.pair_feature
    total = np.bincount(feature, weights=value, minlength=d_sae)
    total_abs = np.bincount(feature, weights=np.abs(value), minlength=d_sae)
    n_exact = np.bincount(feature[done], minlength=d_sae)
    moved = np.bincount(feature, weights=(~done | (value != 0)).astype(float), minlength=d_sae)
    out = [
        FeatureDelta(
            site=site,
            feature=int(f),
            mean_delta=float(total[f]) / n,
            mean_abs_delta=float(total_abs[f]) / n,
            n_prompts=estimates.n_prompts,
            n_active=int(moved[f]),
            estimate_mean=float(estimates.total[f]) / n,
            estimate_mean_abs=float(estimates.total_abs[f]) / n,
            n_exact=int(n_exact[f]),
        )
        for f in np.flatnonzero(estimates.pairs > 0).tolist()
    ]
    out.sort(key=lambda f: (-f.mean_abs_delta, f.feature))
    return out


def baseline_mean(
    partials: Sequence[Any],
    plans: list[ShardPlan],
    kept: Sequence[PromptRecord],
    fan_out: Callable[[str, list[tuple[Any, ...]]], list[Any]],
) -> float:
    """The clean metric's mean over the prompts: from the shard phase's partials (each shard
    measured its baseline), or, without them, one ablation-free pass per shard."""
    if sum(int(part.baseline.shape[0]) for part in partials) != len(kept):
        partials = fan_out(
            "ablate_features", [(kept[p.start : p.stop], [], p.shard_id) for p in plans]
        )
    total = sum(float(part.baseline.sum()) for part in partials)
    return total / len(kept) if kept else float("nan")
