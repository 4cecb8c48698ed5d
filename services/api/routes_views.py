"""What the browser draws: feature pages, head pages and the figures of a store's results.

- ``GET /api/stores/{store}/sites/{site}/features/{feature}/page``: the feature
  page payload (``schemas.feature_page.FeaturePage``);
- ``GET …/features/{feature}/figures``: its SVG figures (histogram, logit
  effects, reading heads);
- ``GET /api/stores/{store}/figures``: the SVG figures of the store's job
  results (attribution maps, ablation distributions, DFA heatmaps);
- ``GET /api/stores/{store}/heads/{layer}/{head}``: a head's nodes among the
  stored top nodes.

Figures are the report's own markup (``services/reports/svg.py``); their
nodes link to browser addresses (``?store=…&site=…&feature=…``, a feature
of an attribute store pointing into a served store that caches its site).

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.feature_page import FeaturePage
from circuitscan.services.api.auth import require_reader
from circuitscan.services.api.errors import ERROR_RESPONSES, ApiError
from circuitscan.services.api.store_access import STORE_NAME_PATTERN, StoreRegistry
from circuitscan.services.reports.feature_page_html import feature_page_figures
from circuitscan.services.reports.result_figures import SvgFigure, head_rows, result_figures
from circuitscan.services.reports.svg import Link
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.feature_page import feature_page

StoreName = Annotated[
    str, Path(description="Store name.", max_length=100, pattern=STORE_NAME_PATTERN)
]
SiteLabel = Annotated[str, Path(description="Site label, e.g. L6.z.", max_length=200)]
FeatureId = Annotated[int, Path(description="Feature id.", ge=0)]


class HeadNode(BaseModel):
    """One node of a head among an attribute result's top nodes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    node: str = Field(description="Node string, e.g. 'z:L9:1@END'.")
    estimate: float = Field(description="Mean signed estimate (metric units).")
    exact: float | None = Field(description="Mean exact Δm when verified, else None.")


class HeadPage(BaseModel):
    """A head's nodes (every kind and position) in a store's attribute result."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    layer: int = Field(ge=0, description="Layer.")
    head: int = Field(ge=0, description="Head index (k/v nodes: key/value head under GQA).")
    nodes: list[HeadNode] = Field(description="Its nodes, largest |estimate| first.")


def _registry(request: Request) -> StoreRegistry:
    return request.app.state.stores


def _browser_link(registry: StoreRegistry, store: str) -> Link:
    """Page keys (``feature:SITE:ID``, ``head:Lx:h``) → browser addresses.

    Which served store caches each site is looked up first, one store at a
    time (call it before taking a store's lock: the locks are not reentrant).
    """
    caching: dict[str, str] = {}
    for name in reversed([store, *registry.names()]):  # this store wins a site it caches
        try:
            with registry.reading(name) as entry:
                caching |= {s.label: name for s in entry.store.layout.sites}
        except ApiError:
            continue

    def link(key: str) -> str | None:
        kind, *rest = key.split(":")
        if kind == "feature":
            site, feature = ":".join(rest[:-1]), rest[-1]
            target = caching.get(site)
            if target is None:
                return None
            return "?" + urlencode({"store": target, "site": site, "feature": feature})
        if kind == "head":
            return "?" + urlencode({"store": store, "head": f"{rest[0][1:]}.{rest[1]}"})
        return None

    return link


def views_router() -> APIRouter:
    """The feature-page, head-page and figure routes."""
    router = APIRouter(
        prefix="/api/stores/{store}",
        tags=["views"],
        dependencies=[Depends(require_reader)],
        responses=ERROR_RESPONSES,
    )

    @router.get(
        "/sites/{site}/features/{feature}/page",
        response_model=FeaturePage,
        summary="Everything a feature page shows (histogram, examples, logit effects, heads)",
    )
    async def page(
        request: Request,
        store: StoreName,
        site: SiteLabel,
        feature: FeatureId,
        top: Annotated[int, Query(description="Top examples.", ge=1, le=50)] = 10,
        sampled: Annotated[int, Query(description="Weaker examples.", ge=0, le=50)] = 6,
        context: Annotated[int, Query(description="Tokens each side.", ge=0, le=32)] = 6,
    ) -> FeaturePage:
        registry = _registry(request)
        decode = await registry.decoder(store)
        with registry.reading(store) as entry:
            _check_site(entry.store, site)
            return feature_page(
                entry.store, site, feature, n_top=top, n_sampled=sampled, context=context,
                decode=decode,
            )  # fmt: skip

    @router.get(
        "/sites/{site}/features/{feature}/figures",
        response_model=list[SvgFigure],
        summary="A feature page's SVG figures",
    )
    async def page_figures(
        request: Request, store: StoreName, site: SiteLabel, feature: FeatureId
    ) -> list[SvgFigure]:
        registry = _registry(request)
        decode = await registry.decoder(store)
        link = _browser_link(registry, store)
        with registry.reading(store) as entry:
            _check_site(entry.store, site)
            built = feature_page(entry.store, site, feature, n_sampled=0, decode=decode)
        return feature_page_figures(built, link)

    @router.get("/figures", response_model=list[SvgFigure], summary="Figures of the job results")
    async def figures(request: Request, store: StoreName) -> list[SvgFigure]:
        registry = _registry(request)
        link = _browser_link(registry, store)
        with registry.reading(store) as entry:
            return result_figures(entry.store, link)

    @router.get("/heads/{layer}/{head}", response_model=HeadPage, summary="One head's nodes")
    async def head_page(
        request: Request,
        store: StoreName,
        layer: Annotated[int, Path(description="Layer.", ge=0)],
        head: Annotated[int, Path(description="Head index.", ge=0)],
    ) -> HeadPage:
        with _registry(request).reading(store) as entry:
            rows = head_rows(entry.store, layer, head)
        rows.sort(key=lambda r: -abs(r[1]))
        nodes = [HeadNode(node=n, estimate=e, exact=x) for n, e, x in rows]
        return HeadPage(layer=layer, head=head, nodes=nodes)

    return router


def _check_site(store: FeatureStore, site: str) -> None:
    labels = [s.label for s in store.layout.sites]
    if site not in labels:
        raise ApiError(404, f"unknown site {site!r}; the store has {labels}")
