"""Starting and stopping the warm pool (``circuitscan up`` / ``circuitscan down``).

``up`` runs ``ray start --head --block`` in a session of its own (so the
terminal's signals and the ``up`` process's exit leave it running), with a
private temp folder and free loopback ports, so it never meets another Ray
on the machine; then it joins that head, starts the pool's detached actors,
waits until each has loaded the model and SAEs (a load error comes back as
itself and nothing is left running), and records the head's processes in
the pool file. ``down`` stops the recorded processes and their current
descendants (the raylet's workers: pool actors and anything jobs started),
each recognised by pid and start time, and nothing else: never ``ray stop``,
which would end every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from circuitscan.schemas.jobs import JobSpec
from circuitscan.services.jobs.ray_reaper import terminate
from circuitscan.services.jobs.warm_pool import (
    NAMESPACE,
    PoolRecord,
    PoolRunning,
    PoolUnavailable,
    ProcessId,
    head_alive,
    is_running,
    join_pool,
    leave_pool,
    load_of,
    pool_file,
    pool_handles,
    process_id,
    quiet_logger,
    read_record,
    remove_record,
    write_record,
)

DRIVER_NAME = "driver"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _head_command(
    temp_dir: str, port: int, num_cpus: int | None, store_mb: int | None
) -> list[str]:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [
        ray_cli, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={temp_dir}",
        # No dashboard (jobs join by address, not through job submission), and
        # every port its agents would take by default chosen free.
        "--include-dashboard=false", f"--dashboard-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
    ]  # fmt: skip
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if store_mb is not None:
        command.append(f"--object-store-memory={store_mb * 1024 * 1024}")
    return command


def _decide_token_auth() -> bool:
    """Use Ray's token auth exactly when a local ``ray.init()`` would (a token exists, or
    ``RAY_AUTH_MODE=token``); this process's children (the head) then inherit the choice."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    from ray._private.authentication import authentication_token_setup as auth

    with quiet_logger(auth.__name__):
        return bool(auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False))


