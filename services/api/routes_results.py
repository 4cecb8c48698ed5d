"""Job results held in a store: attribution top nodes, splice evaluations, ablation scans, DFA.

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.job_results import (
    AblationJobResult,
    AttributionJobResult,
    DFAFeatureSummary,
    DFAJobResult,
    FeatureDelta,
    NodeEffect,
    SpliceEvalJobResult,
)
from circuitscan.services.api.auth import require_reader
from circuitscan.services.api.errors import ERROR_RESPONSES
from circuitscan.services.api.settings import ApiSettings
from circuitscan.services.api.store_access import STORE_NAME_PATTERN, StoreRegistry
from circuitscan.services.store.results import JobResultInfo, list_results, read_result

StoreName = Annotated[
    str, Path(description="Store name.", max_length=100, pattern=STORE_NAME_PATTERN)
]
_STRICT = ConfigDict(frozen=True, extra="forbid")


class AttributionResults(BaseModel):
    """A page of an attribute job's top nodes, with the job's summary."""

    model_config = _STRICT
    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    method: str = Field(description="Estimator: atp or atpstar.")
    n_prompts: int = Field(description="Prompt pairs aggregated.")
    n_nodes: int = Field(description="Distinct nodes scored.")
    n_verified: int = Field(description="Top nodes checked by exact patching.")
    offset: int = Field(description="Rank of the first node of this page (0 = best).")
    limit: int = Field(description="Page size asked for.")
    total: int = Field(description="Top nodes the job kept.")
    nodes: list[NodeEffect] = Field(
        description="Nodes by mean |effect|, with scores and verification status."
    )


class AblationResults(BaseModel):
    """A page of an ablation scan's per-feature effects, with the scan's summary."""

    model_config = _STRICT
    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    site: str = Field(description="SAE site label scanned.")
    mode: str = Field(description="Ablation value: zero, mean or resample.")
    n_prompts: int = Field(description="Prompts scanned.")
    baseline_mean: float = Field(description="Mean clean metric over the prompts.")
    offset: int = Field(description="Rank of the first feature of this page.")
    limit: int = Field(description="Page size asked for.")
    total: int = Field(description="Features scanned.")
    features: list[FeatureDelta] = Field(description="Features by mean |Δm|, largest first.")


class DFAResults(BaseModel):
    """A page of a DFA job's features, with the job's summary."""

    model_config = _STRICT
    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    site: str = Field(description="hook_z SAE site label.")
    position: str = Field(description="Destination position as the job named it.")
    n_prompts: int = Field(description="Prompts analysed.")
    offset: int = Field(description="Rank of the first feature of this page.")
    limit: int = Field(description="Page size asked for.")
    total: int = Field(description="Features decomposed.")
    features: list[DFAFeatureSummary] = Field(
        description="Features by total activation, largest first; contributions by head and "
        "by source role."
    )


Page = TypeVar("Page", AttributionResults, AblationResults, DFAResults)


def _page(
    page: type[Page], result: BaseModel, rows_from: str, rows_to: str, offset: int, limit: int
) -> Page:
    """One page of ``result.<rows_from>`` as ``page.<rows_to>``, with the job's summary fields."""
    rows = getattr(result, rows_from)
    paging = {"offset": offset, "limit": limit, "total": len(rows)}
    paging[rows_to] = rows[offset : offset + limit]
    summary = {name: getattr(result, name) for name in page.model_fields if name not in paging}
    return page(**summary, **paging)


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

    def registry(request: Request) -> StoreRegistry:
        return request.app.state.stores

    @router.get("", response_model=list[JobResultInfo], summary="Job results a store holds")
    async def results(request: Request, store: StoreName) -> list[JobResultInfo]:
        with registry(request).reading(store) as entry:
            return list_results(entry.store)

    @router.get(
        "/attribution",
        response_model=AttributionResults,
        summary="Top nodes of an attribute job (scores, verification status)",
    )
    async def attribution(
        request: Request, store: StoreName, offset: Offset = 0, limit: Limit = default_limit
    ) -> AttributionResults:
        with registry(request).reading(store) as entry:
            result = read_result(entry.store, "attribute")
        assert isinstance(result, AttributionJobResult)
        return _page(AttributionResults, result, "top", "nodes", offset, limit)

    @router.get(
        "/splice-eval",
        response_model=SpliceEvalJobResult,
        summary="Splice evaluation of a splice_eval job (metric, KL per site set)",
    )
    async def splice_eval(request: Request, store: StoreName) -> SpliceEvalJobResult:
        with registry(request).reading(store) as entry:
            result = read_result(entry.store, "splice_eval")
        assert isinstance(result, SpliceEvalJobResult)
        return result

    @router.get(
        "/ablation",
        response_model=AblationResults,
        summary="Per-feature effects of an ablation_scan job",
    )
    async def ablation(
        request: Request, store: StoreName, offset: Offset = 0, limit: Limit = default_limit
    ) -> AblationResults:
        with registry(request).reading(store) as entry:
            result = read_result(entry.store, "ablation_scan")
        assert isinstance(result, AblationJobResult)
        return _page(AblationResults, result, "features", "features", offset, limit)

    @router.get(
        "/dfa",
        response_model=DFAResults,
        summary="Features of a dfa job split by head and by source role",
    )
    async def dfa(
        request: Request, store: StoreName, offset: Offset = 0, limit: Limit = default_limit
    ) -> DFAResults:
        with registry(request).reading(store) as entry:
            result = read_result(entry.store, "dfa")
        assert isinstance(result, DFAJobResult)
        return _page(DFAResults, result, "features", "features", offset, limit)

    return router
