"""Bearer-token checks: always on mutating routes, on reads when ``protect_reads`` is set.

A missing token is 401 (with ``WWW-Authenticate: Bearer``), a token that is
not configured is 403. With no tokens configured, mutations are refused
outright: an API exposed on a network must not accept anonymous job
submissions by default.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from circuitscan.services.api.errors import ApiError
from circuitscan.services.api.settings import ApiSettings

# auto_error=False: our own errors keep the {"error": ...} body and 401/403 split.
bearer = HTTPBearer(auto_error=False, description="An API token from the server's configuration.")


def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def _check(settings: ApiSettings, credentials: HTTPAuthorizationCredentials | None) -> None:
    accepted = settings.token_values()
    if not accepted:
        raise ApiError(403, "no API tokens are configured on this server; mutations are disabled")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    given = credentials.credentials.encode()
    # Compare against every token in constant time so timing reveals nothing.
    if not any(hmac.compare_digest(given, token.encode()) for token in accepted):
        raise ApiError(403, "the bearer token is not accepted")


def require_writer(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> None:
    """Dependency of every mutating route."""
    _check(_settings(request), credentials)


def _read_credentials(request: Request) -> HTTPAuthorizationCredentials | None:
    """The request's bearer credentials, parsed as HTTPBearer parses them."""
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    if not scheme or not token:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


def require_reader(request: Request) -> None:
    """Dependency of every read route: open unless the server protects reads.

    It reads the header itself rather than through ``bearer``: a route that
    depends on ``bearer`` is documented as needing a token, and open reads do
    not (:func:`document_read_tokens` documents them when they do).
    """
    settings = _settings(request)
    if settings.protect_reads:
        _check(settings, _read_credentials(request))


def document_read_tokens(app: FastAPI, settings: ApiSettings) -> None:
    """On a server that protects reads, mark its read routes as needing a token in OpenAPI."""
    if not settings.protect_reads:
        return
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes.setdefault("HTTPBearer", {"type": "http", "scheme": "bearer"})
        for path, item in schema.get("paths", {}).items():
            if path.startswith("/api/") and path != "/api/health" and "get" in item:
                item["get"].setdefault("security", [{"HTTPBearer": []}])
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
