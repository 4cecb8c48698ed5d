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
  both on the same 2 CPUs (target ≥ 50).
- ``cached_atp_max_abs_diff`` / ``cached_atp_max_rel_diff``: largest
  difference between the two jobs' node means (over every node either job
  kept), absolute and relative to the node's mean |score| — within the
  float16 storage bound of docs/paired_caches.md.

``--quick`` runs 32 prompts. Ends with one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def measure_paired_cache(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """paired_cache_vs_cache_ratio (and the paired store, left in ``work`` for the next phase)."""
    raise NotImplementedError


def measure_cached_atp(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """cached_atp_vs_model_atp_speedup, cached_atp_max_abs_diff, cached_atp_max_rel_diff."""
    raise NotImplementedError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256, help="IOI prompts.")
    parser.add_argument("--quick", action="store_true", help="32 prompts.")
    parser.add_argument("--shard-size", type=int, default=16, help="Prompts per shard.")
    args = parser.parse_args()
    if args.quick:
        args.prompts = min(args.prompts, 32)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cached-attribution-") as tmp:
        work = Path(tmp)
        figures |= measure_paired_cache(args, work)
        figures |= measure_cached_atp(args, work)
        # --- corpus rankings and targeted scans (bench/cached_rankings.py) -----------
        # One import line and one merge: targeted_scan_ablation_fraction,
        # top_attributions_p50_ms.
        from cached_rankings import measure as measure_rankings  # bench/ is on sys.path

        figures |= measure_rankings(args, work)
        # --- end of corpus rankings -------------------------------------------------
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
