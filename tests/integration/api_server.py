"""Helpers for the API and browser tests: a real store written from a tiny model, a real server.

The store is written exactly as a job writes one (tokenize → cache_batch →
write_shard → commit_shard → flush_index), from the tiny Hugging Face Llama
fixture, whose real tokenizer lets the API decode tokens.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.caching import cache_batch
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.models import ModelSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import SiteLayout, StoreLayout
from circuitscan.services.api import ApiSettings
from circuitscan.services.store import FeatureStore
from circuitscan.testing import build_tiny_sae

SITES = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]
D_SAE = 48
SHARD_SIZE = 2
PROMPTS = [
    PromptRecord(
        text="When Mary and John went to the store, John gave a drink to",
        answer=" Mary",
        wrong=" John",
    ),
    PromptRecord(
        text="When Tom and Anna went to the park, Anna gave a ball to", answer=" Tom", wrong=" Anna"
    ),
    PromptRecord(
        text="After Lisa and Mark met at the cafe, Mark handed a book to",
        answer=" Lisa",
        wrong=" Mark",
    ),
    PromptRecord(text="The cat sat on the mat and looked at the dog", answer=" and", wrong=" the"),
    PromptRecord(
        text="Paris is the capital city of France and Rome is the capital of",
        answer=" Italy",
        wrong=" France",
    ),
]


def build_store(path: Path, model_dir: Path) -> FeatureStore:
    """Write a complete store of PROMPTS (3 shards) for the tiny Llama at ``model_dir``."""
    from circuitscan.services.model_loading import load_model

    torch.manual_seed(0)
    model = load_model(ModelSpec(source=str(model_dir))).model
    saes = [
        build_tiny_sae(model, site, d_sae=D_SAE, seed=i, dtype=torch.float32)
        for i, site in enumerate(SITES)
    ]
    layout = StoreLayout(
        sites=[
            SiteLayout(label=s.label, hook_name=s.hook_name, d_sae=D_SAE, sae_fingerprint=f"sae{i}")
            for i, s in enumerate(SITES)
        ],
        shard_size=SHARD_SIZE,
        examples_per_feature=8,
        model_fingerprint="tiny-llama",
        job_hash="api-test",
        job_spec={
            "name": "api-test",
            "model": {"source": str(model_dir)},
            "job": {"kind": "cache"},
        },
    )
    store = FeatureStore.create(str(path), layout)
    for shard_id, start in enumerate(range(0, len(PROMPTS), SHARD_SIZE)):
        prompts = PROMPTS[start : start + SHARD_SIZE]
        batch = tokenize_prompts(model, prompts, device="cpu")
        caches = cache_batch(
            model,
            saes,
            batch.tokens,
            batch.lengths,
            MetricSpec(),
            answer=batch.answer,
            wrong=batch.wrong,
        )
        entry = FeatureStore.open(str(path)).write_shard(
            shard_id, prompts, batch.token_lists(), caches
        )
        store.commit_shard(entry)
    store.flush_index()
    return store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def api_server(
    store_root: Path,
    *,
    tokens: str = "",
    ray_address: str | None = None,
    extra_env: dict[str, str] | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[str]:
    """``circuitscan serve`` (real uvicorn) in a subprocess on a free port; yields its base URL."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        CIRCUITSCAN_API_STORE_ROOT=str(store_root),
        CIRCUITSCAN_API_TOKENS=tokens,
        CIRCUITSCAN_API_MAX_BODY_BYTES="65536",
        CIRCUITSCAN_API_MAX_PAGE_SIZE="100",
        CIRCUITSCAN_API_STORE_REFRESH_SECONDS="0",
    )
    env.pop("CIRCUITSCAN_API_RAY_ADDRESS", None)
    if ray_address:
        env["CIRCUITSCAN_API_RAY_ADDRESS"] = ray_address
    env.update(extra_env or {})
    command = [
        sys.executable,
        "-m",
        "circuitscan.services.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # A file, not a pipe: a pipe nobody reads would stall a chatty server.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, process, log, startup_timeout)
            yield url
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise RuntimeError(f"the API server exited early:\n{output[-4000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the API server did not come up in time")
        time.sleep(0.2)


@contextmanager
def thread_server(settings: ApiSettings, startup_timeout: float = 30.0) -> Iterator[str]:
    """``create_app(settings)`` on a real uvicorn server in a thread; yields its base URL."""
    import threading

    import uvicorn

    from circuitscan.services.api import create_app

    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"api-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the threaded API server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
