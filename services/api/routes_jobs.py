"""Job routes: submit (token required), list, status with progress, cancel (token), logs.

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request

from circuitscan.schemas.jobs import JobSpec
from circuitscan.services.api.auth import require_reader, require_writer
from circuitscan.services.api.errors import ERROR_RESPONSES, ApiError
from circuitscan.services.api.job_server import (
    JOB_ID_PATTERN,
    JobServer,
    planned_shards,
    submitted_spec,
)
from circuitscan.services.api.models import (
    JobCancelled,
    JobLogs,
    JobProgress,
    JobStatus,
    JobSubmission,
    JobSubmitted,
    Page,
)
from circuitscan.services.api.settings import ApiSettings
from circuitscan.services.api.store_access import StoreRegistry, check_store_name

JobId = Annotated[
    str, Path(description="Ray submission id of the job.", pattern=JOB_ID_PATTERN, max_length=128)
]

_JOB_ERRORS = {
    **ERROR_RESPONSES,
    502: ERROR_RESPONSES[500] | {"description": "The Ray job server failed"},
    503: ERROR_RESPONSES[500] | {"description": "Jobs are not enabled or Ray is unreachable"},
}


def _progress(registry: StoreRegistry, spec: JobSpec, status: str) -> JobProgress | None:
    name = registry.name_of(spec.store)
    if name is None:
        return None
    planned = planned_shards(spec)
    try:
        with registry.reading(name) as entry:
            store = entry.store
            if store.layout.job_hash != spec.content_hash():
                # The folder holds another job's store (or an older one): nothing of ours yet.
                entries = {}
            else:
                entries = store.committed_entries()
    except ApiError:
        entries = {}  # not created yet
    done = len(entries)
    if status == "SUCCEEDED":
        fraction: float | None = 1.0
    elif planned:
        fraction = min(1.0, done / planned)
    else:
        fraction = None
    return JobProgress(
        shards_committed=done,
        shards_planned=planned,
        prompts_committed=sum(e.n_prompts for e in entries.values()),
        tokens_committed=sum(e.n_tokens for e in entries.values()),
        fraction=fraction,
    )


def _status(registry: StoreRegistry, details: Any, with_progress: bool) -> JobStatus:
    spec = submitted_spec(details)
    status = str(getattr(details.status, "value", details.status))
    store_location = (details.metadata or {}).get("store") or (spec.store if spec else "")
    return JobStatus(
        job_id=details.submission_id,
        status=status,
        message=details.message,
        name=spec.name if spec else (details.metadata or {}).get("circuitscan_job"),
        kind=spec.job.kind if spec else None,
        store=registry.name_of(store_location) if store_location else None,
        start_time=details.start_time / 1000 if details.start_time else None,
        end_time=details.end_time / 1000 if details.end_time else None,
        progress=_progress(registry, spec, status) if (spec and with_progress) else None,
    )


def jobs_router(settings: ApiSettings) -> APIRouter:
    """The /api/jobs routes, talking to the Ray job server at ``settings.ray_address``."""
    router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=_JOB_ERRORS)
    max_page = settings.max_page_size

    def server(request: Request) -> JobServer:
        return request.app.state.job_server

    def registry(request: Request) -> StoreRegistry:
        return request.app.state.stores

    @router.post(
        "",
        response_model=JobSubmitted,
        status_code=201,
        summary="Submit a job",
        dependencies=[Depends(require_writer)],
    )
    def submit(request: Request, body: JobSubmission) -> JobSubmitted:
        name = check_store_name(body.spec.store)
        spec = body.spec.model_copy(update={"store": registry(request).target_of(name)})
        return JobSubmitted(job_id=server(request).submit(spec), store=name)

    @router.get(
        "",
        response_model=Page[JobStatus],
        summary="List jobs (newest first)",
        dependencies=[Depends(require_reader)],
    )
    def list_jobs(
        request: Request,
        offset: Annotated[int, Query(description="Index of the first job.", ge=0)] = 0,
        limit: Annotated[
            int, Query(description=f"Page size (1..{max_page}).", ge=1, le=max_page)
        ] = min(50, max_page),
    ) -> Page[JobStatus]:
        details = sorted(server(request).jobs(), key=lambda d: -(d.start_time or 0))
        stores = registry(request)
        items = [_status(stores, d, with_progress=False) for d in details[offset : offset + limit]]
        return Page[JobStatus](items=items, offset=offset, limit=limit, total=len(details))

    @router.get(
        "/{job_id}",
        response_model=JobStatus,
        summary="Job status with progress",
        dependencies=[Depends(require_reader)],
    )
    def job_status(request: Request, job_id: JobId) -> JobStatus:
        return _status(registry(request), server(request).info(job_id), with_progress=True)

    @router.post(
        "/{job_id}/cancel",
        response_model=JobCancelled,
        summary="Cancel a job (committed shards stay; resuming finishes it)",
        dependencies=[Depends(require_writer)],
    )
    def cancel(request: Request, job_id: JobId) -> JobCancelled:
        return JobCancelled(job_id=job_id, stopping=server(request).stop(job_id))

    @router.get(
        "/{job_id}/logs",
        response_model=JobLogs,
        summary="Tail of a job's log",
        dependencies=[Depends(require_reader)],
    )
    def job_logs(
        request: Request,
        job_id: JobId,
        tail_bytes: Annotated[
            int, Query(description="Most bytes of log to return.", ge=1, le=1 << 20)
        ] = 64 << 10,
    ) -> JobLogs:
        text = server(request).logs(job_id)
        data = text.encode()
        cut = data[-tail_bytes:]
        return JobLogs(
            job_id=job_id, logs=cut.decode(errors="replace"), truncated=len(cut) < len(data)
        )

    return router
