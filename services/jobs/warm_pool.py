"""A warm local pool: jobs join a Ray head whose actors already hold the model and SAEs.

``circuitscan up`` (:mod:`circuitscan.services.jobs.pool_lifecycle`) starts a
Ray head of its own and N detached, named actors in the ``circuitscan``
namespace that load a model and its SAEs once, and records what it started in
the pool file (``$CIRCUITSCAN_STATE_DIR/pool.json``, default
``$CIRCUITSCAN_HOME/state/pool.json``). This module is the job side:
``run``/``resume`` find that record when the head still answers, join the
head instead of starting a Ray of their own, and use the pool's actors when
they loaded what the job needs (the same model and SAE specs, the same torch
threads, device kind and unchanged files: the job's numbers are then the
same bytes as on fresh actors). Any other job starts actors of its own on the
pool; those are owned by its driver (Ray ends them with it) and killed when
the job ends. A job never kills a pool actor.

Imports no torch: a driver on a warm pool plans, commits and talks to actors
that are already loaded, so it starts in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.errors import InfrastructureError, UserInputError
from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.models import DEFAULT_MODEL, ModelSpec, SAESpec
from circuitscan.services.paths import circuitscan_home

NAMESPACE = "circuitscan"
POOL_FILE = "pool.json"
STATE_DIR_ENV = "CIRCUITSCAN_STATE_DIR"
NO_POOL_ENV = "CIRCUITSCAN_NO_POOL"
RECORD_VERSION = 1


class PoolRunning(UserInputError):
    """``up`` while a pool recorded in the state folder is still running."""


class PoolUnavailable(InfrastructureError):
    """The pool's head did not start, or its actors could not load the model."""


class ProcessId(BaseModel):
    """A process, told apart from a later one that reuses its pid by its start time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int = Field(description="Process id.")
    started: float = Field(description="Start time (psutil create_time, seconds since epoch).")


class PoolLoad(BaseModel):
    """What the pool's actors loaded: a job with the same values runs on them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSpec = Field(description="The model every pool actor holds.")
    saes: list[SAESpec] = Field(description="The SAEs every pool actor holds.")
    torch_threads: int = Field(description="torch threads per CPU actor.")
    gpu: bool = Field(description="Whether each actor holds a GPU.")
    files_stamp: str = Field(
        description="Digest of the local model and SAE files' names, sizes and mtimes at `up`: "
        "a file changed since means the actors hold other weights than the job would load."
    )


class PoolRecord(BaseModel):
    """What ``circuitscan up`` started: ``down`` stops exactly this, ``run`` joins it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(default=RECORD_VERSION, description="Pool file layout version.")
    address: str = Field(description="The head's GCS address (host:port, loopback).")
    temp_dir: str = Field(description="The head's private Ray temp folder (removed by down).")
    root: ProcessId = Field(description="The `ray start --head --block` process.")
    processes: list[ProcessId] = Field(
        description="Every process of the head and its actors when `up` finished."
    )
    namespace: str = Field(default=NAMESPACE, description="Ray namespace of the pool actors.")
    actors: list[str] = Field(description="Names of the pool's detached actors.")
    driver: str | None = Field(
        default=None, description="Name of the pool's job driver actor (`run` hands jobs to it)."
    )
    load: PoolLoad = Field(description="What the actors loaded.")
    token_auth: bool = Field(description="Whether the head requires Ray's auth token.")
    started_at: str = Field(description="When `up` finished (UTC, ISO 8601).")
    log: str = Field(description="The head's output log.")


def state_dir() -> Path:
    """Where the pool file lives: ``$CIRCUITSCAN_STATE_DIR``, else ``$CIRCUITSCAN_HOME/state``."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser() if env else circuitscan_home() / "state"


def pool_file() -> Path:
    return state_dir() / POOL_FILE


def read_record() -> PoolRecord | None:
    """The recorded pool, running or not; None without a pool file."""
    path = pool_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return PoolRecord.model_validate_json(text)
    except ValueError as exc:
        raise PoolUnavailable(
            f"the pool file {path} is not a circuitscan pool record ({exc.__class__.__name__}); "
            "delete it (nothing else reads it) and run `circuitscan up` again"
        ) from exc


def write_record(record: PoolRecord) -> Path:
    path = pool_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".json.part")
    part.write_text(record.model_dump_json(indent=2), encoding="utf-8")
    part.replace(path)  # a reader sees the whole record or none
    return path


def remove_record() -> None:
    with contextlib.suppress(FileNotFoundError):
        pool_file().unlink()


