"""Corpus rankings and targeted ablation scans from a cache store.

    .venv/bin/python bench/cached_rankings.py [--quick]

Also merged into ``bench/cached_attribution.py``'s JSON line (``measure``).

- ``targeted_scan_ablation_fraction``: on the default model (SmolLM2-135M-Instruct,
  its two SAEs, the scan at L15.resid_post) over 64 IOI prompts at the last
  position, a ``cache`` job (activations + gradients), the full zero-ablation
  ``ablation_scan`` and a pair-level targeted one (``candidates: {store: the
  cache, granularity: pair, top_k: 10, patience: 20, round_size: 24, gap:
  auto}``, services/jobs/kinds/targeted_pairs.py) on the same 2 warm actors:
  the targeted scan's (prompt, feature) ablations over the full scan's,
  counted only when its top 10 by reported mean |Δm| (exact pairs plus
  estimated ones) is the full scan's top 10 (``targeted_scan_top10_recovered``
  says whether it is; the figure is 1.0 otherwise). Target ≤ 0.2. Both scans
  ablate only (prompt, feature) pairs where the feature is active at the
  position (zero-ablating an inactive one changes nothing), so the full scan's
  count is the active pairs. Beside it: ``targeted_scan_top10_exact_pairs``,
  the share of the top 10's pairs it ablated, and
  ``targeted_scan_top10_max_abs_diff``, the largest |reported − full scan's|
  mean |Δm| over them.
- ``targeted_scan_feature_level_fraction``: the same for the feature-level
  scan (``granularity: feature``, the default: ``top_k: 10, patience: 20,
  round_size: 8, gap: auto``), whose every reported value is exact; with it
  ``targeted_scan_floor_fraction``, the full top 10's own active pairs over
  the full count (no feature-level scan that reports those features' exact
  mean |Δm| can spend less), and ``targeted_scan_oracle_fraction``, the
  ablations of the cache's feature order up to the candidate that completes
  the full top 10 (a feature-level stop rule that knew the answer).
- ``top_attributions_p50_ms``: median wall time of ``top_attributions`` queries
  (all features ranked by |Σ a·g|, and one feature's top prompts, alternately,
  random features) on an opened synthetic store of ≥ 1M tokens (bench/store.py's
  ``synthetic_store``: numpy activations and gradients, no model; 2304
  features, 32 per token). Target ≤ 20.

``--quick``: 16 prompts and a 2^18-token store (below the 1M the target names).
Ends with one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SCAN_SITE = "L15.resid_post"


def _spec(store: Path, job: Any, n_prompts: int, shard_size: int) -> Any:
    from circuitscan.schemas.jobs import ExecutionSpec, IOISource, JobSpec
    from circuitscan.schemas.models import ModelSpec, SAESpec
    from circuitscan.services.sae_loading import default_sae_names

    return JobSpec(
        name=store.name,
        model=ModelSpec(),
        saes=[SAESpec(source=f"default/{name}") for name in default_sae_names()],
        prompts=IOISource(kind="ioi", n=n_prompts, seed=0),
        job=job,
        store=str(store),
        shard_size=shard_size,
        execution=ExecutionSpec(num_actors=2, torch_threads=1, batch_size=8),
    )


def _run(spec: Any) -> tuple[Any, float]:
    from circuitscan.services.jobs.runner import run_job

    started = time.perf_counter()
    summary = run_job(spec, keep_actors=True)
    seconds = time.perf_counter() - started
    print(f"{spec.name}: {summary.prompts} prompts in {seconds:.1f}s", flush=True)
    return summary, seconds


def _targeted(
    scan: Any, candidates: Any, name: str, work: Path, n_prompts: int, shard_size: int
) -> tuple[Any, float]:
    from circuitscan.services.store.results import read_result

    spec = _spec(
        work / name, scan.model_copy(update={"candidates": candidates}), n_prompts, shard_size
    )
    _, seconds = _run(spec)
    result = read_result(spec.store, "ablation_scan")
    assert result.targeted is not None
    return result, seconds


def measure_targeted_scan(n_prompts: int, work: Path, shard_size: int = 16) -> dict[str, Any]:
    """targeted_scan_ablation_fraction and the figures beside it (see the module docstring)."""
    from circuitscan.schemas.jobs import AblationScanParams, CacheParams, ScanCandidates
    from circuitscan.services.jobs.kinds.targeted_scan import cache_estimates
    from circuitscan.services.store.results import read_result

    cache = _spec(work / "scan-cache", CacheParams(kind="cache"), n_prompts, shard_size)
    _run(cache)
    scan = AblationScanParams(kind="ablation_scan", site=SCAN_SITE, positions="last")
    full_spec = _spec(work / "scan-full", scan, n_prompts, shard_size)
    _, full_seconds = _run(full_spec)
    full = read_result(full_spec.store, "ablation_scan")
    top_full = {f.feature for f in full.features[:10]}
    exact = {f.feature: f for f in full.features}
    store = str(work / "scan-cache")

    by_feature = ScanCandidates(store=store, top_k=10, patience=20, gap="auto")
    features, feature_seconds = _targeted(
        scan, by_feature, "scan-targeted", work, n_prompts, shard_size
    )
    feature_ok = {f.feature for f in features.features[:10]} == top_full
    worst = max(abs(f.mean_delta - exact[f.feature].mean_delta) for f in features.features)
    feature_fraction = features.n_ablations / full.n_ablations if feature_ok else 1.0
    estimates = cache_estimates(by_feature, SCAN_SITE, "last")
    order = estimates.order()
    floor = int(sum(estimates.pairs[f] for f in top_full)) / full.n_ablations
    complete = max(order.index(f) for f in top_full) + 1
    oracle = int(sum(estimates.pairs[f] for f in order[:complete])) / full.n_ablations
    assert features.targeted is not None
    print(
        f"feature level: {features.targeted.n_ablated} of {features.targeted.n_candidates} "
        f"candidates, {features.n_ablations} of {full.n_ablations} ablations "
        f"({feature_fraction:.3f}), stopped by {features.targeted.stop_rule}; top 10 "
        f"recovered: {feature_ok}; largest |Δ exact − full scan's| {worst:.2e}; the full top "
        f"10 hold {floor:.3f} of the ablations, the cache's order completes them at candidate "
        f"{complete} ({oracle:.3f}); {feature_seconds:.1f}s vs {full_seconds:.1f}s",
        flush=True,
    )

    # Rounds of 24 pairs: each round's calls re-run their prompts up to the site, so fewer,
    # larger rounds cost less wall time; 8 (the default) stops at the same 384 pairs here.
    by_pair = ScanCandidates(
        store=store, top_k=10, patience=20, gap="auto", granularity="pair", round_size=24
    )
    pairs, pair_seconds = _targeted(scan, by_pair, "scan-pairs", work, n_prompts, shard_size)
    top_pairs = pairs.features[:10]
    recovered = {f.feature for f in top_pairs} == top_full
    fraction = pairs.n_ablations / full.n_ablations if recovered else 1.0
    exact_share = sum(f.n_exact or 0 for f in top_pairs) / max(
        sum(f.n_active for f in top_pairs), 1
    )
    top_diff = max(abs(f.mean_abs_delta - exact[f.feature].mean_abs_delta) for f in top_pairs)
    info = pairs.targeted
    assert info is not None
    print(
        f"pair level: {pairs.n_ablations} of {full.n_ablations} ablations ({fraction:.3f}), "
        f"stopped by {info.stop_rule} after {info.stopped_after} pairs (|Δ| / |estimate| "
        f"taken within [{info.gap_ratio_low or 0:.3g}, {info.gap_ratio or 0:.3g}]); top 10 "
        f"recovered: {recovered}, {exact_share:.1%} of its pairs exact, largest |reported − "
        f"full scan's| mean |Δ| among them {top_diff:.2e}; {pair_seconds:.1f}s vs "
        f"{full_seconds:.1f}s",
        flush=True,
    )
    return {
        "targeted_scan_ablation_fraction": round(fraction, 4),
        "targeted_scan_top10_recovered": int(recovered),
        "targeted_scan_top10_exact_pairs": round(exact_share, 4),
        "targeted_scan_top10_max_abs_diff": float(f"{top_diff:.3g}"),
        "targeted_scan_stop_rule": info.stop_rule,
        "targeted_scan_seconds": round(pair_seconds, 2),
        "targeted_scan_feature_level_fraction": round(feature_fraction, 4),
        "targeted_scan_feature_level_top10_recovered": int(feature_ok),
        "targeted_scan_floor_fraction": round(floor, 4),
        "targeted_scan_oracle_fraction": round(oracle, 4),
        "targeted_scan_feature_level_stop_rule": features.targeted.stop_rule,
        "targeted_scan_candidates_ablated": features.targeted.n_ablated,
        "targeted_scan_candidates": features.targeted.n_candidates,
        "targeted_scan_max_abs_diff_vs_full": worst,
        "targeted_scan_feature_level_seconds": round(feature_seconds, 2),
        "full_scan_seconds": round(full_seconds, 2),
        "full_scan_ablations": full.n_ablations,
        "targeted_scan_prompts": n_prompts,
    }


def measure_top_attributions(n_tokens: int, work: Path, n_queries: int = 200) -> dict[str, Any]:
    """top_attributions_p50_ms on a synthetic store of ``n_tokens`` tokens."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from store import synthetic_store

    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.rankings import top_attributions

    url = str(work / "rankings-synthetic")
    started = time.perf_counter()
    synthetic_store(url, n_tokens)
    print(f"synthetic store written in {time.perf_counter() - started:.1f}s", flush=True)
    store = FeatureStore.open(url)
    site = store.layout.sites[0].label
    opened = time.perf_counter()
    top_attributions(store, site, n=20)  # opening: the manifest and the merged index, once
    open_ms = (time.perf_counter() - opened) * 1e3
    live = np.flatnonzero(store.feature_index(site).count > 0)
    rng = np.random.default_rng(0)
    times = []
    for i in range(n_queries):
        feature = int(rng.choice(live))
        start = time.perf_counter()
        if i % 2:
            top_attributions(store, site, per="prompt", feature=feature, n=20)
        else:
            top_attributions(store, site, n=20)
        times.append((time.perf_counter() - start) * 1e3)
    p50 = float(np.median(times))
    print(
        f"top_attributions on {store.n_tokens()} tokens: p50 {p50:.3f} ms (p90 "
        f"{np.percentile(times, 90):.3f}); first query (loads the index) {open_ms:.0f} ms",
        flush=True,
    )
    return {
        "top_attributions_p50_ms": round(p50, 3),
        "top_attributions_first_ms": round(open_ms, 1),
        "rankings_query_tokens": store.n_tokens(),
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Both figures, for bench/cached_attribution.py (its ``--quick`` shrinks both)."""
    import ray

    quick = bool(getattr(args, "quick", False))
    figures = measure_targeted_scan(16 if quick else 64, work)
    ray.shutdown()
    figures |= measure_top_attributions(1 << 18 if quick else 1 << 20, work)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts, a 2^18-token store.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cached-rankings-") as tmp:
        figures = measure(args, Path(tmp))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
