"""Every error leaves the API as JSON ``{"error": message}`` with a fitting status code.

Errors of circuitscan's own (:mod:`circuitscan.schemas.errors`) answer with
their branch's status: user errors a 4xx naming what is wrong (404 for
something missing, 409 for a clash), a damaged store a 409 naming the damaged
object (the stored state conflicts with the request; `circuitscan repair`
resolves it), unreachable machinery a 503. Anything unexpected, and only that,
gets a 500 whose body says nothing about the server's internals. Tracebacks go to the server log
only, and only for the unexpected.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from circuitscan.schemas.errors import CircuitscanError, StoreCorruptionError

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """The body of every error response."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    error: str = Field(description="What went wrong, for a person to read.")


class ApiError(CircuitscanError):
    """An error with an HTTP status and a message safe to show to the client.

    Raised by the HTTP layer itself (auth, store names, the Ray job server), so
    it carries its own status instead of taking its branch's.
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = self.http_status = status
        self.message = message
        self.headers = headers


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:10]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _root_forms(root: str) -> list[str]:
    """How a store root can appear in a message: as configured, and as an absolute path."""
    forms = [root.rstrip("/")]
    if "://" not in root or root.startswith("file://"):
        local = Path(root.removeprefix("file://")).expanduser()
        forms += [str(local.absolute()), str(local.resolve())]
    return sorted({form for form in forms if form}, key=len, reverse=True)


def public_message(message: str, request: Request) -> str:
    """``message`` with the server's store root taken out: a store is named by its API name.

    The layers below name stores by location (right for the CLI, where the
    user typed it); a client of the API knows a store by name, and the
    server's folder layout is none of its business.
    """
    settings = getattr(request.app.state, "settings", None)
    root = getattr(settings, "store_root", None)
    if not root:
        return message
    for form in _root_forms(str(root)):
        message = message.replace(form + "/", "").replace(form, "the store root")
    return message


def install_error_handlers(app: FastAPI) -> None:
    """Map exceptions to JSON error responses (a catch-all 500 included)."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(CircuitscanError)
    async def _circuitscan_error(request: Request, exc: CircuitscanError) -> JSONResponse:
        if isinstance(exc, StoreCorruptionError):
            log.error("damaged store on %s %s: %s", request.method, request.url.path, exc)
        return error_response(exc.http_status, public_message(str(exc), request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")


# Documented on every route so that the OpenAPI schema names the error body.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "Bad request"),
        (401, "Missing bearer token"),
        (403, "Token not accepted"),
        (404, "Not found"),
        (
            409,
            "Conflicts with what the store holds, or the store is damaged (the error names "
            "the damaged object; `circuitscan repair STORE` puts it right)",
        ),
        (413, "Request body too large"),
        (422, "Invalid parameters"),
        (500, "Internal error (a bug)"),
        (503, "A backing service is unreachable"),
    )
}
