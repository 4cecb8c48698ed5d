"""``circuitscan run`` on a warm pool: hand the job to the pool's driver and follow it.

Used when a pool runs and its actors hold the job's model and SAEs
(:func:`~circuitscan.services.jobs.warm_pool.pool_holds`). This process then
imports neither torch nor the tokenizer libraries: it connects, sends the
spec, prints the job's lines as they come and ends with the driver's
summary, or its error with the error's own exit status.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from circuitscan.schemas.errors import (
    CircuitscanError,
    InfrastructureError,
    StoreCorruptionError,
    UserInputError,
)
from circuitscan.schemas.jobs import JobSpec

POLL_S = 0.1


class PoolJobFailed(InfrastructureError):
    """The job failed on the pool (a cluster or shard failure there, or a bug: its traceback
    is printed)."""


class PoolJobRefused(UserInputError):
    """The pool's driver refused the job: a mistake in its input (the message says which)."""


class PoolJobDamagedStore(StoreCorruptionError):
    """The job on the pool found its store damaged (the message names the object)."""


_ERRORS: dict[str, type[CircuitscanError]] = {
    "UserInputError": PoolJobRefused,
    "StoreCorruptionError": PoolJobDamagedStore,
    "InfrastructureError": PoolJobFailed,
    "CircuitscanError": PoolJobFailed,
}


def run_on_pool(
    spec: JobSpec,
    *,
    address: str | None,
    use_pool: bool | None,
    overwrite: bool,
    echo: Callable[[str], None],
) -> tuple[str, str] | None:
    """(summary text, summary JSON) of ``spec`` run by the pool's driver; None when no
    running pool holds the job's model and SAEs (the caller runs it itself)."""
    from circuitscan.services.jobs import warm_pool

    if not warm_pool.pool_holds(spec, address, use_pool):
        return None
    record = warm_pool.find_pool(address, use_pool=use_pool, say=echo)
    if record is None or record.driver is None:
        return None
    import ray

    warm_pool.join_pool(record, {})
    try:
        driver = ray.get_actor(record.driver, namespace=record.namespace)
    except ValueError:
        warm_pool.leave_pool()
        return None  # a pool without its driver: the caller drives the job itself
    job_id = uuid.uuid4().hex
    ray.get(
        driver.start.remote(job_id, spec.model_dump_json(), os.getcwd(), {"overwrite": overwrite})
    )
    seen = 0
    reply: dict[str, Any] = {}
    try:
        while True:
            reply = ray.get(driver.poll.remote(job_id, seen))
            for line in reply["lines"]:
                echo(line)
            seen += len(reply["lines"])
            if reply["done"]:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        ray.get(driver.cancel.remote(job_id))
        echo("stopping the job after the shard in progress (committed shards stay)")
        while not reply.get("done"):
            reply = ray.get(driver.poll.remote(job_id, seen))
            for line in reply["lines"]:
                echo(line)
            seen += len(reply["lines"])
            time.sleep(POLL_S)
    finally:
        warm_pool.leave_pool()
    if reply.get("error") is not None:  # the error's own message and exit status
        branch, message = reply["error"]
        raise _ERRORS.get(branch, PoolJobFailed)(message)
    if reply.get("bug"):
        raise PoolJobFailed(f"the pool's job driver failed:\n{reply['bug']}")
    return reply["summary_text"], reply["summary_json"]
