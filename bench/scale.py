"""Scale benchmark: what a shard costs as a store and a prompt set grow (no model).

    .venv/bin/python bench/scale.py [--quick]

Figures (real stores on local disk; an S3 server for the request counts):

- per_shard_overhead_ms_1k_shards / _100k_shards: a shard's bookkeeping
  around the model in a store with that many committed manifest entries:
  the worker's committed check (its own entry), ``write_shard`` of a
  one-prompt shard and the driver's ``commit_shard`` (manifest in memory),
  median over 128 appended shards, the two stores timed in alternating
  batches (same load). Target: the second ≤ 1.2 × the first.
  ``per_shard_overhead_mean_ms_*``: the mean, with the index flushes the
  commits make (one every 16 commits of these prompts-only stores);
  ``driver_index_load_s_*``: the driver's one load and check of the persisted
  index (every entry's digest), at its first flush, before the timed shards.
- driver_rss_mb_1m_prompts / driver_startup_s_1m_prompts: a fresh process
  plans a job over a generated source of 1,000,000 prompts (open the source,
  check and digest it, apply the token cap, cut 15,625 shards and name each
  shard's source ranges, everything the driver does before the first shard
  but start Ray): its peak RSS and the time that took. Targets ≤ 1,000 MB, ≤ 30 s.
- s3_requests_per_shard_16 / _64: HTTP requests per shard (worker check,
  write, driver commit, index flushes) of 16- and 64-shard stores of 64-prompt
  shards of the default layout on a moto S3 server, counted by a proxy in
  front of it: every request of the job (its index flushes, one every
  ``s3_index_flush_interval`` commits, and its last one) over its shards.
  Target: equal within 5 %. ``s3_requests_by_phase_*``: each phase's requests
  a shard, and each flush's requests.
- index_flush_ms_131k_features: the flush a job's commits make of the merged
  index of one 131,072-feature site (gradients on) after 16 commits of shards
  of their own random draws, the first of the store: a run of the 16 shards'
  summaries and the pointer (index_runs.py). Beside it the driver's fold of
  those shards into its in-memory index (``index_fold_ms_...``, off the flush:
  a job's driver folds on its flush thread) and the compaction after them
  (``index_compact_ms_...``: the chunks they changed, every chunk at this
  width); ``..._steady``: the same after 256 shards (rows full, as in a long
  job); ``index_flush_interval_...`` / ``index_compact_interval_...``: the
  commits a job makes between flushes and between compactions, and
  ``index_compact_ms_per_shard_...`` the compaction's share of a shard;
  ``index_last_flush_ms_...``: a job's last flush, every chunk encoded at rest.
- driver_commits_per_s: the driver's commits of 64-prompt shards of the
  default layout (two sites of 2,304 features, gradients), written by a
  worker beforehand, on local disk, with the index flushes a job makes run in
  the background as a job's driver runs them. Target ≥ 200. Beside it
  ``driver_commits_per_s_with_index`` (up to the job's last flush, which waits
  for the index), ``driver_commit_bookkeeping_ms`` (median commit) and
  ``index_fold_and_flush_ms_per_shard``. 1,000 commits by default (``--commits``):
  the first folds of a new index pay its pages' first touch, which 400 commits
  weigh ~10 % more heavily (measured 178 vs 224 commits/s with the index).
- objects_per_shard: objects one such shard leaves in the store (its data
  plus its manifest entry). Target ≤ 8.

``--quick`` uses 10,000 committed entries instead of 100,000 (the figure
keeps its name and says so in ``large_store_shards``); ``--s3-shards A B``
measures the two S3 figures at other store sizes (said in ``s3_shards_16`` /
``s3_shards_64``), ``--no-s3`` skips them. Ends with one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS_PER_SHARD = 64
TOKENS_PER_PROMPT = 17  # IOI-like
K = 32  # active features a token (the default SAEs' TopK)
ENTRY_BATCH = 10_000  # manifest entries written at a time when building a large store


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


# --- per-shard bookkeeping -------------------------------------------------------------


def _entries_store(url: str, n: int) -> None:
    """A prompts-only store of ``n`` committed one-prompt shards (entries written directly,
    in batches of files: the bookkeeping reads entries, never the copies' data; 100,000
    entries take seconds)."""
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.manifest import entry_bytes, manifest_key
    from circuitscan.testing.many_shards import commit_many_shards

    store = commit_many_shards(url, 1)
    first = store.committed_entries()[0]
    for start in range(1, n, ENTRY_BATCH):
        batch = {}
        for shard_id in range(start, min(start + ENTRY_BATCH, n)):
            entry = first.model_copy(update={"shard_id": shard_id, "prompt_start": shard_id})
            batch[manifest_key(shard_id)] = entry_bytes(entry)
        store.location.write_many(batch)
    # The index covers every entry, as a job's last flush leaves it: the timed commits'
    # flushes then fold only their own shards in.
    FeatureStore.open(url).flush_index()


def per_shard_overhead_ms(urls: dict[str, int], shards: int, rounds: int = 4) -> dict[str, Any]:
    """(median, mean) ms of a shard's bookkeeping over ``shards`` shards appended to each
    store of ``urls`` (url -> committed entries), in ``rounds`` alternating batches so
    that every store is timed under the same load. The mean includes the index flushes
    the driver's commits make (one every 16 here)."""
    from circuitscan.services.jobs.shard_runner import already_committed
    from circuitscan.services.store import FeatureStore
    from circuitscan.testing.many_shards import PROMPT, TOKEN_IDS

    handles = {}
    loads = {}
    for url, n in urls.items():
        worker, driver = FeatureStore.open(url), FeatureStore.open(url)
        assert len(driver.committed_shard_ids()) == n  # read once, at the driver's start
        # The driver loads (and checks) the persisted index once, at its first flush: a
        # start-up cost, timed on its own, not spread over the shards below.
        start = time.perf_counter()
        driver.flush_index()
        loads[url] = round(time.perf_counter() - start, 3)
        handles[url] = (worker, driver)
    samples: dict[str, list[float]] = {url: [] for url in urls}
    batch = shards // rounds
    for round_ in range(rounds):
        for url, (worker, driver) in handles.items():
            first = urls[url] + round_ * batch
            for shard_id in range(first, first + batch):
                start = time.perf_counter()
                assert already_committed(worker, shard_id) is None
                entry = worker.write_shard(shard_id, [PROMPT], [TOKEN_IDS], {})
                assert driver.commit_shard(entry, verify=False)
                samples[url].append(time.perf_counter() - start)
    return {
        url: (_median_ms(times), round(statistics.fmean(times) * 1000, 3), loads[url])
        for url, times in samples.items()
    }


