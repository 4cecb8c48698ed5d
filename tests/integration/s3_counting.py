"""The moto S3 server behind a counting HTTP proxy: how many requests a piece of work makes.

The proxy forwards every request unchanged (moto does not check signatures
against the host) and counts it by method; circuitscan's S3 settings point
at the proxy, so every request the store makes, through s3fs or boto, is seen.

``shard_tail_requests`` counts what a job's shard tail asks of the store,
shard by shard and flush by flush (the S3 request test and bench/scale.py).
"""

from __future__ import annotations

import http.client
import os
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from s3_server import BUCKET, moto_s3


class RequestCounter:
    """Requests seen since the last reset, by HTTP method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_method: Counter[str] = Counter()

    def add(self, method: str) -> None:
        with self._lock:
            self.by_method[method] += 1

    def reset(self) -> None:
        with self._lock:
            self.by_method.clear()

    def total(self) -> int:
        with self._lock:
            return sum(self.by_method.values())


def _handler(target: str, counter: RequestCounter) -> type[BaseHTTPRequestHandler]:
    host = urlsplit(target)

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            counter.add(self.command)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            upstream = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            upstream.request(self.command, self.path, body=body, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
            self.send_response(reply.status, reply.reason)
            for key, value in reply.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Forward


@contextmanager
def counted_s3() -> Iterator[tuple[str, RequestCounter]]:
    """(bucket, counter) with this process's S3 settings pointing at a counting proxy of moto."""
    with moto_s3() as endpoint:
        counter = RequestCounter()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(endpoint, counter))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        os.environ["CIRCUITSCAN_S3_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}"
        try:
            yield BUCKET, counter
        finally:
            server.shutdown()
            os.environ["CIRCUITSCAN_S3_ENDPOINT"] = endpoint


PHASES = ("check", "write", "commit")


@dataclass
class TailRequests:
    """Requests of a job's shard tail: each shard's phases, and each index flush."""

    interval: int  # commits between the flushes a job makes
    shards: list[dict[str, int]] = field(default_factory=list)  # phase -> requests, by shard
    flushes: list[int] = field(default_factory=list)  # requests of each flush, the last one's too

    def phase_per_shard(self, phase: str) -> float:
        return sum(shard[phase] for shard in self.shards) / len(self.shards)

    def per_shard(self) -> float:
        """Every request of the job (its flushes, the last one's too) over its shards."""
        phases = sum(sum(shard.values()) for shard in self.shards)
        return (phases + sum(self.flushes)) / len(self.shards)


def shard_tail_requests(
    counter: RequestCounter,
    url: str,
    layout: Any,
    shard: Sequence[Any],
    n_shards: int,
    flush_every: int | None = None,
) -> TailRequests:
    """Create the store at ``url`` and run ``n_shards`` shard tails as a job does, counted:
    the worker's committed check, ``write_shard`` of ``shard`` (prompts, token ids, site
    caches), the driver's commit (its manifest read once, before), the index flushes the
    commits make and the job's last ``flush_index``."""
    from circuitscan.services.jobs.shard_runner import already_committed
    from circuitscan.services.store import FeatureStore

    FeatureStore.create(url, layout)
    driver = FeatureStore.open(url)
    driver.committed_shard_ids()  # the driver reads the manifest once, at its start
    if flush_every is not None:
        driver.index_flush_every = flush_every
    worker = FeatureStore.open(url)
    tail = TailRequests(interval=driver.index.flush_interval())

    def counted(flush: Any) -> Any:
        def counted_flush() -> None:
            before = counter.total()
            flush()
            tail.flushes.append(counter.total() - before)

        return counted_flush

    # The flushes commits make (runs or compactions) and the job's last one.
    driver.index.flush_recent = counted(driver.index.flush_recent)  # type: ignore[method-assign]
    driver.index.flush = counted(driver.index.flush)  # type: ignore[method-assign]
    counter.reset()
    for shard_id in range(n_shards):
        marks = [counter.total()]
        assert already_committed(worker, shard_id) is None
        marks.append(counter.total())
        entry = worker.write_shard(shard_id, *shard)
        marks.append(counter.total())
        flushed = len(tail.flushes)
        assert driver.commit_shard(entry, verify=False)
        marks.append(counter.total() - sum(tail.flushes[flushed:]))  # the flush apart
        tail.shards.append({p: marks[i + 1] - marks[i] for i, p in enumerate(PHASES)})
    driver.flush_index()
    return tail
