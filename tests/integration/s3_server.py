"""A real S3-compatible server for tests: moto's server mode, with a ``circuitscan`` bucket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUCKET = "circuitscan"
_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "CIRCUITSCAN_S3_ENDPOINT",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_s3() -> Iterator[str]:
    """Start the server on a free port, point this process's S3 settings at it; yield its URL.

    Its own process, not a thread of the test process: in-process, every
    request competes with the client for the GIL. Child processes started
    meanwhile inherit the settings through the environment.
    """
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in _ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        CIRCUITSCAN_S3_ENDPOINT=endpoint,
    )
    try:
        s3_client().create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def s3_client():
    import boto3

    return boto3.client(
        "s3", endpoint_url=os.environ["CIRCUITSCAN_S3_ENDPOINT"], region_name="us-east-1"
    )


def upload_folder(folder: Path, prefix: str) -> None:
    """Copy a local store folder to ``s3://BUCKET/PREFIX/`` object by object."""
    client = s3_client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