# --- driver planning of a million prompts ---------------------------------------------------


def plan_million(n: int) -> None:
    """(In a fresh process.) Plan a job over ``n`` generated prompts as the driver does."""
    from circuitscan.schemas.jobs import JobSpec
    from circuitscan.services.jobs.planning import plan_shards
    from circuitscan.services.jobs.prompt_plan import check_kept, check_source, select
    from circuitscan.services.jobs.prompt_sources import open_prompts

    spec = JobSpec.model_validate(
        {
            "saes": [{"source": "default/L15.resid_post"}],
            "prompts": {
                "kind": "template",
                "templates": ["When {A} and {B} went to the {P}, {B} gave a {O} to"],
                "fillers": {
                    "A": [" Mary", " John", " Anna", " Kate"],
                    "B": [" Tom", " Paul", " Sam"],
                    "P": [" store", " park", " school"],
                    "O": [" ring", " book", " drink"],
                },
                "answer": "{A}",
                "wrong": "{B}",
                "distinct": [["A", "B"]],
                "n": n,
            },
            "job": {"kind": "cache"},
            "store": "memory://plan",
        }
    )
    import psutil

    before = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    prompts = open_prompts(spec.prompts, lambda: None)
    check_source(spec, prompts)
    kept, _ = select(spec, prompts, 2048, lambda: None)
    check_kept(spec, kept, lambda _line: None)
    plans = plan_shards(len(kept), spec.shard_size)
    sizes = sum(kept.ranges(p.start, p.stop).size for p in plans)  # what drive() ships
    assert sizes == n
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()  # the tokenizer the checks load is in it
    print(
        json.dumps(
            {"seconds": seconds, "rss_mb": peak, "rss_before_mb": before, "shards": len(plans)}
        )
    )


