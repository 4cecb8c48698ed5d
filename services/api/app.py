"""The FastAPI application: ``create_app(settings)`` wires routes, auth, limits and errors."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from circuitscan.services.api.auth import document_read_tokens
from circuitscan.services.api.body_limit import BodyLimitMiddleware
from circuitscan.services.api.errors import ERROR_RESPONSES, install_error_handlers
from circuitscan.services.api.job_server import JobServer
from circuitscan.services.api.models import Health
from circuitscan.services.api.routes_jobs import jobs_router
from circuitscan.services.api.routes_results import result_views_router, results_router
from circuitscan.services.api.routes_stores import stores_router
from circuitscan.services.api.routes_views import views_router
from circuitscan.services.api.settings import ApiSettings
from circuitscan.services.api.store_access import StoreRegistry

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def _version() -> str:
    try:
        return dist_version("circuitscan")
    except PackageNotFoundError:
        return "unknown"


def create_app(settings: ApiSettings) -> FastAPI:
    """A new app serving the stores under ``settings.store_root`` and, if set, Ray jobs."""
    # /docs and /redoc with their scripts served from the package, not a CDN:
    # cluster API pods often have no way out to the internet.
    app = FastAPIOffline(
        title="circuitscan",
        version=_version(),
        description=(
            "Submit and follow activation-cache and attribution jobs, query feature stores, "
            "browse features. Mutating routes need `Authorization: Bearer <token>`; errors "
            'are JSON `{"error": message}`.'
        ),
    )
    app.state.settings = settings
    app.state.stores = StoreRegistry(
        settings.store_root, settings.store_refresh_seconds, settings.decoded_shards
    )
    app.state.job_server = JobServer(settings.ray_address)
    install_error_handlers(app)
    document_read_tokens(app, settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.get(
        "/api/health",
        response_model=Health,
        tags=["service"],
        summary="Liveness",
        responses=ERROR_RESPONSES,
    )
    def health() -> Health:
        return Health(
            status="ok", version=_version(), jobs_enabled=settings.ray_address is not None
        )

    app.include_router(results_router(settings))
    app.include_router(result_views_router())
    app.include_router(stores_router(settings))
    app.include_router(views_router())
    app.include_router(jobs_router(settings))

    # The feature browser: static files only; the page itself calls the API above.
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/web/index.html")

    # Static files hold no data, so they stay open even when reads need a token.
    app.mount("/web", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app
