"""Ray wiring: start the cluster connection, the actor pool, and drive shards.

Ray's own machinery does the heavy lifting: actors hold the model once;
``max_restarts``/``max_task_retries`` restart a killed actor and retry its
in-flight calls; the driver only bounds in-flight work (backpressure) and
re-queues a shard whose actor could not be brought back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from circuitscan.schemas.errors import CircuitscanError, InfrastructureError
from circuitscan.schemas.jobs import ExecutionSpec, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.jobs.prompt_plan import KeptPrompts
from circuitscan.services.jobs.ray_reaper import child_pids, start_reaper
from circuitscan.services.jobs.worker_types import ShardOutcome, WorkerInfo

log = logging.getLogger(__name__)

# Environment a worker needs to find converted models and stay offline.
_FORWARDED_ENV = ("CIRCUITSCAN_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")


class ClusterUnreachable(InfrastructureError):
    """The Ray address given does not answer."""


class ShardFailed(InfrastructureError):
    """A shard raised an error in the worker (deterministic: not retried)."""


def _check_reachable(target: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    hostport = target.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # 'auto', 'local' and other forms: let Ray resolve them
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterUnreachable(
            f"cannot reach a Ray cluster at {target}: {exc.strerror or exc} "
            "(is `ray start --head` running there, and is the port right?)"
        ) from exc


def connect(address: str | None = None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start an embedded local one."""
    if ray.is_initialized():
        return
    env_vars = {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # Inside a submitted Ray job (`circuitscan submit`, the HTTP API) the job's
        # runtime env already carries these to every worker, and Ray refuses a
        # second runtime env that sets the same variables.
        env_vars = {}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        _check_reachable(target)
    before = child_pids()
    try:
        ray.init(
            # "local": never attach to whatever `ray start` cluster this machine ran last.
            address=target or "local",
            runtime_env={"env_vars": env_vars} if env_vars else None,
            include_dashboard=False if target is None else None,
            logging_level=logging.WARNING,
            log_to_driver=True,
            configure_logging=True,
        )
    except (ConnectionError, TimeoutError, ValueError) as exc:
        raise ClusterUnreachable(f"cannot reach a Ray cluster at {target}: {exc}") from exc
    if target is None:
        # A local cluster is this driver's own: it must not outlive a killed driver.
        start_reaper(child_pids() - before)


def actor_count(execution: ExecutionSpec, n_shards: int) -> tuple[int, bool]:
    """(number of actors, whether each takes a GPU): one per GPU, else one per CPU slot."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if execution.num_actors != "auto":
        wanted = execution.num_actors
    elif gpus:
        wanted = gpus
    else:
        wanted = max(1, int(resources.get("CPU", 1) // execution.torch_threads))
    return max(1, min(wanted, n_shards)), gpus > 0


# Actors kept alive between jobs of one driver process (``reuse=True``), keyed by
# what they loaded: a new job on the same model and SAEs skips the model load.
_POOLS: dict[str, list[Any]] = {}
_POOL_SESSION: list[str] = []
# Handles from an earlier Ray session of this process, kept forever on purpose:
# actor ids repeat across sessions, and destroying an old handle inside a new
# session would drop the reference count of a live actor with the same id.
_RETIRED: list[Any] = []


def _session_pools() -> dict[str, list[Any]]:
    session = ray.get_runtime_context().get_node_id()
    if [session] != _POOL_SESSION:
        _RETIRED.extend(actor for actors in _POOLS.values() for actor in actors)
        _POOLS.clear()
        _POOL_SESSION[:] = [session]
    return _POOLS


def _pool_key(spec: JobSpec, use_gpu: bool) -> str:
    payload = {
        "model": spec.model.model_dump(mode="json"),
        "saes": [sae.model_dump(mode="json") for sae in spec.saes],
        "threads": spec.execution.torch_threads,
        "gpu": use_gpu,
        "retries": spec.execution.max_retries,
    }
    return json.dumps(payload, sort_keys=True)


def _evict_pools(pools: dict[str, list[Any]], keep: str | None) -> None:
    """Kill pooled actors of every other model/SAE set: idle, they still hold their CPUs or
    GPUs, and a job waiting for fresh actors behind them would never be scheduled."""
    for key in [key for key in pools if key != keep]:
        for actor in pools.pop(key):
            ray.kill(actor)


def acquire_actors(spec: JobSpec, n_actors: int, use_gpu: bool, *, reuse: bool) -> list[Any]:
    """``n_actors`` workers for ``spec``: pooled ones first (when reusing), then fresh ones.

    Pooled actors of other specs are killed first: one process keeps one pool
    (jobs that reuse actors run one at a time).
    """
    pools = _session_pools()
    if not reuse:
        _evict_pools(pools, keep=None)
        return start_actors(spec, n_actors, use_gpu)
    key = _pool_key(spec, use_gpu)
    _evict_pools(pools, keep=key)
    pooled = [actor for actor in pools.get(key, []) if _alive(actor)]
    fresh = start_actors(spec, max(0, n_actors - len(pooled)), use_gpu)
    pools[key] = pooled + fresh
    return (pooled + fresh)[:n_actors]


def release_actors(spec: JobSpec, actors: list[Any], use_gpu: bool, *, reuse: bool) -> None:
    """Kill a job's actors, or keep them for the next job of this process (``reuse``)."""
    if reuse and ray.is_initialized():
        return
    for actor in actors:
        ray.kill(actor)


def start_actors(spec: JobSpec, n_actors: int, use_gpu: bool) -> list[Any]:
    # Imported here: the worker module loads torch and the model libraries, which
    # a driver that only talks to running actors (a warm pool) never needs.
    from circuitscan.services.jobs.worker import ShardWorker

    execution = spec.execution
    remote_worker = ray.remote(ShardWorker).options(  # type: ignore[attr-defined]
        num_cpus=0 if use_gpu else execution.torch_threads,
        num_gpus=1 if use_gpu else 0,
        max_restarts=execution.max_retries,
        max_task_retries=execution.max_retries,
        scheduling_strategy="SPREAD",
    )
    spec_json = spec.model_dump_json()
    threads = None if use_gpu else execution.torch_threads
    return [remote_worker.remote(spec_json, threads) for _ in range(n_actors)]


def describe(actor: Any) -> WorkerInfo:
    """What the worker loaded; a mistake it found loading (a model or SAE that does not fit)
    is raised here as itself, anything else that kept it from starting names its cause."""
    try:
        return ray.get(actor.describe.remote())
    except RayTaskError as exc:
        if isinstance(exc.cause, CircuitscanError):
            raise exc.cause from None
        raise ShardFailed(f"worker failed to start: {_first_line(exc.cause or exc)}") from exc
    except RayActorError as exc:
        raise ShardFailed(f"worker failed to start: {_died_because(exc)}") from exc


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _died_because(exc: RayActorError) -> str:
    """The last ``Name: message`` line of Ray's report on a dead actor (its cause), else the first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    return causes[-1] if causes else (lines[0] if lines else type(exc).__name__)


@dataclass
class DriveStats:
    retries: int = 0
    outcomes: list[ShardOutcome] = field(default_factory=list)


def drive(
    spec: JobSpec,
    actors: list[Any],
    plans: list[ShardPlan],
    prompts: KeptPrompts,
    store_url: str,
    on_done: Callable[[ShardOutcome], None],
    context: list[PromptRecord] | None = None,
) -> DriveStats:
    """Run ``plans`` on ``actors`` with at most ``max_in_flight_per_actor`` queued each.

    ``on_done`` (the commit) runs on the driver as each shard finishes, in
    completion order. A shard travels as its prompts' source ranges; the
    worker builds the records. A shard whose actor died beyond Ray's own retries is
    re-queued on a fresh actor up to ``max_retries`` times.
    """
    execution = spec.execution
    spec_json = spec.model_dump_json()
    # One copy in the object store, however many shards read it.
    context_ref = ray.put(context) if context else None
    stats = DriveStats()
    queue: deque[ShardPlan] = deque(plans)
    attempts: dict[int, int] = {}
    in_flight: dict[Any, tuple[ShardPlan, int]] = {}
    load = [0] * len(actors)
    # Ray restarts a killed actor and reruns its calls by itself, so the driver
    # never sees those shards fail: a shard whose outcome comes from another
    # process than the one its actor ran when it was handed over was rerun.
    # Each slot's process is its describe call's answer (queued before any
    # shard, so answered by the process the first shards were handed to), then
    # the pid of its latest outcome.
    pids: list[Any] = [actor.describe.remote() for actor in actors]
    handed: dict[Any, Any] = {}

    def submit(slot: int, plan: ShardPlan) -> None:
        part = prompts.ranges(plan.start, plan.stop)
        ref = actors[slot].run_shard.remote(store_url, plan, part, context_ref, spec_json)
        in_flight[ref] = (plan, slot)
        handed[ref] = pids[slot]
        load[slot] += 1

    while queue or in_flight:
        for slot in range(len(actors)):
            # Queue ahead on an actor only while there is work for every actor:
            # a shard queued behind a busy actor cannot move to one that has
            # gone idle, so near the end each actor holds one shard at a time.
            limit = execution.max_in_flight_per_actor if len(queue) >= len(actors) else 1
            while queue and load[slot] < limit:
                submit(slot, queue.popleft())
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        ref = ready[0]
        plan, slot = in_flight.pop(ref)
        before = handed.pop(ref)
        load[slot] -= 1
        try:
            outcome: ShardOutcome = ray.get(ref)
        except RayTaskError as exc:
            raise ShardFailed(f"shard {plan.shard_id} failed: {exc.cause or exc}") from exc
        except RayActorError as exc:
            attempts[plan.shard_id] = attempts.get(plan.shard_id, 0) + 1
            if attempts[plan.shard_id] > execution.max_retries:
                raise ShardFailed(
                    f"shard {plan.shard_id} lost its worker {attempts[plan.shard_id]} times"
                ) from exc
            log.warning("shard %d lost its worker (%s); re-queueing", plan.shard_id, exc)
            stats.retries += 1
            queue.appendleft(plan)
            if not _alive(actors[slot]):
                actors[slot] = start_actors(spec, 1, use_gpu=_uses_gpu(spec))[0]
                pids[slot] = actors[slot].describe.remote()
            continue
        handed_to = _pid_of(before)
        if handed_to is not None and outcome.pid != handed_to:
            stats.retries += 1
        pids[slot] = outcome.pid
        stats.outcomes.append(outcome)
        on_done(outcome)
    return stats


def _pid_of(process: Any) -> int | None:
    """A worker's pid, from an int or from its describe call (None when it never answered)."""
    if isinstance(process, int):
        return process
    try:
        return int(ray.get(process, timeout=60).pid)
    except Exception:
        return None


def _uses_gpu(spec: JobSpec) -> bool:
    return actor_count(spec.execution, 1)[1]


def _alive(actor: Any) -> bool:
    try:
        ray.get(actor.describe.remote(), timeout=60)
        return True
    except Exception:
        return False


def fan_out(
    spec: JobSpec, actors: list[Any], method: str, calls: Iterable[tuple[Any, ...]]
) -> list[Any]:
    """Run ``actor.method(*args, spec_json)`` for each args tuple, spread over the actors.

    For read-only passes (e.g. verification): Ray retries calls whose actor
    died (``max_task_retries``); results come back in call order. At most
    ``max_in_flight_per_actor`` calls wait on each actor, as in :func:`drive`:
    a call's arguments go to the object store only when it is submitted, so
    a pass over a million prompts never holds them all there (or here) at once.
    """
    spec_json = spec.model_dump_json()
    limit = max(1, spec.execution.max_in_flight_per_actor)
    results: dict[int, Any] = {}
    in_flight: dict[Any, tuple[int, int]] = {}  # ref → (call index, actor slot)
    load = [0] * len(actors)

    def collect(ref: Any) -> None:
        index, slot = in_flight.pop(ref)
        load[slot] -= 1
        results[index] = ray.get(ref)

    try:
        for index, args in enumerate(calls):
            while min(load) >= limit:
                done, _ = ray.wait(list(in_flight), num_returns=1)
                collect(done[0])
            slot = load.index(min(load))
            ref = getattr(actors[slot], method).remote(*args, spec_json)
            in_flight[ref] = (index, slot)
            load[slot] += 1
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            collect(done[0])
    except RayTaskError as exc:
        raise ShardFailed(f"{method} failed: {exc.cause or exc}") from exc
    return [results[index] for index in range(len(results))]