def process_id(pid: int) -> ProcessId | None:
    try:
        return ProcessId(pid=pid, started=psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def is_running(process: ProcessId) -> bool:
    try:
        found = psutil.Process(process.pid)
        # Start times are read from /proc in clock ticks: equal to well within a tick.
        return (
            abs(found.create_time() - process.started) < 0.05
            and found.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def head_alive(record: PoolRecord) -> bool:
    """The head's root process still runs and its GCS port answers."""
    if not is_running(record.root):
        return False
    host, _, port = record.address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return True
    except OSError:
        return False


# --- what the actors loaded ------------------------------------------------------------


def _local_path_of_model(spec: ModelSpec) -> Path | None:
    if spec.source == DEFAULT_MODEL:
        from circuitscan.services.model_loading import default_gguf_path

        return default_gguf_path()
    path = Path(spec.source).expanduser()
    return path if path.exists() else None


def _local_path_of_sae(spec: SAESpec) -> Path | None:
    if spec.source.startswith("default/"):
        return Path(__file__).resolve().parents[1] / "default_saes" / spec.source[len("default/") :]
    path = Path(spec.source).expanduser()
    return path if path.exists() else None


def files_stamp(model: ModelSpec, saes: list[SAESpec]) -> str:
    """Digest of every local model/SAE file's name, size and mtime (names of remote ones)."""
    digest = hashlib.sha256()
    paths = [_local_path_of_model(model), *(_local_path_of_sae(sae) for sae in saes)]
    for path in paths:
        if path is None:
            digest.update(b"<not local>\0")
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            stat = file.stat()
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def load_of(spec: JobSpec, gpu: bool) -> PoolLoad:
    return PoolLoad(
        model=spec.model,
        saes=list(spec.saes),
        torch_threads=spec.execution.torch_threads,
        gpu=gpu,
        files_stamp=files_stamp(spec.model, spec.saes),
    )


def mismatch(record: PoolRecord, spec: JobSpec, gpu: bool) -> str | None:
    """Why the pool's actors cannot run ``spec`` (None: they can)."""
    wanted = load_of(spec, gpu)
    have = record.load
    if wanted.model != have.model:
        return f"they hold model {have.model.source!r}, the job names {wanted.model.source!r}"
    if wanted.saes != have.saes:
        held = ", ".join(s.source for s in have.saes) or "none"
        return f"they hold SAEs [{held}], the job names others"
    if wanted.torch_threads != have.torch_threads:
        return f"they run {have.torch_threads} torch thread(s), the job asks for {wanted.torch_threads}"
    if wanted.gpu != have.gpu:
        return "the cluster's GPUs changed since `up`"
    if wanted.files_stamp != have.files_stamp:
        return "the model or SAE files changed on disk since `up`"
    return None


# --- the job side ----------------------------------------------------------------------

# The pool this process joined (ray.init answers once per process).
_JOINED: list[PoolRecord] = []


def pool_disabled() -> bool:
    return os.environ.get(NO_POOL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def find_pool(
    address: str | None, *, use_pool: bool | None = None, say: Callable[[str], None]
) -> PoolRecord | None:
    """The running pool a job started here should join, else None (today's behaviour).

    Not when turned off (``use_pool=False``, ``$CIRCUITSCAN_NO_POOL``), when a
    cluster is named (``address``, ``$RAY_ADDRESS``, inside a submitted Ray
    job), or when this process is already connected to another Ray.
    """
    import ray

    if use_pool is False or (use_pool is None and pool_disabled()):
        return None
    if address or os.environ.get("RAY_ADDRESS") or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return None
    if ray.is_initialized():
        return _JOINED[0] if _JOINED else None
    record = read_record()
    if record is None:
        return None
    if not head_alive(record):
        say(
            f"warm pool: {pool_file()} records a pool at {record.address} that is not running; "
            "running without it (`circuitscan down` clears the record)"
        )
        return None
    return record


def pool_holds(spec: JobSpec, address: str | None, use_pool: bool | None) -> bool:
    """Whether ``spec`` will run on the running pool's actors (they loaded its model and SAEs
    from the same, unchanged files)."""
    record = find_pool(address, use_pool=use_pool, say=lambda _line: None)
    return record is not None and mismatch(record, spec, record.load.gpu) is None


@contextlib.contextmanager
def quiet_logger(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def use_token_auth(record: PoolRecord) -> None:
    """Turn on Ray's token auth in this process when the head requires it.

    A head started by ``ray start`` uses the user's token (``~/.ray/auth_token``)
    when one exists; a driver joining by address does not look for it by itself.
    """
    if not record.token_auth or os.environ.get("RAY_AUTH_MODE"):
        return
    from ray._private.authentication import authentication_token_setup as auth

    with quiet_logger(auth.__name__):  # its notice says what `up` already said
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def join_pool(record: PoolRecord, env_vars: dict[str, str]) -> None:
    """Connect this driver to the pool's head (once per process)."""
    import ray

    if ray.is_initialized():
        return
    use_token_auth(record)
    try:
        ray.init(
            address=record.address,
            runtime_env={"env_vars": env_vars} if env_vars else None,
            # The head listens on loopback only: this driver is on the same node.
            _node_ip_address=record.address.rpartition(":")[0],
            logging_level=logging.WARNING,
            log_to_driver=True,
            configure_logging=True,
        )
    except (ConnectionError, TimeoutError, ValueError) as exc:
        raise PoolUnavailable(
            f"cannot join the warm pool at {record.address}: {exc} "
            "(`circuitscan down` then `circuitscan up`, or run with --no-pool)"
        ) from exc
    _JOINED[:] = [record]


def leave_pool() -> None:
    """Disconnect this process from the pool's head (its detached actors stay)."""
    import ray

    ray.shutdown()
    _JOINED.clear()


@dataclass
class JobActors:
    """The actors one job runs on: on a pool, the pool's own (kept) and any of its own."""

    actors: list[Any]
    use_gpu: bool
    record: PoolRecord | None = None  # the pool joined, None: today's Ray
    reused: bool = False  # the pool's actors run this job
    pool_handles: list[Any] = field(default_factory=list)

    def release(self, spec: JobSpec, keep_actors: bool) -> None:
        """Kill the job's own actors (``drive`` may have replaced a lost pool actor by
        one, or started extras); the pool's stay for the next job."""
        import ray

        from circuitscan.services.jobs.ray_pool import release_actors

        if not self.reused:  # started through ray_pool: its in-process reuse applies
            release_actors(spec, self.actors, self.use_gpu, reuse=keep_actors)
            return
        for actor in self.actors:
            if not any(actor is handle for handle in self.pool_handles):
                ray.kill(actor)


def job_actors(
    spec: JobSpec,
    address: str | None,
    n_shards: int,
    say: Callable[[str], None],
    *,
    keep_actors: bool,
    use_pool: bool | None,
) -> JobActors:
    """Connect and get ``spec``'s actors: on the warm pool when one runs (and the job may
    use it), else on the named cluster or a local Ray started here, as without a pool."""
    from circuitscan.services.jobs.ray_pool import (
        _FORWARDED_ENV,
        acquire_actors,
        actor_count,
        connect,
    )

    record = find_pool(address, use_pool=use_pool, say=say)
    if record is None:
        connect(address)
        n_actors, use_gpu = actor_count(spec.execution, n_shards)
        return JobActors(acquire_actors(spec, n_actors, use_gpu, reuse=keep_actors), use_gpu)
    join_pool(record, {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ})
    return acquire_pool_actors(record, spec, n_shards, say, keep_actors=keep_actors)


def pool_handles(record: PoolRecord) -> list[Any]:
    """Handles of the pool's actors that are still there (a killed one beyond its restarts
    is skipped)."""
    import ray

    handles = []
    for name in record.actors:
        try:
            handles.append(ray.get_actor(name, namespace=record.namespace))
        except ValueError:
            continue
    return handles


def acquire_pool_actors(
    record: PoolRecord,
    spec: JobSpec,
    n_shards: int,
    say: Callable[[str], None],
    *,
    keep_actors: bool,
) -> JobActors:
    """The actors ``spec`` runs on in the pool: the pool's when they hold what it needs."""
    import ray

    from circuitscan.services.jobs.ray_pool import acquire_actors, actor_count, start_actors

    use_gpu = int(ray.cluster_resources().get("GPU", 0)) > 0
    why_not = mismatch(record, spec, use_gpu)
    handles = pool_handles(record) if why_not is None else []
    if why_not is None and not handles:
        why_not = "none of its actors is left"
    if why_not is None:
        wanted = spec.execution.num_actors
        n_actors = max(1, min(len(handles) if wanted == "auto" else wanted, n_shards))
        actors = handles[:n_actors]
        extra = n_actors - len(actors)
        say(
            f"warm pool {record.address}: {len(actors)} actor(s) already holding the model and SAEs"
            + (f", {extra} more started for this job" if extra else "")
        )
        if extra:
            actors += start_actors(spec, extra, use_gpu)
        return JobActors(actors, use_gpu, record, reused=True, pool_handles=handles)
    n_actors, _ = actor_count(spec.execution, n_shards)
    if use_gpu and ray.available_resources().get("GPU", 0) < 1:
        raise PoolUnavailable(
            f"the warm pool's actors cannot run this job ({why_not}) and hold every GPU: "
            "`circuitscan down` first, or `circuitscan up` with this job's spec"
        )
    say(
        f"warm pool {record.address}: its actors cannot run this job ({why_not}); "
        f"starting {n_actors} actor(s) of the job's own on it"
    )
    return JobActors(acquire_actors(spec, n_actors, use_gpu, reuse=keep_actors), use_gpu, record)


def describe_record(record: PoolRecord) -> str:
    saes = ", ".join(s.source for s in record.load.saes) or "no SAEs"
    return (
        f"{len(record.actors)} actor(s) holding {record.load.model.source} + {saes} "
        f"({record.load.torch_threads} torch thread(s) each{', GPU' if record.load.gpu else ''})"
    )
