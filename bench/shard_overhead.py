"""Per-shard bookkeeping benchmark: a worker's "already committed?" check against store size.

    .venv/bin/python bench/shard_overhead.py [--sizes 1000 16000] [--repeats 200]

Builds real stores on local disk with N committed shards (N = 1,000 and
16,000 by default; circuitscan.testing.many_shards: prompts-only shards of
one prompt, shard 0 written through write_shard and commit_shard, the rest
byte copies of it committed through commit_shard), then times, on a store
handle opened afresh as a worker holds it:

- shard_check_ms_1k / shard_check_ms_16k: the worker's check
  (services/jobs/shard_runner.already_committed: one read of the shard's own
  manifest entry), median over ``--repeats`` random shard ids, committed
  and not, in the store of 1k / 16k shards;
- shard_check_growth_ratio: the 16k figure over the 1k one (target ≤ 1.5);
- full_manifest_ms_1k / full_manifest_ms_16k: the way workers used to ask,
  ``refresh()`` then ``committed_entries()`` (list and parse every
  ``manifest/*.json``), median over a few rounds, for comparison;
- shard_tail_ms_1k / shard_tail_ms_16k: the rest of a shard's bookkeeping
  around the model, no model: the check, ``write_shard`` of a new one-prompt
  shard on the worker handle and ``commit_shard`` (checksums verified) on a
  driver handle whose manifest is in memory, median over shards appended to
  each store.

Ends with one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from circuitscan.services.jobs.shard_runner import already_committed
from circuitscan.services.store import FeatureStore
from circuitscan.testing.many_shards import PROMPT, TOKEN_IDS, commit_many_shards


def _label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 4)


def shard_check_ms(url: str, n: int, repeats: int, rng: random.Random) -> float:
    worker = FeatureStore.open(url)
    samples = []
    for _ in range(repeats):
        shard_id = rng.randrange(n + n // 10)  # about one in eleven not committed
        start = time.perf_counter()
        entry = already_committed(worker, shard_id)
        samples.append(time.perf_counter() - start)
        assert (entry is not None) == (shard_id < n)
    return _median_ms(samples)


def full_manifest_ms(url: str, n: int, rounds: int) -> float:
    worker = FeatureStore.open(url)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        worker.refresh()
        entries = worker.committed_entries()
        samples.append(time.perf_counter() - start)
        assert len(entries) == n
    return _median_ms(samples)


def shard_tail_ms(url: str, n: int, shards: int) -> float:
    worker = FeatureStore.open(url)
    driver = FeatureStore.open(url)
    driver.committed_shard_ids()  # the driver reads the manifest once, at its start
    samples = []
    for shard_id in range(n, n + shards):
        start = time.perf_counter()
        assert already_committed(worker, shard_id) is None
        entry = worker.write_shard(shard_id, [PROMPT], [TOKEN_IDS], {})
        assert driver.commit_shard(entry)
        samples.append(time.perf_counter() - start)
    return _median_ms(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 16000])
    parser.add_argument("--repeats", type=int, default=200, help="Checks timed per store.")
    parser.add_argument("--rounds", type=int, default=3, help="Full-manifest reads per store.")
    parser.add_argument("--tail-shards", type=int, default=32, help="Shards appended per store.")
    parser.add_argument(
        "--root", type=Path, default=None, help="Folder for the stores (default: a temp folder)."
    )
    args = parser.parse_args()
    rng = random.Random(0)
    figures: dict[str, float | int] = {}
    with tempfile.TemporaryDirectory(prefix="shard-overhead-", dir=args.root) as root:
        for n in args.sizes:
            label = _label(n)
            start = time.perf_counter()
            url = commit_many_shards(str(Path(root) / f"n{n}"), n).url
            print(f"store of {n:,} committed shards built in {time.perf_counter() - start:.1f} s")
            check = shard_check_ms(url, n, args.repeats, rng)
            full = full_manifest_ms(url, n, args.rounds)
            tail = shard_tail_ms(url, n, args.tail_shards)
            print(
                f"  {n:>6,} shards: worker check {check:.3f} ms (one entry read), "
                f"old full-manifest read {full:.1f} ms, check+write+commit {tail:.2f} ms"
            )
            figures |= {
                f"shard_check_ms_{label}": check,
                f"full_manifest_ms_{label}": full,
                f"shard_tail_ms_{label}": tail,
            }
    small, large = (_label(n) for n in args.sizes)
    ratio = figures[f"shard_check_ms_{large}"] / figures[f"shard_check_ms_{small}"]
    tail_ratio = figures[f"shard_tail_ms_{large}"] / figures[f"shard_tail_ms_{small}"]
    figures["shard_check_growth_ratio"] = round(ratio, 3)
    figures["shard_tail_growth_ratio"] = round(tail_ratio, 3)
    figures["n_shards_small"], figures["n_shards_large"] = args.sizes
    print(
        f"check {small}→{large}: ×{ratio:.2f} (target ≤ 1.5); "
        f"check+write+commit ×{tail_ratio:.2f}; the old way at {large}: "
        f"{figures[f'full_manifest_ms_{large}']:.0f} ms per shard"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
