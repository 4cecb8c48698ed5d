"""HTTP API benchmark: concurrent clients querying a ≥ 100k-token store over loopback.

    .venv/bin/python bench/api.py [--tokens 102400] [--clients 50] [--seconds 15]
                                  [--warmup 10] [--think-ms 0] [--workers 2] [--quick]

``--quick`` shortens the concurrent-client part (a 20,480-token store, 10
clients, 5 s after 3 s, one worker, 200 pages after 20) and keeps the
feature-page store at its full size: the page figure is only taken on a
store of at least a million tokens (``--page-tokens`` refuses less).

Builds a synthetic store (one site, d_sae 4096, 24 features per token drawn
with skewed popularity, like real SAEs; token ids decoded by the default
model's tokenizer when it is installed), starts ``circuitscan serve`` (real
uvicorn, ``--workers`` processes, one per core by default) on 127.0.0.1,
answers one query of each kind (cold start, timed apart), and runs
``--clients`` concurrent clients (one keep-alive connection each, a minimal
HTTP/1.1 client so that the load generator leaves the CPU to the server) for
``--seconds`` after a ``--warmup`` (each worker decodes the shards it
touches once): each client alternates top-examples queries of a random live
feature (20 examples, 8 tokens of context, decoded) and features-at queries
of a random (prompt, position) (top 32 by attribution). ``--think-ms`` adds a
pause between a client's requests (0: back to back, the hardest case).

Then feature pages: a second store of ``--page-tokens`` tokens (≥ 1M by
default; same synthetic data, with stored feature directions of random
unit-free values so the logit effects and reading heads are read as for a
real store) on the same server; after a warm-up of ``--page-warmup`` pages,
``--pages`` feature pages of random live features are fetched one at a time
(``GET …/features/{f}/page``: statistics, histogram, 10 top examples and 6
sampled weaker ones with per-token values and decoded tokens, logit effects,
reading heads, metric pushes), each timed end to end. The same pages are
then built in this process on a freshly opened store with no decoded chunks
kept (``chunk_cache_bytes = 0``), after one untimed page that sorts the
sample shards (once per open store): the page when its examples' chunks are
read and decoded every time.

Prints per-query-kind latency percentiles; the last line is one JSON object:
api_p50_ms, api_p99_ms (over all queries in the timed window), api_rps
(completed queries per second), api_errors (non-200 answers and transport
errors, warm-up included), feature_page_p50_ms, feature_page_p99_ms,
feature_page_tokens (the page store's size) and feature_page_uncached_p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from circuitscan.pipelines.caching import SiteCache
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import SiteLayout, StoreLayout
from circuitscan.services.store import FeatureStore

SITE = "L15.resid_post"
D_SAE = 4096
PER_TOKEN = 24
PROMPT_LEN = 32
SHARD_SIZE = 128


def build_store(path: Path, n_tokens: int, *, one_draw: bool = False) -> tuple[int, list[int]]:
    """Write the synthetic store; returns (prompts, live feature ids).

    ``one_draw``: draw the per-token features once and give each shard its
    tokens in a fresh random order (as bench/store.py does), so that a store
    of a million tokens builds in about a minute.
    """
    layout = StoreLayout(
        sites=[SiteLayout(label=SITE, hook_name="blocks.15.hook_resid_post", d_sae=D_SAE)],
        shard_size=SHARD_SIZE,
        model_fingerprint="synthetic",
        examples_per_feature=32,
    )
    store = FeatureStore.create(str(path), layout)
    rng = np.random.default_rng(0)
    live = np.sort(rng.choice(D_SAE, 800, replace=False))
    log_popularity = np.log(1.0 / np.arange(1, len(live) + 1) ** 0.8)
    tokens_per_shard = SHARD_SIZE * PROMPT_LEN
    n_shards = -(-n_tokens // tokens_per_shard)
    pattern = None
    for shard_id in range(n_shards):
        if pattern is None or not one_draw:
            # Gumbel top-k: PER_TOKEN distinct features per token, drawn by popularity.
            scores = log_popularity - np.log(-np.log(rng.random((tokens_per_shard, len(live)))))
            top = np.argpartition(-scores, PER_TOKEN, axis=1)[:, :PER_TOKEN]
            pattern = np.sort(live[top], axis=1)
        chosen = pattern[rng.permutation(tokens_per_shard)] if one_draw else pattern
        n = chosen.size
        cache = SiteCache(
            token_index=torch.arange(tokens_per_shard).repeat_interleave(PER_TOKEN),
            feature_ids=torch.from_numpy(chosen.ravel().astype(np.int64)),
            activations=torch.from_numpy(rng.lognormal(0.0, 0.7, n).astype(np.float32)),
            gradients=torch.from_numpy(rng.normal(0.0, 0.05, n).astype(np.float32)),
            error_norm=torch.from_numpy(rng.random(tokens_per_shard).astype(np.float32)),
            dropped_mass=torch.zeros(tokens_per_shard),
            n_tokens=tokens_per_shard,
            d_sae=D_SAE,
        )
        token_ids = rng.integers(1, 49000, (SHARD_SIZE, PROMPT_LEN)).tolist()
        prompts = [PromptRecord(text=f"synthetic {shard_id}.{i}") for i in range(SHARD_SIZE)]
        store.commit_shard(store.write_shard(shard_id, prompts, token_ids, {SITE: cache}))
    store.flush_index()
    return store.n_prompts(), [int(f) for f in live]


def add_directions(path: Path, k: int = 10, heads: int = 5) -> None:
    """Stored feature directions for the synthetic site (random values; read like real ones)."""
    from circuitscan.services.store.feature_directions import write_directions

    rng = np.random.default_rng(1)
    values = -np.sort(-rng.normal(0, 1, (D_SAE, k)).astype(np.float32), axis=1)
    arrays = {
        "top_ids": rng.integers(1, 49000, (D_SAE, k)).astype(np.int32),
        "top_values": np.abs(values),
        "bottom_ids": rng.integers(1, 49000, (D_SAE, k)).astype(np.int32),
        "bottom_values": -np.abs(values),
        "head_layers": rng.integers(16, 30, (D_SAE, heads)).astype(np.int32),
        "head_indices": rng.integers(0, 9, (D_SAE, heads)).astype(np.int32),
        "head_gains": np.abs(values[:, :heads]),
    }
    write_directions(FeatureStore.open(str(path)), SITE, arrays)


def time_pages(url: str, live: list[int], n_pages: int, warmup: int) -> tuple[list[float], int]:
    """Latencies (ms) of ``n_pages`` feature pages fetched one at a time, and errors."""
    rng = random.Random(7)
    errors = 0
    latencies = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(warmup + n_pages):
            target = f"/api/stores/pages/sites/{SITE}/features/{rng.choice(live)}/page"
            sent = time.perf_counter()
            response = client.get(target)
            elapsed = (time.perf_counter() - sent) * 1e3
            ok = response.status_code == 200 and bool(response.json()["top"])
            errors += 0 if ok else 1
            if i >= warmup and ok:
                latencies.append(elapsed)
    return latencies, errors


def time_uncached_pages(path: Path, live: list[int], n_pages: int) -> list[float]:
    """Latencies (ms) of feature pages built in-process with no decoded chunk kept."""
    from circuitscan.services.store.feature_page import feature_page

    store = FeatureStore.open(str(path))
    store.chunk_cache_bytes = 0
    rng = random.Random(11)
    # Once per open store the sample shards are decoded and sorted by feature (the
    # weaker examples' source): that first page is not what a page costs.
    feature_page(store, SITE, live[0])
    latencies = []
    for _ in range(n_pages):
        sent = time.perf_counter()
        feature_page(store, SITE, rng.choice(live)).model_dump_json()
        latencies.append((time.perf_counter() - sent) * 1e3)
    return latencies


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, log, workers: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, CIRCUITSCAN_API_STORE_ROOT=str(root), CIRCUITSCAN_API_TOKENS="")
    command = [sys.executable, "-m", "circuitscan.services.cli", "serve", "--port", str(port)]
    command += ["--workers", str(workers)]
    # Same process group as this script: a runner that kills the group on a
    # timeout takes the server (and its worker processes) with it.
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a loaded machine imports slowly
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the API server exited during startup")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the API server did not start")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # uvicorn's supervisor stops its workers on SIGTERM
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough HTTP for GETs.

    A full client library costs about a millisecond of CPU per request; on a
    small machine that would be time taken from the server being measured.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        request = f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n"
        self.writer.write(request.encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def run_clients(
    url: str,
    n_clients: int,
    seconds: float,
    warmup: float,
    think_ms: float,
    n_prompts: int,
    live: list[int],
) -> tuple[dict[str, list[float]], int, float]:
    """Latencies (ms) per query kind inside the timed window, errors, window length (s)."""
    host, port = url.removeprefix("http://").split(":")
    latencies: dict[str, list[float]] = {"top_examples": [], "features_at": []}
    errors = 0
    start = time.perf_counter()
    window_start = start + warmup
    stop = window_start + seconds
    base = f"/api/stores/bench/sites/{SITE}"

    async def client(index: int) -> None:
        nonlocal errors
        rng = random.Random(index)
        connection = Connection(host, int(port))
        turn = index % 2
        while time.perf_counter() < stop:
            if turn == 0:
                kind = "top_examples"
                target = f"{base}/features/{rng.choice(live)}/examples?limit=20&context=8"
            else:
                kind = "features_at"
                prompt, position = rng.randrange(n_prompts), rng.randrange(PROMPT_LEN)
                target = f"{base}/prompts/{prompt}/positions/{position}/features?limit=32"
            turn = 1 - turn
            sent = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(connection.get(target), timeout=30)
                ok = status == 200 and body.startswith(b"{")
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                ok = False
                await connection.close()  # start over on a fresh connection
            done = time.perf_counter()
            if not ok:
                errors += 1
            elif sent >= window_start and done <= stop:
                latencies[kind].append((done - sent) * 1e3)
            if think_ms:
                await asyncio.sleep(think_ms / 1e3)
        await connection.close()

    await asyncio.gather(*(client(i) for i in range(n_clients)))
    return latencies, errors, seconds


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=102_400, help="Tokens in the store.")
    parser.add_argument("--clients", type=int, default=50, help="Concurrent clients.")
    parser.add_argument("--seconds", type=float, default=15.0, help="Timed window (s).")
    parser.add_argument("--warmup", type=float, default=10.0, help="Untimed warm-up (s).")
    parser.add_argument("--think-ms", type=float, default=0.0, help="Pause between requests.")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="uvicorn worker processes."
    )
    parser.add_argument(
        "--page-tokens", type=int, default=1 << 20, help="Tokens in the feature-page store."
    )
    parser.add_argument("--pages", type=int, default=300, help="Timed feature pages.")
    parser.add_argument("--page-warmup", type=int, default=40, help="Untimed feature pages.")
    parser.add_argument(
        "--quick", action="store_true", help="A short client run; the page store stays ≥ 1M."
    )
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.clients, args.seconds, args.warmup = 20_480, 10, 5.0, 3.0
        args.workers, args.pages, args.page_warmup = 1, 200, 20
    if args.page_tokens < 1_000_000:
        parser.error("--page-tokens: feature_page_p99_ms is measured on a ≥ 1M-token store")
    # The server process inherits these: it must never try to reach a model hub.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")

    with tempfile.TemporaryDirectory(prefix="bench_api_") as tmp, tempfile.TemporaryFile() as log:
        root = Path(tmp) / "stores"
        root.mkdir()
        started = time.perf_counter()
        n_prompts, live = build_store(root / "bench", args.tokens)
        store = FeatureStore.open(str(root / "bench"))
        print(
            f"store: {store.n_tokens()} tokens, {n_prompts} prompts, "
            f"{len(store.committed_shard_ids())} shards, d_sae {D_SAE}, {PER_TOKEN} features/token "
            f"(built in {time.perf_counter() - started:.1f}s)",
            flush=True,
        )
        started = time.perf_counter()
        build_store(root / "pages", args.page_tokens, one_draw=True)
        add_directions(root / "pages")
        pages_store = FeatureStore.open(str(root / "pages"))
        page_tokens = pages_store.n_tokens()
        print(
            f"page store: {page_tokens} tokens in {len(pages_store.committed_shard_ids())} "
            f"shards (built in {time.perf_counter() - started:.1f}s)",
            flush=True,
        )
        process, url = start_server(root, log, args.workers)
        try:
            # Cold start (opening the store, loading the tokenizer) is timed apart.
            cold = time.perf_counter()
            for _ in range(args.workers):  # each worker process has its own caches
                for path in (
                    f"/api/stores/bench/sites/{SITE}/features/{live[0]}/examples",
                    f"/api/stores/bench/sites/{SITE}/prompts/0/positions/0/features",
                ):
                    httpx.get(url + path, timeout=120).raise_for_status()
            print(f"cold start: first queries answered in {time.perf_counter() - cold:.1f}s")
            latencies, errors, window = asyncio.run(
                run_clients(
                    url, args.clients, args.seconds, args.warmup, args.think_ms, n_prompts, live
                )
            )
            pages, page_errors = time_pages(url, live, args.pages, args.page_warmup)
        finally:
            stop_server(process)
        uncached = time_uncached_pages(root / "pages", live, min(args.pages, 100))

    every = latencies["top_examples"] + latencies["features_at"]
    print(
        f"{args.clients} clients, {window:.0f}s timed after {args.warmup:.0f}s warm-up, "
        f"think time {args.think_ms:g} ms, {args.workers} uvicorn worker process(es); "
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    )
    for kind, values in latencies.items():
        print(
            f"  {kind:13s} n={len(values):6d}  p50 {_pct(values, 50):7.2f} ms  "
            f"p90 {_pct(values, 90):7.2f} ms  p99 {_pct(values, 99):7.2f} ms  "
            f"max {max(values, default=float('nan')):7.2f} ms"
        )
    print(f"  errors: {errors}")
    print(
        f"  feature_page  n={len(pages):6d}  p50 {_pct(pages, 50):7.2f} ms  "
        f"p90 {_pct(pages, 90):7.2f} ms  p99 {_pct(pages, 99):7.2f} ms  "
        f"max {max(pages, default=float('nan')):7.2f} ms  ({page_tokens} tokens, one at a time, "
        f"{page_errors} errors)"
    )
    print(
        f"  page, nothing cached (in-process, a fresh store, no decoded chunks kept) "
        f"n={len(uncached)}  p50 {_pct(uncached, 50):7.2f} ms  p99 {_pct(uncached, 99):7.2f} ms"
    )
    result = {
        "api_p50_ms": round(_pct(every, 50), 2),
        "api_p99_ms": round(_pct(every, 99), 2),
        "api_rps": round(len(every) / window, 1),
        "api_errors": errors + page_errors,
        "feature_page_p50_ms": round(_pct(pages, 50), 2),
        "feature_page_p99_ms": round(_pct(pages, 99), 2),
        "feature_page_tokens": page_tokens,
        "feature_page_uncached_p99_ms": round(_pct(uncached, 99), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
