"""Job results held in a store: one route per job kind, built from the kinds' registry.

Each kind with an :class:`~circuitscan.services.jobs.job_kind.ApiView` gets
``GET /api/stores/{store}/results/<path>`` (paged when the view has a page
model); ``GET /api/result-views`` tells the browser how to show each kind's
payload, so a new kind needs no change here nor in the browser.

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel

from circuitscan.schemas.breakdown import Breakdown
from circuitscan.services.api.auth import require_reader
from circuitscan.services.api.errors import ERROR_RESPONSES
from circuitscan.services.api.settings import ApiSettings
from circuitscan.services.api.store_access import STORE_NAME_PATTERN, StoreRegistry
from circuitscan.services.jobs.job_kind import ApiPage, ApiView, BrowserView
from circuitscan.services.jobs.kinds import JOB_KINDS, job_kind
from circuitscan.services.store.results import JobResultInfo, list_results, read_result

StoreName = Annotated[
    str, Path(description="Store name.", max_length=100, pattern=STORE_NAME_PATTERN)
]


def _page(
    page: type[ApiPage], result: BaseModel, rows_from: str, rows_to: str, offset: int, limit: int
) -> ApiPage:
    """One page of ``result.<rows_from>`` as ``page.<rows_to>``, with the job's summary fields."""
    rows = getattr(result, rows_from)
    paging = {"offset": offset, "limit": limit, "total": len(rows)}
    paging[rows_to] = rows[offset : offset + limit]
    summary = {name: getattr(result, name) for name in page.model_fields if name not in paging}
    return page(**summary, **paging)


def _registry(request: Request) -> StoreRegistry:
    return request.app.state.stores


def results_router(settings: ApiSettings) -> APIRouter:
    """The /api/stores/{store}/results routes."""
    router = APIRouter(
        prefix="/api/stores/{store}/results",
        tags=["results"],
        dependencies=[Depends(require_reader)],
        responses=ERROR_RESPONSES,
    )
    max_page = settings.max_page_size
    Offset = Annotated[int, Query(description="Rank of the first item.", ge=0)]
    Limit = Annotated[int, Query(description=f"Page size (1..{max_page}).", ge=1, le=max_page)]
    default_limit = min(50, max_page)

    @router.get("", response_model=list[JobResultInfo], summary="Job results a store holds")
    async def results(request: Request, store: StoreName) -> list[JobResultInfo]:
        with _registry(request).reading(store) as entry:
            return list_results(entry.store)

    By = Annotated[
        str,
        Query(
            description="Prompt field to group by: template, answer, wrong, corrupted, text or "
            "a meta key.",
            min_length=1,
            max_length=200,
        ),
    ]
    Kind = Annotated[
        str | None, Query(description="Result kind when the store holds several.", max_length=40)
    ]
    Top = Annotated[int, Query(description=f"Items at most (1..{max_page}).", ge=1, le=max_page)]

    @router.get(
        "/breakdown",
        response_model=Breakdown,
        summary="A job result broken down by a prompt field (per-group means of per-prompt values)",
    )
    async def breakdown(
        request: Request, store: StoreName, by: By, kind: Kind = None, top: Top = 20
    ) -> Breakdown:
        with _registry(request).reading(store) as entry:
            result = read_result(entry.store, kind)
            return job_kind(result.kind).breakdown(entry.store, result, by, top)

    def whole(kind: str) -> Any:
        async def endpoint(request: Request, store: StoreName) -> Any:
            with _registry(request).reading(store) as entry:
                return read_result(entry.store, kind)

        return endpoint

    def paged(kind: str, view: ApiView, page: type[ApiPage]) -> Any:
        async def endpoint(
            request: Request, store: StoreName, offset: Offset = 0, limit: Limit = default_limit
        ) -> Any:
            with _registry(request).reading(store) as entry:
                result = read_result(entry.store, kind)
            return _page(page, result, view.rows_from, view.rows_to, offset, limit)

        return endpoint

    for kind in JOB_KINDS.values():
        view = kind.api
        if view is None:
            continue
        page = view.page
        router.add_api_route(
            view.path,
            whole(kind.name) if page is None else paged(kind.name, view, page),
            methods=["GET"],
            response_model=kind.result if page is None else page,
            summary=view.summary,
            name=view.name,
        )
    return router


def result_views_router() -> APIRouter:
    """``GET /api/result-views``: how the browser shows each job kind's results payload."""
    router = APIRouter(tags=["results"], dependencies=[Depends(require_reader)])

    @router.get(
        "/api/result-views",
        response_model=dict[str, BrowserView],
        summary="How the browser shows each job kind's results (route, title, columns)",
        responses=ERROR_RESPONSES,
    )
    async def result_views() -> dict[str, BrowserView]:
        return {name: kind.browser for name, kind in JOB_KINDS.items() if kind.browser}

    return router
