"""Targeted ablation scans: candidates from a cache store, ablated exactly in estimated order.

A cache store with gradients holds, for every stored (token, feature) entry,
``a`` and ``g = ∂m/∂a``; ``−a·g`` is the linear estimate of zero-ablating
that feature there. Summed over the entries at the scan's positions of one
prompt it estimates the prompt's Δm, so the cache ranks every feature the
full scan would ablate, with no model pass (:func:`cache_estimates`). The
driver then ablates candidates exactly in that order, ``round_size`` at a
time, each round fanned out to the actors over the job's prompt shards, and
stops when the exact top-K by mean |Δm| has not changed for ``patience``
further candidates, or (``gap``) once the exact K-th largest mean |Δm| is at
least ``gap`` × the next candidate's estimated mean |Δm| ("auto": the largest
exact / estimated ratio seen among the ablated candidates), or ``budget``
candidates are spent (:func:`run_rounds`). Both stops are heuristics stated in
the result; neither changes a value: a feature is ablated on every prompt
where it is active or not at all.
Each ablated feature's Δm rows are the full scan's own computation, so its
exact values are the full scan's.

``mode: corrupted`` (a paired cache, docs/paired_caches.md) patches each
candidate to its activation on the prompt's corrupted version at the paired
position instead. Its estimate is the AtP term ``(a′ − a)·g``: the cache's
corrupted entries ``a′·g`` minus its clean entries ``a·g`` at the scan's
positions, prompt by prompt, over the (prompt, feature) pairs whose stored
``a′`` differs from ``a`` (the pairs a full corrupted scan patches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from circuitscan.schemas.job_results import AblationJobResult
from circuitscan.schemas.jobs import AblationScanParams, JobSpec, ScanCandidates
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.targeted_scan import StopRule, TargetedScan
from circuitscan.services.jobs.job_kind import KindCheckError, MergeContext
from circuitscan.services.jobs.planning import ShardPlan


@dataclass
class Estimates:
    """Per feature of the scanned site, the cache's zero-ablation estimate over the prompts."""

    total: np.ndarray  # float64 [d_sae]: Σ over prompts of −Σ_positions a·g
    total_abs: np.ndarray  # float64 [d_sae]: Σ over prompts of |−Σ_positions a·g|
    pairs: np.ndarray  # int64 [d_sae]: prompts where the feature is stored at the positions
    n_prompts: int
    # keep_pairs: every (prompt, feature) pair counted in ``pairs``, with its estimate
    # (the prompt's own −Σ_positions a·g, or AtP term), prompts numbered across the shards.
    pair_prompt: np.ndarray | None = None  # int64 [pair]
    pair_feature: np.ndarray | None = None  # int64 [pair]
    pair_estimate: np.ndarray | None = None  # float64 [pair]

    def order(self) -> list[int]:
        """Candidates: every feature with a stored entry, largest estimated mean |Δm| first."""
        present = np.flatnonzero(self.pairs > 0)
        return present[np.lexsort((present, -self.total_abs[present]))].tolist()


def _open_cache(url: str) -> Any:
    from circuitscan.services.store import FeatureStore, StoreError

    try:
        return FeatureStore.open(url)
    except StoreError as exc:
        raise KindCheckError(f"candidates store: {exc}") from exc


def check_cache(spec: JobSpec, site: str, sae_fingerprint: str, model_fingerprint: str) -> None:
    """Refuse a candidates store that cannot rank this scan's features (before any work)."""
    assert isinstance(spec.job, AblationScanParams) and spec.job.candidates is not None
    url = spec.job.candidates.store
    store = _open_cache(url)
    layout = store.layout
    labels = [s.label for s in layout.sites]
    if site not in labels:
        raise KindCheckError(
            f"candidates store {url} has no site {site!r} (it caches {labels or 'no sites'})"
        )
    if not layout.gradients:
        raise KindCheckError(
            f"candidates store {url} keeps no gradients, so it has no estimate −a·∂m/∂a to "
            "rank features by: cache the prompts with gradients: true"
        )
    if spec.job.mode == "corrupted":
        if layout.pairing is None:
            raise KindCheckError(
                f"candidates store {url} is a plain cache (no corrupted activations), so it has "
                "no AtP term (a′ − a)·∂m/∂a to rank a corrupted scan by: cache the prompts with "
                "paired: true"
            )
        if layout.pairing.align != spec.job.align:
            raise KindCheckError(
                f"candidates store {url} pairs clean and corrupted positions with align: "
                f"{layout.pairing.align}, this scan with align: {spec.job.align}"
            )
    cached = layout.site(site).sae_fingerprint
    if cached and sae_fingerprint and cached != sae_fingerprint:
        raise KindCheckError(f"candidates store {url} was cached with another SAE at {site}")
    if (
        layout.model_fingerprint
        and model_fingerprint
        and layout.model_fingerprint != model_fingerprint
    ):
        raise KindCheckError(f"candidates store {url} was cached with another model")
    metric = (layout.job_spec or {}).get("metric")
    if metric is not None and metric != spec.metric.model_dump(mode="json"):
        raise KindCheckError(
            f"candidates store {url} holds gradients of metric {metric}, this scan measures "
            f"{spec.metric.model_dump(mode='json')}"
        )


