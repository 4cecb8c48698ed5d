"""Ray's job server seen from the API: submit exactly like ``circuitscan submit``, follow, stop.

Nothing about jobs is kept in this process: every answer comes from Ray's
job server (status, logs, the submitted spec in the job's runtime env) and
from the job's store (committed shards), so an API restart loses nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from circuitscan.schemas.jobs import DatasetSource, IOISource, JobSpec, TemplateSource
from circuitscan.services.api.errors import ApiError

ENTRYPOINT = "circuitscan run --spec-env CIRCUITSCAN_SPEC"
SPEC_ENV = "CIRCUITSCAN_SPEC"
JOB_METADATA_KEY = "circuitscan_job"
PASSED_ENV = ("CIRCUITSCAN_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_STATUS = re.compile(r"status code (\d{3})")


def _ray_error(exc: Exception, job_id: str | None = None) -> ApiError:
    match = _STATUS.search(str(exc))
    status = int(match.group(1)) if match else 0
    if status == 404 and job_id is not None:
        return ApiError(404, f"no job {job_id!r}")
    if 400 <= status < 500:
        return ApiError(400, f"the Ray job server refused the request (status {status})")
    return ApiError(502, "the Ray job server failed to answer")


class JobServer:
    """A thin wrapper over ``JobSubmissionClient`` that turns its errors into API errors."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    def client(self) -> Any:
        if self.address is None:
            raise ApiError(
                503, "jobs are not enabled on this server (no Ray job server address is set)"
            )
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self.address)
        except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
            raise ApiError(503, "cannot reach the Ray job server") from exc

    def submit(self, spec: JobSpec) -> str:
        """Submit ``spec`` as ``circuitscan submit`` does; returns the Ray submission id."""
        client = self.client()
        env = {SPEC_ENV: spec.model_dump_json()}
        for key in PASSED_ENV:
            if key in os.environ:
                env[key] = os.environ[key]
        try:
            return client.submit_job(
                entrypoint=ENTRYPOINT,
                runtime_env={"env_vars": env},
                metadata={JOB_METADATA_KEY: spec.name, "store": spec.store},
            )
        except (RuntimeError, ConnectionError, OSError) as exc:
            raise _ray_error(exc) from exc

    def jobs(self) -> list[Any]:
        """circuitscan jobs known to Ray (other jobs on the cluster are not listed)."""
        client = self.client()
        try:
            details = client.list_jobs()
        except (RuntimeError, ConnectionError, OSError) as exc:
            raise _ray_error(exc) from exc
        return [d for d in details if d.submission_id and JOB_METADATA_KEY in (d.metadata or {})]

    def info(self, job_id: str) -> Any:
        client = self.client()
        try:
            details = client.get_job_info(job_id)
        except (RuntimeError, ConnectionError, OSError) as exc:
            raise _ray_error(exc, job_id) from exc
        if JOB_METADATA_KEY not in (details.metadata or {}):
            raise ApiError(404, f"no job {job_id!r}")
        return details

    def stop(self, job_id: str) -> bool:
        self.info(job_id)
        try:
            return bool(self.client().stop_job(job_id))
        except (RuntimeError, ConnectionError, OSError) as exc:
            raise _ray_error(exc, job_id) from exc

    def logs(self, job_id: str) -> str:
        self.info(job_id)
        try:
            return str(self.client().get_job_logs(job_id))
        except (RuntimeError, ConnectionError, OSError) as exc:
            raise _ray_error(exc, job_id) from exc


def submitted_spec(details: Any) -> JobSpec | None:
    """The spec a job was submitted with, read back from its runtime env."""
    env = ((details.runtime_env or {}).get("env_vars") or {}) if details is not None else {}
    raw = env.get(SPEC_ENV)
    if not raw:
        return None
    try:
        return JobSpec.model_validate(json.loads(raw))
    except ValueError:
        return None


def planned_shards(spec: JobSpec) -> int | None:
    """Shards the spec's prompt count implies, when the source fixes that count."""
    source = spec.prompts
    if isinstance(source, IOISource | TemplateSource):
        count: int | None = source.n
    elif isinstance(source, DatasetSource):
        count = source.limit
    else:
        count = None
    return None if count is None else max(1, math.ceil(count / spec.shard_size))