def _peak_rss_mb() -> float:
    """This program's peak RSS: VmHWM of its own memory map where Linux says it. Not
    ru_maxrss, which Linux carries over from before exec: a process forked from a parent
    holding a large store's manifest would report the parent's RSS as its own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _planned(n: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--plan", str(n)], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# --- 64-prompt shards of the default layout --------------------------------------------------


def default_layout(d_sae: int = 2304, sites: int = 2) -> Any:
    from circuitscan.schemas.store import SiteLayout, StoreLayout

    labels = ["L15.resid_post", "L15.z"][:sites]
    hooks = ["blocks.15.hook_resid_post", "blocks.15.attn.hook_z"]
    return StoreLayout(
        sites=[
            SiteLayout(label=label, hook_name=hook, d_sae=d_sae)
            for label, hook in zip(labels, hooks, strict=False)
        ],
        gradients=True,
        top_k_per_token=K,
        shard_size=PROMPTS_PER_SHARD,
        job_hash="scale-bench",
    )


def synthetic_shard(
    seed: int, d_sae: int, labels: list[str]
) -> tuple[list[Any], list[list[int]], dict[str, Any]]:
    """64 prompts of 17 tokens, K features a token at every site (random ids, float values)."""
    from circuitscan.schemas.prompts import PromptRecord
    from circuitscan.testing.random_sites import random_site_cache

    rng = np.random.default_rng(seed)
    prompts = [PromptRecord(text=f"prompt {seed}/{i}") for i in range(PROMPTS_PER_SHARD)]
    tokens = [rng.integers(0, 49152, TOKENS_PER_PROMPT).tolist() for _ in prompts]
    n_tokens = PROMPTS_PER_SHARD * TOKENS_PER_PROMPT
    caches = {label: random_site_cache(rng, n_tokens, d_sae, K) for label in labels}
    return prompts, tokens, caches


def written_store(url: str, n_shards: int, d_sae: int = 2304) -> tuple[Any, list[Any]]:
    """A store with ``n_shards`` written (not committed) default-layout shards: shard 0 written
    by ``write_shard``, the others byte copies of it under their own prefixes."""
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.shard_io import shard_prefix

    layout = default_layout(d_sae)
    store = FeatureStore.create(url, layout, overwrite=True)
    prompts, tokens, caches = synthetic_shard(0, d_sae, [s.label for s in layout.sites])
    first = store.write_shard(0, prompts, tokens, caches)
    template = store.location.read_prefix(shard_prefix(0))
    relative = {key.removeprefix(shard_prefix(0)): data for key, data in template.items()}
    entries = [first]
    for shard_id in range(1, n_shards):
        prefix = shard_prefix(shard_id)
        store.location.write_many({prefix + key: data for key, data in relative.items()})
        start = shard_id * PROMPTS_PER_SHARD
        entries.append(first.model_copy(update={"shard_id": shard_id, "prompt_start": start}))
    return store, entries


def driver_commits_per_s(root: Path, n_shards: int) -> dict[str, float]:
    """The driver's commits as run_job makes them: index flushes on a background thread
    (``index.background``), and the job's last flush, which waits for them.

    ``driver_commits_per_s``: commits over the commit loop (what the driver's
    critical path sustains); ``driver_commits_per_s_with_index``: over the loop
    and the last flush (what the index keeps up with on this machine, its folds
    sharing the cores with the commits); ``index_fold_and_flush_ms_per_shard``:
    the index's time a shard, the difference.
    """
    from circuitscan.services.store import FeatureStore

    store, entries = written_store(str(root / "commits"), n_shards)
    driver = FeatureStore.open(store.url)
    driver.committed_shard_ids()
    driver.index.background = True  # as run_job's driver
    samples = []
    start = time.perf_counter()
    for entry in entries:
        begin = time.perf_counter()
        assert driver.commit_shard(entry, verify=False)  # as run_job commits
        samples.append(time.perf_counter() - begin)
    loop = time.perf_counter() - start
    driver.flush_index()
    total = time.perf_counter() - start
    return {
        "driver_commits_per_s": round(n_shards / loop, 1),
        "driver_commits_per_s_with_index": round(n_shards / total, 1),
        "driver_commit_bookkeeping_ms": _median_ms(samples),
        "driver_commit_max_ms": round(max(samples) * 1000, 3),
        "index_fold_and_flush_ms_per_shard": round((total - sum(samples)) / n_shards * 1000, 3),
    }


def objects_per_shard(root: Path) -> int:
    from circuitscan.services.store.shard_io import shard_prefix

    store, entries = written_store(str(root / "objects"), 1)
    store.commit_shard(entries[0])
    return len(store.location.read_prefix(shard_prefix(0))) + 1  # + its manifest entry


def distinct_shards(url: str, n_shards: int, d_sae: int, sites: int) -> tuple[Any, list[Any]]:
    """A store with ``n_shards`` written (not committed) shards, each of its own random
    draws (byte copies would tie every candidate with its copies: no real store does)."""
    from circuitscan.services.store import FeatureStore

    layout = default_layout(d_sae, sites)
    store = FeatureStore.create(url, layout, overwrite=True)
    labels = [s.label for s in layout.sites]
    entries = [
        store.write_shard(i, *synthetic_shard(i, d_sae, labels)[:3]) for i in range(n_shards)
    ]
    return store, entries


def _timed_flush(driver: Any, label: str, entries: list[Any]) -> tuple[float, float]:
    """(fold ms, flush ms) of committing ``entries``: the commits fold the summaries they
    hold every 16 (the bookkeeping of a commit itself is ~0.1 ms), then the flush a job's
    commits make (``flush_recent``: a run of their summaries)."""
    start = time.perf_counter()
    for entry in entries:
        driver.commit_shard(entry, verify=False)
    driver.feature_index(label)  # folds what the commits have not
    folded = time.perf_counter()
    driver.index.flush_recent()
    return (folded - start) * 1000, (time.perf_counter() - folded) * 1000


def _timed_compaction(driver: Any) -> float:
    start = time.perf_counter()
    driver.index.compact()  # writes the chunks the shards changed, drops the runs
    return (time.perf_counter() - start) * 1000


def index_flush_ms(
    root: Path, d_sae: int = 131_072, commits: int = 16, warm: int = 256
) -> dict[str, float]:
    """Flushes of one 131,072-feature site (gradients on) after ``commits`` commits: the
    first (rows filling: every candidate enters) and one after ``warm`` shards (rows
    full: few candidates beat a row's K-th), each with the fold of those shards into the
    driver's index before it and the compaction after it."""
    from circuitscan.services.store import FeatureStore

    store, entries = distinct_shards(str(root / "wide"), warm + commits, d_sae, sites=1)
    label = store.layout.sites[0].label
    driver = FeatureStore.open(store.url)
    driver.index_flush_every = 10**9  # flush by hand
    cold = _timed_flush(driver, label, entries[:commits])
    cold_compaction = _timed_compaction(driver)
    for entry in entries[commits:warm]:
        driver.commit_shard(entry, verify=False)
    driver.flush_index()
    steady = _timed_flush(driver, label, entries[warm:])
    steady_compaction = _timed_compaction(driver)
    start = time.perf_counter()
    driver.flush_index()  # a job's last flush: every chunk at rest (zstd)
    last = (time.perf_counter() - start) * 1000
    job = FeatureStore.open(store.url)
    job.index_flush_every = 16
    interval = job.index.compact_interval()
    return {
        "index_flush_ms_131k_features": round(cold[1], 1),
        "index_fold_ms_131k_features": round(cold[0], 1),
        "index_compact_ms_131k_features": round(cold_compaction, 1),
        "index_flush_ms_131k_features_steady": round(steady[1], 1),
        "index_fold_ms_131k_features_steady": round(steady[0], 1),
        "index_compact_ms_131k_features_steady": round(steady_compaction, 1),
        "index_flush_interval_131k_features": job.index.flush_interval(),  # a job's
        "index_compact_interval_131k_features": interval,
        "index_compact_ms_per_shard_131k_features": round(steady_compaction / interval, 2),
        "index_last_flush_ms_131k_features": round(last, 1),
    }


# --- S3 requests ----------------------------------------------------------------------------


def s3_figures(sizes: list[int]) -> dict[str, Any]:
    """Requests per shard of a job's shard tail on moto S3, for stores of ``sizes`` shards
    (the figures None when moto is not installed): every request of the job, its index
    flushes and its last flush too, over its shards, and each phase's share."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    names = [f"s3_requests_per_shard_{size}" for size in (16, 64)]
    try:
        from s3_counting import PHASES, counted_s3, shard_tail_requests
    except ImportError:
        return dict.fromkeys(names)
    layout = default_layout()
    shard = synthetic_shard(1, 2304, [s.label for s in layout.sites])
    figures: dict[str, Any] = {}
    with counted_s3() as (bucket, counter):
        for name, n in zip(names, sizes, strict=True):
            tail = shard_tail_requests(counter, f"s3://{bucket}/scale-{n}", layout, shard, n)
            size = name.rsplit("_", 1)[1]
            figures[name] = round(tail.per_shard(), 2)
            figures[f"s3_shards_{size}"] = n
            figures[f"s3_requests_by_phase_{size}"] = {
                **{phase: round(tail.phase_per_shard(phase), 3) for phase in PHASES},
                "flushes": tail.flushes,
            }
            figures["s3_index_flush_interval"] = tail.interval
    return figures


PARTS = ("overhead", "plan", "commits", "objects", "flush", "s3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k committed entries, not 100k.")
    parser.add_argument("--plan", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--commits", type=int, default=1000, help="Shards the driver commits.")
    parser.add_argument(
        "--s3-shards",
        type=int,
        nargs=2,
        default=[16, 64],
        help="Store sizes of the S3 request counts (slow on a loaded machine: ~1 s a shard or more).",
    )
    parser.add_argument("--no-s3", action="store_true", help="Skip the S3 request counts.")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        help="Run only these parts (default: all); the JSON holds only their figures.",
    )
    args = parser.parse_args()
    parts = set(args.only or PARTS)
    if args.plan:
        plan_million(args.plan)
        return
    large = 10_000 if args.quick else 100_000
    figures: dict[str, Any] = {"large_store_shards": large}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        root = Path(tmp)
        if "overhead" in parts:
            _overhead_figures(figures, root, large)
        if "plan" in parts:
            _plan_figures(figures)
        if "commits" in parts:
            _commit_figures(figures, root, args.commits)
        if "objects" in parts:
            figures["objects_per_shard"] = objects_per_shard(root)
            print(f"objects per shard: {figures['objects_per_shard']}")
        if "flush" in parts:
            _flush_figures(figures, root)
    if "s3" in parts and not args.no_s3:
        figures.update(s3_figures(args.s3_shards))
        for size, n in zip((16, 64), args.s3_shards, strict=True):
            print(
                f"S3 requests per shard, {n} shards: {figures[f's3_requests_per_shard_{size}']} "
                f"({figures.get(f's3_requests_by_phase_{size}')})"
            )
    print(json.dumps(figures))


def _overhead_figures(figures: dict[str, Any], root: Path, large: int) -> None:
    stores = {str(root / f"n{n}"): (n, key) for n, key in ((1000, "1k"), (large, "100k"))}
    for url, (n, _) in stores.items():
        start = time.perf_counter()
        _entries_store(url, n)
        print(f"{n:>7,} committed entries built in {time.perf_counter() - start:.0f} s")
    timed = per_shard_overhead_ms({url: n for url, (n, _) in stores.items()}, 128)
    for url, (median, mean, load) in timed.items():
        n, key = stores[url]
        figures[f"per_shard_overhead_ms_{key}_shards"] = median
        figures[f"per_shard_overhead_mean_ms_{key}_shards"] = mean
        figures[f"driver_index_load_s_{key}_shards"] = load
        print(
            f"{n:>7,} committed entries: {median:.2f} ms a shard "
            f"(median; mean with the index flushes {mean:.2f} ms; the driver's first "
            f"index load and check {load:.2f} s)"
        )
    ratio = (
        figures["per_shard_overhead_ms_100k_shards"] / figures["per_shard_overhead_ms_1k_shards"]
    )
    figures["per_shard_overhead_ratio"] = round(ratio, 3)


def _plan_figures(figures: dict[str, Any]) -> None:
    small_plan = _planned(1_000)
    figures["driver_rss_mb_1k_prompts"] = round(small_plan["rss_mb"], 1)
    figures["driver_startup_s_1k_prompts"] = round(small_plan["seconds"], 2)
    planned = _planned(1_000_000)
    figures["driver_rss_mb_1m_prompts"] = round(planned["rss_mb"], 1)
    figures["driver_startup_s_1m_prompts"] = round(planned["seconds"], 2)
    figures["driver_rss_mb_before_planning"] = round(planned["rss_before_mb"], 1)
    print(
        f"1,000 prompts planned in {small_plan['seconds']:.1f} s, peak RSS "
        f"{small_plan['rss_mb']:.0f} MB"
    )
    print(
        f"1,000,000 prompts planned into {planned['shards']:,} shards in "
        f"{planned['seconds']:.1f} s, peak RSS {planned['rss_mb']:.0f} MB "
        f"({planned['rss_before_mb']:.0f} MB before planning)"
    )


def _commit_figures(figures: dict[str, Any], root: Path, n_commits: int) -> None:
    commits = driver_commits_per_s(root, n_commits)
    figures.update(commits)
    print(
        f"driver commits: {commits['driver_commits_per_s']:.1f} shards/s (64-prompt shards, "
        f"default layout; median {commits['driver_commit_bookkeeping_ms']:.2f} ms a commit, "
        f"the index folded and flushed in the background); "
        f"{commits['driver_commits_per_s_with_index']:.1f} shards/s up to the last flush "
        f"({commits['index_fold_and_flush_ms_per_shard']:.1f} ms of index work a shard)"
    )


def _flush_figures(figures: dict[str, Any], root: Path) -> None:
    flushed = index_flush_ms(root)
    figures.update(flushed)
    for when, suffix in (("first flush", ""), ("after 256 shards", "_steady")):
        print(
            f"index flush of a 131,072-feature site, 16 commits, {when}: "
            f"{flushed[f'index_flush_ms_131k_features{suffix}']} ms (a run; the fold of "
            f"the 16 shards before it {flushed[f'index_fold_ms_131k_features{suffix}']} ms, "
            f"a compaction after it {flushed[f'index_compact_ms_131k_features{suffix}']} ms)"
        )
    print(
        f"a job flushes it every {flushed['index_flush_interval_131k_features']} commits and "
        f"compacts every {flushed['index_compact_interval_131k_features']} shards "
        f"({flushed['index_compact_ms_per_shard_131k_features']} ms a shard); its last "
        f"flush (every chunk at rest) {flushed['index_last_flush_ms_131k_features']} ms"
    )


if __name__ == "__main__":
    main()
