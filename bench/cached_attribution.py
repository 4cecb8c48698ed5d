"""Store-fed attribution benchmark: a paired cache, then AtP from it with no model pass.

    .venv/bin/python bench/cached_attribution.py [--prompts 256] [--quick] [--shard-size 16]

On the default model (SmolLM2-135M-Instruct, its two SAEs) over IOI prompts,
with warm actors (loaded once before timing, ``keep_actors``):

- ``paired_cache_vs_cache_ratio``: throughput (prompts/s of the shard phase)
  of a ``cache`` job with ``paired: true`` (clean forward + backward, and the
  corrupted prompt forward only) over the same job without it, same prompts,
  same 2 actors (target ≥ 0.6).
- ``cached_atp_vs_model_atp_speedup``: wall time of the model-run
  ``attribute`` job (``method: atp``, nodes ``sae_feature`` + ``sae_error``,
  ``positions: all``) over the wall time of the store-fed job's estimate
  phase (``prompts: {kind: store}``, no verification: no model is loaded),
  both on the same 2 CPUs (target ≥ 50). Both sides are timed warm: the
  actors hold their models, and the estimate tasks' worker processes have run
  a store-fed job on the small warm-up cache (started, imports done).
- ``cached_atp_max_abs_diff`` / ``cached_atp_max_rel_diff``: largest
  difference between the two jobs' node means, absolute and relative to the
  node's mean |AtP|, over the model-run job's top ``--compare-nodes`` nodes
  whose mean |AtP| is at least 1e-3 of the largest — within the float16
  storage bound of docs/paired_caches.md (2u + u² ≈ 9.8e-4 of |a'g'| + |ag|
  per prompt, which exceeds |AtP| where the two terms nearly cancel).

``--quick`` runs 32 prompts; ``--no-rankings`` leaves out bench/cached_rankings.py's
figures (run that script on its own for them). Ends with one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray


def _spec(args: argparse.Namespace, store: Path, job: Any, **fields: Any) -> Any:
    from circuitscan.schemas.jobs import ExecutionSpec, IOISource, JobSpec
    from circuitscan.schemas.models import ModelSpec, SAESpec
    from circuitscan.services.sae_loading import default_sae_names

    base = {
        "name": store.name,
        "model": ModelSpec(),
        "saes": [SAESpec(source=f"default/{name}") for name in default_sae_names()],
        "prompts": IOISource(kind="ioi", n=args.prompts, seed=0),
        "job": job,
        "store": str(store),
        "shard_size": args.shard_size,
        "execution": ExecutionSpec(num_actors=2, torch_threads=1, batch_size=8),
    }
    return JobSpec(**{**base, **fields})


def _run(spec: Any) -> Any:
    from circuitscan.services.jobs.runner import run_job

    summary = run_job(spec, keep_actors=True)
    rate = summary.prompts / summary.drive_seconds if summary.drive_seconds else 0.0
    print(
        f"{spec.name}: {summary.prompts} prompts, {summary.shards_run} shards in "
        f"{summary.drive_seconds:.2f}s of shards ({rate:.1f} prompts/s), {summary.seconds:.1f}s "
        f"in all on {summary.actors} actor(s)",
        flush=True,
    )
    return summary


def measure_paired_cache(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """paired_cache_vs_cache_ratio (and the paired store, left in ``work`` for the next phase)."""
    from circuitscan.schemas.jobs import CacheParams

    # Loads the model on both actors (one small shard each) before anything is timed.
    warm = argparse.Namespace(prompts=4, shard_size=2)
    _run(_spec(warm, work / "warm-up", CacheParams(kind="cache", paired=True)))
    plain = _run(_spec(args, work / "cache", CacheParams(kind="cache")))
    paired = _run(_spec(args, work / "paired-cache", CacheParams(kind="cache", paired=True)))
    return {
        "paired_cache_vs_cache_ratio": round(plain.drive_seconds / paired.drive_seconds, 3),
        "prompts": args.prompts,
    }


def measure_cached_atp(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """cached_atp_vs_model_atp_speedup, cached_atp_max_abs_diff, cached_atp_max_rel_diff."""
    from circuitscan.schemas.jobs import AttributeParams, StoreSource
    from circuitscan.services.store.results import read_result

    params = AttributeParams(
        kind="attribute",
        method="atp",
        nodes=["sae_feature", "sae_error"],
        positions="all",
        top_nodes=args.compare_nodes,
    )
    model_run = _spec(args, work / "model-atp", params)
    model = _run(model_run)
    # As the model-run side times warm actors (models loaded), the store-fed side is
    # timed with warm task workers: a store-fed job on the small warm-up cache first
    # (one task per shard, at most one per CPU in flight) starts them and imports
    # what a task reads with.
    warm = argparse.Namespace(prompts=4, shard_size=2)
    warm_source = StoreSource(kind="store", url=str(work / "warm-up"))
    _run(_spec(warm, work / "warm-up-atp", params, prompts=warm_source))
    source = StoreSource(kind="store", url=str(work / "paired-cache"))
    from_store = _spec(args, work / "store-atp", params, prompts=source)
    cached = _run(from_store)
    theirs = {e.node: e for e in read_result(model_run.store).top}
    ours = {e.node: e for e in read_result(from_store.store).top}
    largest = max(e.mean_abs for e in theirs.values())
    compared = [n for n, e in theirs.items() if e.mean_abs >= 1e-3 * largest and n in ours]
    missing = [n for n, e in theirs.items() if e.mean_abs >= 1e-3 * largest and n not in ours]
    diffs = [abs(ours[n].mean - theirs[n].mean) for n in compared]
    rel = [d / theirs[n].mean_abs for d, n in zip(diffs, compared, strict=True)]
    print(
        f"compared {len(compared)} nodes (mean |AtP| ≥ 1e-3 of the largest, {largest:.3g}); "
        f"{len(missing)} of them missing from the store-fed top {args.compare_nodes}",
        flush=True,
    )
    return {
        "cached_atp_vs_model_atp_speedup": round(model.drive_seconds / cached.drive_seconds, 1),
        "cached_atp_max_abs_diff": float(f"{max(diffs):.3g}"),
        "cached_atp_max_rel_diff": float(f"{max(rel):.3g}"),
        "cached_atp_nodes_compared": len(compared),
        "cached_atp_nodes_missing": len(missing),
        "model_atp_seconds": round(model.drive_seconds, 3),
        "cached_atp_seconds": round(cached.drive_seconds, 3),
        "float16_product_bound": float(f"{2 * 2.0**-11 + 2.0**-22:.3g}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256, help="IOI prompts.")
    parser.add_argument("--quick", action="store_true", help="32 prompts.")
    parser.add_argument("--shard-size", type=int, default=16, help="Prompts per shard.")
    parser.add_argument(
        "--compare-nodes", type=int, default=2000, help="Top nodes each job keeps and compares."
    )
    parser.add_argument(
        "--no-rankings",
        action="store_true",
        help="Skip bench/cached_rankings.py's figures (the targeted scan and top_attributions).",
    )
    args = parser.parse_args()
    if args.quick:
        args.prompts = min(args.prompts, 32)
    figures: dict[str, Any] = {}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory(prefix="cached-attribution-") as tmp:
        work = Path(tmp)
        figures |= measure_paired_cache(args, work)
        figures |= measure_cached_atp(args, work)
        ray.shutdown()
        # --- corpus rankings and targeted scans (bench/cached_rankings.py) -----------
        # One import line and one merge: targeted_scan_ablation_fraction,
        # top_attributions_p50_ms.
        if not args.no_rankings:
            from cached_rankings import measure as measure_rankings  # bench/ is on sys.path

            figures |= measure_rankings(args, work)
        # --- end of corpus rankings -------------------------------------------------
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
