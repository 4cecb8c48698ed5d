"""The moto S3 server behind a counting HTTP proxy: how many requests a piece of work makes.

The proxy forwards every request unchanged (moto does not check signatures
against the host) and counts it by method; circuitscan's S3 settings point
at the proxy, so every request the store makes, through s3fs or boto, is seen.
"""

from __future__ import annotations

import http.client
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
