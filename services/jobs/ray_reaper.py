"""Processes an embedded Ray starts die with the driver that started them.

``ray.init()`` on a fresh local cluster starts the GCS server, the raylet,
the dashboard, the log monitor and the autoscaler monitor as children of the
driver, and the raylet starts the dashboard agent, the runtime-env agent and
the worker processes. Ray's own shutdown (``ray.shutdown()``, also run at
interpreter exit) stops them all; a driver that is SIGKILLed or OOM-killed
never runs it. The GCS server and the raylet notice their parent is gone and
exit, but the two agents are re-parented to init and keep running.

So after starting a local cluster the driver starts a reaper: a small
process in its own session (a signal to the driver's process group does not
reach it) that remembers every process of that cluster (the children
``ray.init`` started and their descendants, re-read every half second, each
with its start time so a reused pid is never mistaken for one of them) and,
once the driver is gone, terminates those still running. It exits by itself
when the cluster is gone (``ray.shutdown`` in a driver that lives on).
A driver that joins an existing cluster starts none: that cluster is not its
own to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

import psutil

POLL_S = 0.5
_GRACE_S = 3.0


def _same(started: float, expected: float) -> bool:
    # Start times are read from /proc in clock ticks by each process: equal to
    # well within a tick, not necessarily to the last bit.
    return abs(started - expected) < 0.05


def _identity(process: psutil.Process) -> tuple[int, float] | None:
    try:
        return process.pid, process.create_time()
    except psutil.Error:
        return None


def _tracked_tree(roots: dict[int, float]) -> dict[int, float]:
    """The roots still running and all their current descendants (pid → start time)."""
    found: dict[int, float] = {}
    for pid, started in roots.items():
        try:
            root = psutil.Process(pid)
            if not _same(root.create_time(), started):
                continue  # that pid now belongs to another process
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in family:
            identity = _identity(process)
            if identity is not None:
                found[identity[0]] = identity[1]
    return found


def _still_ours(known: dict[int, float]) -> list[psutil.Process]:
    alive = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if _same(process.create_time(), started) and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def terminate(known: dict[int, float]) -> None:
    """SIGTERM every process in ``known`` still running, SIGKILL those left after a grace."""
    survivors = _still_ours(known)
    for process in survivors:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(survivors, timeout=_GRACE_S)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()


def watch(driver: int, driver_started: float, roots: dict[int, float]) -> None:
    """Track ``roots``' process trees while ``driver`` runs; terminate them when it is gone."""
    known: dict[int, float] = {}
    while True:
        known.update(_tracked_tree(roots))
        known = {pid: started for pid, started in known.items() if _still_ours({pid: started})}
        try:
            driver_alive = _same(psutil.Process(driver).create_time(), driver_started)
        except psutil.Error:
            driver_alive = False
        if not driver_alive:
            terminate(known)
            return
        if not known:
            return  # the cluster was shut down; the driver lives on without it
        time.sleep(POLL_S)


def start_reaper(roots: Iterable[int]) -> subprocess.Popen[bytes] | None:
    """Start the reaper for the processes ``roots`` (and their descendants) of this driver."""
    identities = [i for i in (_identity_of(pid) for pid in roots) if i is not None]
    if not identities:
        return None
    me = psutil.Process(os.getpid())
    args = [sys.executable, "-m", __name__, str(me.pid), repr(me.create_time())]
    args += [f"{pid}:{started!r}" for pid, started in identities]
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _identity_of(pid: int) -> tuple[int, float] | None:
    try:
        return _identity(psutil.Process(pid))
    except psutil.Error:
        return None


def child_pids() -> set[int]:
    """This process's direct children now (before/after ``ray.init`` tells what it started)."""
    try:
        return {child.pid for child in psutil.Process(os.getpid()).children()}
    except psutil.Error:
        return set()


def main(argv: list[str]) -> None:
    # The reaper must outlive whatever ends the driver: ignore the terminal's signals.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    driver, driver_started = int(argv[0]), float(argv[1])
    roots = {int(pid): float(started) for pid, started in (a.split(":", 1) for a in argv[2:])}
    watch(driver, driver_started, roots)


if __name__ == "__main__":
    main(sys.argv[1:])
