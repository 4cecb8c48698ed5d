"""Feature-store benchmark: caching overhead, bytes per stored pair, read vs recompute, queries.

    .venv/bin/python bench/store.py [--prompts 128] [--shard-size 64] [--batch 16]
                                    [--rounds 3]
                                    [--query-tokens 1048576] [--threads 2]

On the default model (SmolLM2-135M-Instruct) with its default SAEs (L15.resid_post,
L15.z; top-k 32 of 2304) over IOI prompts:

- cache_vs_bare_ratio: throughput of caching activations (cache_batch without
  gradients per batch, then write_shard + commit_shard of the shard into a
  local store, as a job does: shards of 64 prompts, the job default) over a
  bare forward to the last SAE's layer + SAE encode of the same batches,
  timed side by side per shard (median over shards and rounds).
- cache_grad_vs_bare_ratio: caching activations and gradients (write and
  commit included) over a bare forward + backward to the SAE activations with
  the SAEs spliced in (error term kept, parameters frozen), same batches.
- bytes_per_pair(_with_grad): every byte of the store directory (data,
  offsets, token ids, summaries, index, metadata, manifest) over the number
  of stored (feature, activation) pairs, shards of 64 prompts.
- read_vs_recompute_speedup: recomputing the activations of every prompt
  (cache_batch without gradients) over reading them all back from a freshly
  opened store (checksums verified, decoded to float32).
- query_tokens, top_examples_p50_ms, features_at_p50_ms: a synthetic store
  of ≥ 1M tokens (one site, d_sae 2304, 32 features per token drawn with
  skewed popularity over ~460 live features, like the real SAEs), opened
  once; p50 over random top-20 example queries (8 tokens of context) and
  random (prompt, position) lookups.

Also prints the codec and chunk-size measurements behind the choices in
services/store/encoding.py. Ends with one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "2",
}.items():
    os.environ.setdefault(_name, _value)

import numcodecs  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from circuitscan.pipelines.batching import TokenBatch, tokenize_prompts  # noqa: E402
from circuitscan.pipelines.caching import cache_batch, merge_site_caches  # noqa: E402
from circuitscan.pipelines.metrics import metric_per_prompt  # noqa: E402
from circuitscan.pipelines.sae_splice import spliced  # noqa: E402
from circuitscan.pipelines.site_cache import SiteCache  # noqa: E402
from circuitscan.pipelines.tasks.ioi import generate_ioi  # noqa: E402
from circuitscan.schemas.hooks import HookSite  # noqa: E402
from circuitscan.schemas.metrics import MetricSpec  # noqa: E402
from circuitscan.schemas.prompts import PromptRecord  # noqa: E402
from circuitscan.schemas.store import SiteLayout, StoreLayout  # noqa: E402
from circuitscan.services.store import (  # noqa: E402
    FeatureStore,
    features_at,
    iter_shards,
    top_examples,
)
from circuitscan.services.store.encoding import ENTRY_CHUNK  # noqa: E402
from circuitscan.services.store.shard_io import encode_values  # noqa: E402

METRIC = MetricSpec()


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def _frozen(modules: list[torch.nn.Module]) -> Iterator[None]:
    params = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


# --- the bare baselines ------------------------------------------------------------


def bare_encode(model, saes, batch: TokenBatch) -> None:
    """What a user would run without circuitscan: forward to the SAE layer, encode."""
    names = [sae.cfg.metadata.hook_name for sae in saes]
    last = max(HookSite.from_hook_name(name).layer for name in names)
    inputs = {}

    def capture(tensor, hook):
        inputs[hook.name] = tensor

    with torch.no_grad():
        model.run_with_hooks(
            batch.tokens, fwd_hooks=[(n, capture) for n in names], stop_at_layer=last + 1
        )
        for sae, name in zip(saes, names, strict=True):
            sae.encode(inputs[name])


def bare_forward_backward(model, saes, batch: TokenBatch) -> None:
    """Forward + backward with the SAEs spliced in: ∂metric/∂(SAE activations), dense."""
    leaves = []

    def make_leaf(tensor, hook):
        leaf = tensor.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    hooks = [(f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post", make_leaf) for sae in saes]
    with spliced(model, saes), _frozen([model, *saes]), model.hooks(fwd_hooks=hooks):
        logits = model(batch.tokens)
        total = metric_per_prompt(
            logits, METRIC, lengths=batch.lengths, answer=batch.answer, wrong=batch.wrong
        ).sum()
        # allow_unused: spliced as sae_lens does it, the downstream SAE's
        # detached error term cuts the gradient to the upstream one.
        torch.autograd.grad(total, leaves, allow_unused=True)


def _bare_step(spent: dict, model, saes, batches: list[TokenBatch]) -> None:
    spent["bare"] = _timed(lambda: [bare_encode(model, saes, b) for b in batches])


def _bare_grad_step(spent: dict, model, saes, batches: list[TokenBatch]) -> None:
    spent["bare_grad"] = _timed(lambda: [bare_forward_backward(model, saes, b) for b in batches])


def _cache_step(
    spent: dict,
    model,
    saes,
    batches: list[TokenBatch],
    records: list[PromptRecord],
    shard_id: int,
    store: FeatureStore,
    metric: MetricSpec | None,
) -> None:
    """cache_batch per batch, then write_shard + commit_shard, as a job worker and driver do."""
    t0 = time.perf_counter()
    caches = [
        cache_batch(
            model,
            saes,
            batch.tokens,
            batch.lengths,
            metric,
            answer=batch.answer,
            wrong=batch.wrong,
            gradients=metric is not None,
        )
        for batch in batches
    ]
    compute = time.perf_counter() - t0
    token_lists = [ids for batch in batches for ids in batch.token_lists()]
    merged = merge_site_caches(caches)
    store.commit_shard(store.write_shard(shard_id, records, token_lists, merged))
    total = time.perf_counter() - t0
    if metric is None:
        spent.update(cache_compute=compute, cache=total, caches_a=caches)
    else:
        spent.update(cache_grad=total, caches_g=caches)


# --- layouts and stores --------------------------------------------------------------


def layout_for(saes, *, gradients: bool, shard_size: int, fingerprint: str) -> StoreLayout:
    sites = [HookSite.from_hook_name(sae.cfg.metadata.hook_name) for sae in saes]
    return StoreLayout(
        sites=[
            SiteLayout(label=site.label, hook_name=site.hook_name, d_sae=int(sae.cfg.d_sae))
            for site, sae in zip(sites, saes, strict=True)
        ],
        gradients=gradients,
        shard_size=shard_size,
        model_fingerprint=fingerprint,
    )


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pairs_in(store: FeatureStore) -> int:
    return sum(sum(e.n_entries.values()) for e in store.committed_entries().values())


# --- codec and chunk measurements -------------------------------------------------


CODECS: dict[str, Callable[[int], numcodecs.abc.Codec]] = {
    "zstd3": lambda size: numcodecs.Zstd(level=3),
    "blosc-lz4-shuffle": lambda size: numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
    "blosc-zstd1-shuffle": lambda size: numcodecs.Blosc("zstd", 1, numcodecs.Blosc.SHUFFLE),
    "blosc-zstd5-shuffle": lambda size: numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE),
    "blosc-zstd5-bitshuffle": lambda size: numcodecs.Blosc("zstd", 5, numcodecs.Blosc.BITSHUFFLE),
    "blosc-zstd9-shuffle": lambda size: numcodecs.Blosc("zstd", 9, numcodecs.Blosc.SHUFFLE),
}


def _encoded_size(data: np.ndarray, codec_name: str, delta: bool, chunk: int) -> tuple[int, float]:
    """(bytes, decode seconds) of ``data`` cut into chunks, as the store would write it."""
    codec = CODECS[codec_name](data.dtype.itemsize)
    filt = numcodecs.Delta(dtype=str(data.dtype)) if delta else None
    total, decode = 0, 0.0
    for start in range(0, len(data), chunk):
        part = np.ascontiguousarray(data[start : start + chunk])
        if filt is not None:
            part = filt.encode(part)
        blob = codec.encode(part)
        total += len(blob)
        decode += _timed(lambda blob=blob: codec.decode(blob))
    return total, decode


def codec_table(caches: dict[str, SiteCache]) -> None:
    """Bytes per pair and decode speed of each candidate codec, per array kind (real data)."""
    ids = np.concatenate([c.feature_ids.numpy().astype(np.uint16) for c in caches.values()])
    acts = np.concatenate([encode_values(c.activations, "float16") for c in caches.values()])
    grads = np.concatenate(
        [encode_values(c.gradients, "float16") for c in caches.values() if c.gradients is not None]
    )
    pairs = len(ids)
    print(
        f"\ncodecs on {pairs} real pairs (chunk {ENTRY_CHUNK} entries): bytes/pair, decode ns/pair"
    )
    kinds = [
        ("feature_ids", ids, False),
        ("feature_ids+delta", ids, True),
        ("activations f16", acts, False),
        ("gradients f16", grads, False),
    ]
    print(f"  {'array':<20}" + "".join(f"{name:>24}" for name in CODECS))
    for label, data, delta in kinds:
        cells = []
        for name in CODECS:
            size, seconds = _encoded_size(data, name, delta, ENTRY_CHUNK)
            cells.append(f"{size / pairs:>11.3f} B {seconds / pairs * 1e9:>7.1f} ns")
        print(f"  {label:<20}" + "".join(f"{c:>24}" for c in cells))
    print("\nchunk size (delta ids + acts + grads, blosc-zstd5-shuffle): bytes/pair, point decode")
    for chunk in (1 << 14, 1 << 16, 1 << 18):
        size = sum(
            _encoded_size(data, "blosc-zstd5-shuffle", delta, chunk)[0]
            for data, delta in ((ids, True), (acts, False), (grads, False))
        )
        one = CODECS["blosc-zstd5-shuffle"](2).encode(np.ascontiguousarray(acts[:chunk]))
        point = statistics.median(
            _timed(lambda one=one: CODECS["blosc-zstd5-shuffle"](2).decode(one)) for _ in range(20)
        )
        print(f"  {chunk:>7} entries: {size / pairs:6.3f} B/pair, one chunk {point * 1e3:6.3f} ms")


# --- synthetic query store -----------------------------------------------------------


def synthetic_store(url: str, n_tokens: int, *, d_sae: int = 2304, k: int = 32) -> FeatureStore:
    """A store of ≥ n_tokens tokens of plausible sparse activations (numpy, no model)."""
    prompt_len, shard_size = 64, 256
    layout = StoreLayout(
        sites=[
            SiteLayout(label="L15.resid_post", hook_name="blocks.15.hook_resid_post", d_sae=d_sae)
        ],
        shard_size=shard_size,
        model_fingerprint="synthetic",
    )
    store = FeatureStore.create(url, layout)
    rng = np.random.default_rng(0)
    live = np.sort(rng.choice(d_sae, 460, replace=False))
    log_popularity = np.log(1.0 / np.arange(1, len(live) + 1) ** 0.8)
    tokens_per_shard = shard_size * prompt_len
    n_shards = -(-n_tokens // tokens_per_shard)
    # Gumbel top-k: k distinct features per token, drawn by popularity; drawn
    # once, then each shard takes its tokens in a fresh random order.
    scores = log_popularity - np.log(-np.log(rng.random((tokens_per_shard, len(live)))))
    pattern = np.sort(live[np.argpartition(-scores, k, axis=1)[:, :k]], axis=1)
    for shard_id in range(n_shards):
        chosen = pattern[rng.permutation(tokens_per_shard)]
        n_entries = chosen.size
        cache = SiteCache(
            token_index=torch.arange(tokens_per_shard).repeat_interleave(k),
            feature_ids=torch.from_numpy(chosen.ravel().astype(np.int64)),
            activations=torch.from_numpy(rng.lognormal(0.0, 0.7, n_entries).astype(np.float32)),
            gradients=torch.from_numpy(rng.normal(0.0, 0.05, n_entries).astype(np.float32)),
            error_norm=torch.from_numpy(rng.random(tokens_per_shard).astype(np.float32)),
            dropped_mass=torch.zeros(tokens_per_shard),
            n_tokens=tokens_per_shard,
            d_sae=d_sae,
        )
        token_ids = rng.integers(1, 49000, (shard_size, prompt_len)).tolist()
        prompts = [PromptRecord(text=f"synthetic {shard_id}.{i}") for i in range(shard_size)]
        entry = store.write_shard(shard_id, prompts, token_ids, {"L15.resid_post": cache})
        store.commit_shard(entry)
    store.flush_index()
    return store


def query_latencies(url: str, n_queries: int = 200) -> tuple[int, float, float]:
    store = FeatureStore.open(url)
    site = store.layout.sites[0].label
    rng = np.random.default_rng(1)
    n_prompts = store.n_prompts()
    prompt_len = len(store.prompt_tokens(0))
    features_at(store, site, 0, 0)  # opening: manifest
    index = store.feature_index(site)  # opening: the merged index, once per process
    live = np.flatnonzero(index.count > 0)
    at_ms = []
    for _ in range(n_queries):
        prompt, position = int(rng.integers(n_prompts)), int(rng.integers(prompt_len))
        at_ms.append(_timed(lambda p=prompt, q=position: features_at(store, site, p, q)) * 1e3)
    top_ms = []
    for _ in range(n_queries):
        feature = int(rng.choice(live))
        top_ms.append(_timed(lambda f=feature: top_examples(store, site, f, n=20, context=8)) * 1e3)
    print(
        f"\nqueries on {store.n_tokens()} tokens: features_at p50 {np.median(at_ms):.2f} ms "
        f"(p90 {np.percentile(at_ms, 90):.2f}); top_examples(20) p50 {np.median(top_ms):.2f} ms "
        f"(p90 {np.percentile(top_ms, 90):.2f})"
    )
    return store.n_tokens(), float(np.median(top_ms)), float(np.median(at_ms))


# --- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 64 prompts: one full shard (the layout default) for the bytes figures.
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument(
        "--shard-size", type=int, default=64, help="Prompts per shard (job default)."
    )
    parser.add_argument("--batch", type=int, default=16, help="Prompts per forward pass.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--query-tokens", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from circuitscan.services.model_loading import load_model
    from circuitscan.services.sae_loading import load_default_saes

    loaded = load_model()
    model = loaded.model
    saes = [s.sae for s in load_default_saes(model)]
    # As a job worker does after loading (services/jobs/worker.py): keep the
    # long-lived objects out of the garbage collector's full collections.
    gc.collect()
    gc.freeze()
    records = generate_ioi(model.tokenizer, args.prompts, seed=0)
    shards = [records[i : i + args.shard_size] for i in range(0, len(records), args.shard_size)]
    shard_batches = [
        [
            tokenize_prompts(model, shard[i : i + args.batch])
            for i in range(0, len(shard), args.batch)
        ]
        for shard in shards
    ]
    batches = [batch for group in shard_batches for batch in group]
    n_tokens = sum(int(b.lengths.sum()) for b in batches)
    print(
        f"model {loaded.name} ({model.cfg.n_layers} layers), SAEs "
        f"{[s.cfg.metadata.hook_name for s in saes]}, {len(records)} IOI prompts, "
        f"{n_tokens} tokens, shards of {args.shard_size} prompts in batches of {args.batch}, "
        f"torch threads {args.threads}, cpu"
    )
    cache_batch(model, saes, batches[0].tokens, batches[0].lengths, None, gradients=False)

    work = Path(tempfile.mkdtemp(prefix="circuitscan-bench-store-"))
    times: dict[str, list[float]] = {
        k: [] for k in ("bare", "cache", "cache_compute", "bare_grad", "cache_grad")
    }
    grad_caches: list[dict[str, SiteCache]] = []
    act_caches: list[dict[str, SiteCache]] = []
    # Each shard is timed as adjacent pairs (baseline, circuitscan), the pair's
    # order alternating, and the ratio is the median over pairs: on a shared
    # machine the load drifts on the scale of seconds, which round totals and
    # a fixed order turn into bias.
    pair_ratios: dict[str, list[float]] = {"acts": [], "acts_compute": [], "grads": []}
    for round_index in range(args.rounds):
        shard_size = args.shard_size
        layout_a = layout_for(saes, gradients=False, shard_size=shard_size, fingerprint="a")
        layout_g = layout_for(saes, gradients=True, shard_size=shard_size, fingerprint="g")
        store_a = FeatureStore.create(str(work / f"round{round_index}a"), layout_a)
        store_g = FeatureStore.create(str(work / f"round{round_index}g"), layout_g)
        row = dict.fromkeys(times, 0.0)
        for shard_id, (group, chunk) in enumerate(zip(shard_batches, shards, strict=True)):
            flip = (round_index + shard_id) % 2 == 1
            spent: dict[str, float] = {}
            steps = [
                partial(_bare_step, spent, model, saes, group),
                partial(_cache_step, spent, model, saes, group, chunk, shard_id, store_a, None),
                partial(_bare_grad_step, spent, model, saes, group),
                partial(_cache_step, spent, model, saes, group, chunk, shard_id, store_g, METRIC),
            ]
            for pair in (steps[:2], steps[2:]):
                for step in reversed(pair) if flip else pair:
                    step()
            if round_index == 0:
                act_caches += spent.pop("caches_a")  # type: ignore[arg-type]
                grad_caches += spent.pop("caches_g")  # type: ignore[arg-type]
            for key in row:
                row[key] += spent[key]
            pair_ratios["acts"].append(spent["bare"] / spent["cache"])
            pair_ratios["acts_compute"].append(spent["bare"] / spent["cache_compute"])
            pair_ratios["grads"].append(spent["bare_grad"] / spent["cache_grad"])
        for key, value in row.items():
            times[key].append(value)
        print(
            f"round {round_index}: bare fwd+encode {row['bare']:.2f}s, cache acts {row['cache']:.2f}s "
            f"(compute {row['cache_compute']:.2f}s); bare fwd+bwd {row['bare_grad']:.2f}s, "
            f"cache acts+grads {row['cache_grad']:.2f}s"
        )
    ratio = statistics.median(pair_ratios["acts"])
    ratio_grad = statistics.median(pair_ratios["grads"])
    print(
        f"per-batch ratios: acts {[round(r, 2) for r in pair_ratios['acts']]}, "
        f"grads {[round(r, 2) for r in pair_ratios['grads']]}"
    )
    print(
        f"cache_vs_bare {ratio:.3f} (compute only "
        f"{statistics.median(pair_ratios['acts_compute']):.3f}), "
        f"cache_grad_vs_bare {ratio_grad:.3f}"
    )

    # Bytes on disk, shards of 64 prompts (the layout default), real activations.
    merged_a, merged_g = merge_site_caches(act_caches), merge_site_caches(grad_caches)
    codec_table(merged_g)
    per_pair = {}
    token_lists = [ids for batch in batches for ids in batch.token_lists()]
    for name, gradients, merged in (("acts", False, merged_a), ("grads", True, merged_g)):
        path = work / f"bytes-{name}"
        store = FeatureStore.create(
            str(path), layout_for(saes, gradients=gradients, shard_size=64, fingerprint=name)
        )
        lo = 0
        for shard_id in range(-(-len(records) // 64)):
            shard_records = records[shard_id * 64 : (shard_id + 1) * 64]
            shard_tokens = token_lists[shard_id * 64 : (shard_id + 1) * 64]
            n = sum(len(t) for t in shard_tokens)
            part = {label: _slice_tokens(cache, lo, lo + n) for label, cache in merged.items()}
            store.commit_shard(store.write_shard(shard_id, shard_records, shard_tokens, part))
            lo += n
        store.flush_index()
        per_pair[name] = directory_bytes(path) / pairs_in(store)
        print(
            f"store with {'acts+grads' if gradients else 'acts only'}: "
            f"{directory_bytes(path)} bytes, {pairs_in(store)} pairs, {per_pair[name]:.3f} B/pair "
            f"({_breakdown(path, pairs_in(store))})"
        )

    # Read back every activation vs recompute them.
    reads = []
    for _ in range(3):
        reader = FeatureStore.open(str(work / "bytes-acts"))
        reads.append(
            _timed(lambda r=reader: [list(iter_shards(r, s.label)) for s in r.layout.sites])
        )
    read_s = statistics.median(reads)
    recompute_s = statistics.median(times["cache_compute"])
    speedup = recompute_s / read_s
    print(
        f"read all activations {read_s * 1e3:.1f} ms vs recompute {recompute_s:.2f}s: {speedup:.1f}x"
    )

    t0 = time.perf_counter()
    query_url = str(work / "query-store")
    synthetic_store(query_url, args.query_tokens)
    print(f"synthetic query store built in {time.perf_counter() - t0:.1f}s")
    q_tokens, top_p50, at_p50 = query_latencies(query_url)
    print(f"total {time.perf_counter() - started:.0f}s; scratch {work}")
    _remove(work)
    print(
        json.dumps(
            {
                "cache_vs_bare_ratio": round(ratio, 3),
                "cache_grad_vs_bare_ratio": round(ratio_grad, 3),
                "bytes_per_pair": round(per_pair["acts"], 3),
                "bytes_per_pair_with_grad": round(per_pair["grads"], 3),
                "read_vs_recompute_speedup": round(speedup, 1),
                "query_tokens": q_tokens,
                "top_examples_p50_ms": round(top_p50, 3),
                "features_at_p50_ms": round(at_p50, 3),
            }
        )
    )


def _slice_tokens(cache: SiteCache, lo: int, hi: int) -> SiteCache:
    keep = (cache.token_index >= lo) & (cache.token_index < hi)
    return SiteCache(
        token_index=cache.token_index[keep] - lo,
        feature_ids=cache.feature_ids[keep],
        activations=cache.activations[keep],
        gradients=cache.gradients[keep] if cache.gradients is not None else None,
        error_norm=cache.error_norm[lo:hi],
        dropped_mass=cache.dropped_mass[lo:hi],
        n_tokens=hi - lo,
        d_sae=cache.d_sae,
    )


def _breakdown(path: Path, pairs: int) -> str:
    groups: dict[str, int] = {}
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        parts = f.relative_to(path).parts
        if parts[0] == "shards" and len(parts) > 4 and parts[2] == "sites":
            name = parts[4]
        elif parts[0] == "shards" and len(parts) > 3:
            name = parts[2] + "/" + parts[3]
        else:
            name = parts[0]
        if f.name == "zarr.json":
            name = "metadata"
        groups[name] = groups.get(name, 0) + f.stat().st_size
    return ", ".join(
        f"{k} {v / pairs:.3f}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
    )


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