def check_cache_prompts(
    candidates: ScanCandidates, records: Sequence[PromptRecord], corrupted: bool = False
) -> None:
    """The cache must hold exactly the scan's prompts (``corrupted``: and their corrupted
    texts), in order, in committed shards."""
    store = _open_cache(candidates.store)
    entries = store.committed_entries()
    n_cached = sum(entry.n_prompts for entry in entries.values())
    if n_cached != store.n_prompts():
        raise KindCheckError(
            f"candidates store {candidates.store} is not finished (shards missing below prompt "
            f"{store.n_prompts()}): resume its cache job first"
        )
    if n_cached != len(records):
        raise KindCheckError(
            f"candidates store {candidates.store} holds {n_cached} prompts, this scan has "
            f"{len(records)}: cache the scan's own prompts"
        )
    for shard_id in sorted(entries):
        start = entries[shard_id].prompt_start
        for offset, cached in enumerate(store.prompt_records(shard_id)):
            record = records[start + offset]
            if cached.text != record.text:
                raise KindCheckError(
                    f"candidates store {candidates.store} holds other prompts than this scan "
                    f"(prompt {start + offset} differs): cache the scan's own prompts"
                )
            if corrupted and cached.corrupted != record.corrupted:
                raise KindCheckError(
                    f"candidates store {candidates.store} holds another corrupted version of "
                    f"prompt {start + offset} than this scan: cache the scan's own pairs"
                )


def _chosen(record: PromptRecord, length: int, positions: str | list[str]) -> np.ndarray:
    """Positions of one prompt the scan ablates at (as the scan resolves them)."""
    if positions == "all":
        return np.arange(length)
    names = ["last"] if positions == "last" else list(positions)
    out = []
    for name in names:
        if name == "last":
            out.append(length - 1)
        elif name in record.positions:
            out.append(record.positions[name])
    return np.unique(np.array(out, dtype=np.int64))


