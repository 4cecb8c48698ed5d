"""A private local Ray head with its job server, for tests that submit real Ray jobs.

Every port is chosen free, the temp dir is private, and teardown kills exactly
the processes this head started: the descendants of the ``ray start`` process
and any process whose command line names the private temp dir (Ray
daemonises some of them). Never ``ray stop``: that would kill every Ray on
the machine.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from api_server import free_port


class RayHeadUnavailable(RuntimeError):
    """The head or its job server did not come up in time on this machine."""


@dataclass(frozen=True)
class RayHead:
    """A running private head."""

    dashboard_url: str
    temp_dir: Path


def _ours(temp_dir: str, root: psutil.Process | None) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    if root is not None:
        try:
            for child in [root, *root.children(recursive=True)]:
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        if temp_dir in cmdline and process.pid != os.getpid():
            found[process.pid] = process
    return list(found.values())


def _kill_ours(temp_dir: str, root: psutil.Process | None) -> None:
    processes = _ours(temp_dir, root)
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


@contextmanager
def local_ray_head(env: dict[str, str], timeout: float = 150.0) -> Iterator[RayHead]:
    """Start ``ray start --head --block`` with a dashboard; RayHeadUnavailable on timeout."""
    # A short path: Ray's unix sockets live under it and have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="csray_", dir="/tmp")
    dashboard_port = free_port()
    worker_base = random.randrange(20000, 60000, 200)
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--min-worker-port={worker_base}",
        f"--max-worker-port={worker_base + 199}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    full_env = dict(os.environ) | env
    # Ray enables token auth on a new head when ~/.ray/auth_token exists (any
    # earlier ray.init() writes one); this private loopback head opts out so
    # that the API's job client needs no cluster token.
    full_env["RAY_AUTH_MODE"] = "disabled"
    # Job entrypoints (``circuitscan run``) must find this environment's scripts.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    try:
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(
                command, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            root = psutil.Process(process.pid)
            url = f"http://127.0.0.1:{dashboard_port}"
            try:
                deadline = time.monotonic() + timeout
                while True:
                    if process.poll() is not None:
                        log.seek(0)
                        tail = log.read().decode(errors="replace")[-3000:]
                        raise RayHeadUnavailable(
                            f"ray start exited with {process.returncode}:\n{tail}"
                        )
                    try:
                        # The job server answers once the dashboard's job module is up.
                        if httpx.get(f"{url}/api/jobs/", timeout=3).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RayHeadUnavailable(
                            f"the Ray job server was not up after {timeout:.0f}s"
                        )
                    time.sleep(1.0)
                yield RayHead(dashboard_url=url, temp_dir=Path(temp_dir))
            finally:
                _kill_ours(temp_dir, root)
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=10)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
