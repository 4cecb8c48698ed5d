"""A driver that dies leaves nothing running that it started.

A real driver process starts an embedded local Ray the way every job does
(``ray_pool.connect``) and one actor; the test SIGKILLs it and checks that
every process it had started (Ray's GCS, raylet, dashboard agent,
runtime-env agent, the actor's worker...) is gone. Only the processes of
the driver this test started are looked at: other Ray work on the machine
is none of its business.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.integration

DRIVER = """
import os, time
import ray
from circuitscan.services.jobs.ray_pool import connect

connect()

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
print("actor", ray.get(probe.pid.remote()), flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return env


def _family(pid: int) -> dict[int, float]:
    root = psutil.Process(pid)
    return {p.pid: p.create_time() for p in root.children(recursive=True)}


def _running(known: dict[int, float]) -> list[str]:
    left = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - started) < 0.05 and (
                process.status() != psutil.STATUS_ZOMBIE
            ):
                left.append(f"{pid} {process.name()}")
        except psutil.Error:
            continue
    return left


def test_a_killed_driver_leaves_no_ray_process_behind():
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    started: dict[int, float] = {}
    try:
        line = driver.stdout.readline() if driver.stdout else ""
        assert line.startswith("actor "), f"the driver did not start its actor: {line!r}"
        actor = int(line.split()[1])
        time.sleep(1.0)  # the raylet's agents start beside the first worker
        started = _family(driver.pid)
        assert actor in started
        names = {psutil.Process(pid).name() for pid in started if pid in _alive(started)}
        assert any("raylet" in name for name in names), names
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running(started) == [], "processes of the killed driver still running"
    finally:
        for pid in _alive(started):  # what this test's driver left, never anything else
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        if driver.poll() is None:
            driver.kill()


def _alive(known: dict[int, float]) -> set[int]:
    return {int(entry.split()[0]) for entry in _running(known)}