def _family(roots: list[ProcessId]) -> dict[int, float]:
    """The running ``roots`` and all their current descendants (pid → start time)."""
    found: dict[int, float] = {}
    for root in roots:
        if not is_running(root):
            continue
        found[root.pid] = root.started
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(root.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    found[child.pid] = child.create_time()
    return found


def _stop_processes(roots: list[ProcessId]) -> int:
    known = _family(roots)
    terminate(known)
    return len(known)


def _wait_for_port(
    process: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise PoolUnavailable(f"ray start exited with {process.returncode}: {tail.strip()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        if time.monotonic() > deadline:
            raise PoolUnavailable(f"the pool's Ray head did not listen within {timeout_s:.0f}s")
        time.sleep(0.2)


def _actor_count(spec: JobSpec, n_actors: int | None, use_gpu: bool) -> int:
    import ray

    if n_actors is not None:
        return n_actors
    if spec.execution.num_actors != "auto":
        return spec.execution.num_actors
    resources = ray.cluster_resources()
    if use_gpu:
        return int(resources.get("GPU", 1))
    return max(1, int(resources.get("CPU", 1) // spec.execution.torch_threads))


def _start_actors(spec: JobSpec, count: int, use_gpu: bool) -> tuple[list[str], list[Any]]:
    import ray

    from circuitscan.services.jobs.pool_worker import PoolWorker

    execution = spec.execution
    names = [f"pool-{index}" for index in range(count)]
    remote = ray.remote(PoolWorker)
    spec_json = spec.model_dump_json()
    handles = [
        remote.options(  # type: ignore[attr-defined]
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",  # outlives `up`; `down` ends it
            # CPU actors reserve no CPU: idle between jobs, they must not keep a job on
            # other SAEs from scheduling actors of its own here. A GPU stays reserved.
            num_cpus=0,
            num_gpus=1 if use_gpu else 0,
            max_restarts=execution.max_retries,
            max_task_retries=execution.max_retries,
        ).remote(spec_json, None if use_gpu else execution.torch_threads)
        for name in names
    ]
    return names, handles


def _start_driver(record: PoolRecord) -> Any:
    """The pool's job driver (:mod:`~circuitscan.services.jobs.pool_driver`), starting."""
    import ray

    from circuitscan.services.jobs.pool_driver import PoolDriver

    driver = (
        ray.remote(PoolDriver)
        .options(  # type: ignore[attr-defined]
            name=DRIVER_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=4,  # polls answered while a job's thread runs
        )
        .remote(record.model_dump_json(), record.load.model.model_dump_json())
    )
    return driver


def start_pool(
    spec: JobSpec,
    *,
    n_actors: int | None = None,
    num_cpus: int | None = None,
    object_store_mb: int | None = None,
    echo: Callable[[str], None] = print,
    timeout_s: float = 300.0,
) -> PoolRecord:
    """Start a head and actors holding ``spec``'s model and SAEs; record and return them."""
    import ray

    from circuitscan.services.jobs.preflight import check_model_and_saes
    from circuitscan.services.jobs.ray_pool import _FORWARDED_ENV, describe

    existing = read_record()
    if existing is not None and head_alive(existing):
        raise PoolRunning(
            f"a warm pool is already running at {existing.address} (recorded in {pool_file()}, "
            f"since {existing.started_at}); `circuitscan down` stops it"
        )
    if existing is not None:
        stopped = _stop_processes([existing.root, *existing.processes])
        echo(
            f"cleared the record of a pool that was no longer running ({stopped} leftover processes)"
        )
        _remove(existing)
    if ray.is_initialized():
        raise PoolUnavailable("this process is already connected to a Ray cluster")
    started = time.perf_counter()
    token_auth = _decide_token_auth()
    # A short path: Ray's unix sockets live under it and have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="cspool_", dir="/tmp")
    log = Path(temp_dir) / "head.log"
    port = _free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            _head_command(temp_dir, port, num_cpus, object_store_mb),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    root = process_id(process.pid) or ProcessId(pid=process.pid, started=time.time())
    address = f"127.0.0.1:{port}"
    try:
        # A path or SAE the files show cannot work is refused here, while the head starts.
        check_model_and_saes(spec)
        _wait_for_port(process, port, log, timeout_s)
        echo(
            f"Ray head listening at {address} ({time.perf_counter() - started:.1f}s); loading actors"
        )
        provisional = PoolRecord(
            address=address, temp_dir=temp_dir, root=root, processes=[], actors=[],
            load=load_of(spec, False), token_auth=token_auth, started_at="", log=str(log),
        )  # fmt: skip
        env_vars = {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ}
        join_pool(provisional, env_vars)
        use_gpu = int(ray.cluster_resources().get("GPU", 0)) > 0
        count = _actor_count(spec, n_actors, use_gpu)
        names, handles = _start_actors(spec, count, use_gpu)
        record = PoolRecord(
            address=address,
            temp_dir=temp_dir,
            root=root,
            processes=[],
            actors=names,
            driver=DRIVER_NAME,
            load=load_of(spec, use_gpu),
            token_auth=token_auth,
            started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            log=str(log),
        )
        driver = _start_driver(record)  # loads its libraries while the actors load theirs
        for handle in handles:  # a model or SAE that does not load is raised here, as itself
            describe(handle)
        ray.get(driver.ready.remote())
        processes = [
            ProcessId(pid=pid, started=when) for pid, when in sorted(_family([root]).items())
        ]
        record = record.model_copy(update={"processes": processes})
        write_record(record)
    except BaseException:
        with contextlib.suppress(Exception):
            leave_pool()
        _stop_processes([root])
        if process.poll() is None:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    leave_pool()  # the driver leaves; the detached actors and the head stay
    echo(f"actors loaded in {time.perf_counter() - started:.1f}s from `up`")
    return record


def actor_stats(handles: list[Any], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Each pool actor's own account (pid, model loads in its process, shards, jobs)."""
    import ray

    return [ray.get(h.pool_stats.remote(), timeout=timeout_s) for h in handles]


def _remove(record: PoolRecord) -> None:
    shutil.rmtree(record.temp_dir, ignore_errors=True)
    remove_record()


def stop_pool() -> tuple[PoolRecord, int] | None:
    """Stop what the pool file records (its processes and their descendants) and remove
    the record and the head's temp folder; None when no pool is recorded."""
    record = read_record()
    if record is None:
        return None
    stopped = _stop_processes([record.root, *record.processes])
    _remove(record)
    return record, stopped


def pool_status() -> dict[str, Any]:
    """The recorded pool, whether it runs, and each actor's account (when it runs)."""
    record = read_record()
    if record is None:
        return {"running": False, "pool_file": str(pool_file()), "record": None, "actors": []}
    running = head_alive(record)
    stats: list[dict[str, Any]] = []
    if running:
        join_pool(record, {})
        try:
            handles = pool_handles(record)
            stats = actor_stats(handles)
        finally:
            leave_pool()
    return {
        "running": running,
        "pool_file": str(pool_file()),
        "record": record.model_dump(mode="json"),
        "actors": stats,
    }