def cache_estimates(
    candidates: ScanCandidates,
    site: str,
    positions: str | list[str],
    mode: str = "zero",
    keep_pairs: bool = False,
) -> Estimates:
    """Every feature's linear estimate of its ablation at the positions, from the cache's shards.

    zero: −a·g over the clean entries; corrupted: the AtP term, a′·g over the
    corrupted entries minus a·g over the clean ones. Read shard by shard
    (memory bounded by a shard); per prompt the terms are summed over the
    chosen positions before the magnitude is taken, as one ablation covers all
    of a prompt's chosen positions. A (prompt, feature) pair counts when the
    ablation changes the feature at one of them (zero: it is stored, so active;
    corrupted: its stored a′ differs from a). ``keep_pairs`` also returns every
    pair's own estimate (a pair-level scan's candidates).
    """
    store = _open_cache(candidates.store)
    d_sae = store.layout.site(site).d_sae
    total, total_abs = np.zeros(d_sae), np.zeros(d_sae)
    pairs = np.zeros(d_sae, dtype=np.int64)
    n_prompts = 0
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for shard_id, entry in sorted(store.committed_entries().items()):
        data = store.site_shard(shard_id, site)
        offsets = store.prompt_shard(shard_id).prompt_offsets
        records = store.prompt_records(shard_id)
        lengths = np.diff(offsets).astype(np.int64)
        n_tokens = int(lengths.sum())
        chosen = np.zeros(n_tokens, dtype=bool)
        for local, record in enumerate(records):
            chosen[offsets[local] + _chosen(record, int(lengths[local]), positions)] = True
        token_prompt = np.repeat(np.arange(len(lengths)), lengths)
        assert data.gradients is not None
        # (token, feature, a·g term, change of the feature's value) of every entry.
        sides = [(data.token_offsets, data.feature_ids, data.activations, data.gradients, -1.0)]
        if mode == "corrupted":
            c = store.paired_site_shard(shard_id, site)
            sides.append((c.token_offsets, c.feature_ids, c.activations, c.gradients, 1.0))
        keys, terms, changes = [], [], []
        for token_offsets, ids, acts, grads, sign in sides:
            token = np.repeat(np.arange(n_tokens), np.diff(token_offsets))
            keep = chosen[token]
            value = acts[keep].astype(np.float64)
            keys.append(token[keep] * d_sae + ids[keep].astype(np.int64))
            terms.append(sign * value * grads[keep])
            changes.append(sign * value)
        unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        term = np.bincount(inverse, weights=np.concatenate(terms), minlength=len(unique))
        # float16 values widened to float64 subtract exactly: a′ = a gives exactly 0.
        change = np.bincount(inverse, weights=np.concatenate(changes), minlength=len(unique))
        moved = change != 0
        pair_key = token_prompt[unique[moved] // d_sae] * d_sae + unique[moved] % d_sae
        pair_unique, pair_inverse = np.unique(pair_key, return_inverse=True)
        per_pair = np.bincount(pair_inverse, weights=term[moved], minlength=len(pair_unique))
        pair_feature = pair_unique % d_sae
        total += np.bincount(pair_feature, weights=per_pair, minlength=d_sae)
        total_abs += np.bincount(pair_feature, weights=np.abs(per_pair), minlength=d_sae)
        pairs += np.bincount(pair_feature, minlength=d_sae)
        if keep_pairs:
            kept.append((n_prompts + pair_unique // d_sae, pair_feature, per_pair))
        n_prompts += entry.n_prompts
    estimates = Estimates(total=total, total_abs=total_abs, pairs=pairs, n_prompts=n_prompts)
    if keep_pairs:
        joined = [np.concatenate(part) if kept else np.zeros(0) for part in zip(*kept, strict=True)]
        if not kept:
            joined = [np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)]
        estimates.pair_prompt = joined[0].astype(np.int64)
        estimates.pair_feature = joined[1].astype(np.int64)
        estimates.pair_estimate = joined[2].astype(np.float64)
    return estimates


def _top(mean_abs: dict[int, float], k: int) -> set[int]:
    return set(sorted(mean_abs, key=lambda f: (-mean_abs[f], f))[:k])


def _kth(mean_abs: dict[int, float], k: int) -> float:
    """The k-th largest exact mean |Δm| so far (0 with fewer than k candidates)."""
    values = sorted(mean_abs.values(), reverse=True)
    return values[k - 1] if len(values) >= k else 0.0


def _gap_ratio(gap: float | str, mean_abs: dict[int, float], estimates: Estimates) -> float:
    """The gap rule's factor: ``gap`` itself, or for "auto" the largest exact / estimated
    mean |Δm| over the candidates ablated so far (the worst underestimate seen; infinite
    when an ablated candidate with a non-zero effect was estimated at 0, so it never stops).
    """
    if not isinstance(gap, str):
        return float(gap)
    n = max(estimates.n_prompts, 1)
    worst = 0.0
    for feature, exact in mean_abs.items():
        estimate = float(estimates.total_abs[feature]) / n
        if estimate > 0:
            worst = max(worst, exact / estimate)
        elif exact > 0:
            return float("inf")
    return worst


def run_rounds(
    params: AblationScanParams,
    estimates: Estimates,
    plans: list[ShardPlan],
    kept: list[PromptRecord],
    fan_out: Callable[[str, list[tuple[Any, ...]]], list[Any]],
    say: Callable[[str], None],
) -> tuple[list[Any], TargetedScan]:
    """Ablate candidates round by round until the stopping rule fires.

    Returns one partial per shard holding every ablated feature's Δm column
    (the rounds' columns side by side) and how the scan stopped.
    """
    from circuitscan.services.jobs.kinds.ablation_scan import AblationPartial, ScanInfo

    candidates = params.candidates
    assert candidates is not None
    order = estimates.order()
    limit = min(len(order), candidates.budget or len(order))
    columns: list[list[Any]] = [[] for _ in plans]
    mean_abs: dict[int, float] = {}
    top: set[int] = set()
    ablated, checked, last_change, stopped_after = 0, 0, 0, 0
    rule: StopRule = "exhausted"
    n = max(estimates.n_prompts, 1)
    ratio: float | None = None
    while ablated < limit and not stopped_after:
        chunk = order[ablated : min(ablated + candidates.round_size, limit)]
        calls = [(kept[p.start : p.stop], chunk, p.shard_id) for p in plans]
        parts = fan_out("ablate_features", calls)
        ablated += len(chunk)
        sums = dict.fromkeys(chunk, 0.0)
        for shard, part in enumerate(parts):
            columns[shard].append(part)
            dense = np.abs(np.nan_to_num(part.dense_delta()))
            for column, feature in enumerate(part.features.tolist()):
                sums[feature] += float(dense[:, column].sum())
        for feature in chunk:  # the rule is checked candidate by candidate, in order
            checked += 1
            mean_abs[feature] = sums[feature] / max(estimates.n_prompts, 1)
            now = _top(mean_abs, candidates.top_k)
            if now != top:
                top, last_change = now, checked
            if candidates.gap is not None and checked >= candidates.top_k:
                ratio = _gap_ratio(candidates.gap, mean_abs, estimates)
            if checked >= candidates.top_k and checked - last_change >= candidates.patience:
                stopped_after, rule = checked, "patience"
            elif (
                ratio is not None
                and checked < len(order)
                and _kth(mean_abs, candidates.top_k)
                >= ratio * float(estimates.total_abs[order[checked]]) / n
            ):
                # The candidates are in estimate order: the next one has the largest
                # estimate left, so none left is expected to reach the exact top-K.
                stopped_after, rule = checked, "gap"
            elif candidates.budget is not None and checked >= candidates.budget:
                stopped_after, rule = checked, "budget"
            if stopped_after:
                break
        say(f"targeted scan: {ablated} of {len(order)} candidates ablated")
    merged = []
    for plan, shard_parts in zip(plans, columns, strict=True):
        features = [part.features for part in shard_parts]
        deltas = [part.dense_delta() for part in shard_parts]
        merged.append(
            AblationPartial.from_dense(
                np.concatenate(features) if features else np.zeros(0, dtype=np.int64),
                np.concatenate(deltas, axis=1) if deltas else np.zeros((plan.size, 0)),
                shard_parts[-1].baseline if shard_parts else np.full(plan.size, np.nan),
                ScanInfo(
                    site=shard_parts[0].scan.site if shard_parts else "",
                    n_ablations=sum(part.scan.n_ablations for part in shard_parts),
                    mode=params.mode,
                ),
            )
        )
    full = int(estimates.pairs.sum())
    run = sum(part.scan.n_ablations for part in merged)
    info = TargetedScan(
        store=candidates.store,
        top_k=candidates.top_k,
        patience=candidates.patience,
        budget=candidates.budget,
        n_candidates=len(order),
        n_ablated=ablated,
        stopped_after=stopped_after or checked,
        stop_rule=rule,
        gap=candidates.gap,
        gap_ratio=ratio,
        full_scan_ablations=full,
        ablation_fraction=run / full if full else 0.0,
    )
    return merged, info


def targeted_result(
    params: AblationScanParams, ctx: MergeContext, partials: Sequence[Any] = ()
) -> AblationJobResult:
    """The job result of a targeted scan: the rounds' exact Δm, the estimates, the stop.

    ``partials``: the shard phase's (baselines only), which a pair-level scan takes its
    clean baseline from.
    """
    from circuitscan.services.jobs.kinds.ablation_scan import ablation_result, scanned_site
    from circuitscan.services.jobs.planning import plan_shards

    assert params.candidates is not None
    site = ctx.site or scanned_site(ctx.spec, [params.site] if params.site else [])
    kept = list(ctx.kept)
    corrupted = params.mode == "corrupted"
    check_cache_prompts(params.candidates, kept, corrupted)
    by_pair = params.candidates.granularity == "pair"
    estimates = cache_estimates(params.candidates, site, params.positions, params.mode, by_pair)
    what = (
        f"{int(estimates.pairs.sum())} (prompt, feature) pairs"
        if by_pair
        else (f"{int((estimates.pairs > 0).sum())} candidates")
    )
    ctx.say(
        f"targeted scan: {what} ranked by the cache "
        f"{params.candidates.store} ({'AtP term' if corrupted else '−a·∂m/∂a'})"
    )
    plans = plan_shards(len(kept), ctx.spec.shard_size)
    if by_pair:
        from circuitscan.services.jobs.kinds import targeted_pairs as tp

        exact_of = tp.actor_rounds(estimates, plans, kept, ctx.fan_out, ctx.say)
        scan = tp.run_pairs(params, estimates, exact_of)
        return AblationJobResult(
            job_hash=ctx.spec.content_hash(),
            site=site,
            mode=params.mode,
            n_prompts=estimates.n_prompts,
            n_ablations=scan.n_ablations,
            baseline_mean=tp.baseline_mean(list(partials), plans, kept, ctx.fan_out),
            features=tp.pair_features(site, estimates, scan),
            targeted=scan.info,
        )
    partials, info = run_rounds(params, estimates, plans, kept, ctx.fan_out, ctx.say)
    result = ablation_result(ctx.spec, partials)
    n = max(estimates.n_prompts, 1)
    features = [
        f.model_copy(
            update={
                "estimate_mean": float(estimates.total[f.feature]) / n,
                "estimate_mean_abs": float(estimates.total_abs[f.feature]) / n,
            }
        )
        for f in result.features
    ]
    return result.model_copy(update={"features": features, "targeted": info})
