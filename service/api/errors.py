"""The one error shape every failure is answered with, and the one place errors become HTTP.

Every error response is JSON ``{"status", "error", "message", "details", "request_id"}``: ``error`` is a
stable machine code (``unknown_task``, ``payload_too_large``…), ``message`` says in words what was wrong.

The runtime raises domain errors (``service.runtime.errors``); ``STATUS`` maps each class to its HTTP
status here and nowhere else. ``ApiError`` is for failures of HTTP itself, raised only by the API layer
(request bodies, keys, middleware).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from index.metadata import MetadataError
from index.store import StoreUnavailable
from service.runtime import errors as domain

log = logging.getLogger("service.errors")

REQUEST_STATE_KEY = "modret"  # per-request dict in the ASGI scope: request id, task, timings
PACED = "paced"  # in that dict: an overload refusal, which the retry pacing middleware may hold


class ErrorBody(BaseModel):
    status: int
    error: str
    message: str
    details: dict[str, Any] | None = None
    request_id: str | None = None


class ApiError(Exception):
    """A failure of the HTTP request itself (body, headers, key), raised by the API layer only."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.details, self.headers = details, headers


# Most specific class first is not needed: ``status_of`` walks each error's MRO.
STATUS: dict[type[domain.ServiceError], int] = {
    domain.ServiceError: 400,
    domain.ImageRejected: 400,
    domain.ImageTooLarge: 413,
    domain.UnsupportedImage: 415,
    domain.NotFound: 404,
    domain.UnknownTask: 404,
    domain.VectorUnavailable: 409,
    domain.Conflict: 409,  # TaskNotIndexed, GalleryOutOfDate, ReloadFailed
    domain.InvalidQuery: 422,
    domain.Unavailable: 503,
    domain.InsufficientStorage: 507,
}


def status_of(exc: domain.ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    raise AssertionError(f"no HTTP status for {type(exc).__name__}")  # ServiceError is always in STATUS


HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameters",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
    507: "insufficient_storage",
}


def error_body(
    status: int,
    error: str,
    message: str,
    details: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    return ErrorBody(
        status=status, error=error, message=message, details=details, request_id=request_id
    ).model_dump()


def request_id_of(scope: MutableMapping[str, Any]) -> str | None:
    state = scope.get(REQUEST_STATE_KEY)
    return state.get("request_id") if isinstance(state, dict) else None


def error_response(
    request: Request,
    status: int,
    error: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status, error, message, details, request_id_of(request.scope))
    return JSONResponse(body, status_code=status, headers=dict(headers) if headers else None)


def _validation_message(errors: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    problems = []
    for err in errors:
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append({"where": where, "problem": str(err.get("msg", "invalid"))})
    text = "; ".join(f"{p['where']}: {p['problem']}" for p in problems) or "invalid request"
    return text, problems


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(request, exc.status, exc.error, exc.message, exc.details, exc.headers)

    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, domain.ServiceError)
        retry = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        if isinstance(exc, domain.Overloaded):  # the model's or the decoder's: a refusal worth pacing
            state = request.scope.get(REQUEST_STATE_KEY)
            if isinstance(state, dict):
                state[PACED] = True
        return error_response(request, status_of(exc), exc.code, exc.message, exc.details, retry)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(request, exc.status_code, code, message, headers=exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, problems = _validation_message(list(exc.errors()))
        return error_response(request, 422, "invalid_parameters", message, {"problems": problems})

    async def on_metadata_error(request: Request, exc: Exception) -> JSONResponse:
        # The metadata database failed a read (a replica's PostgreSQL away): the service itself is fine.
        log.error("metadata unavailable", extra={"fields": {"reason": str(exc)}})
        message = f"the gallery's metadata is unavailable: {exc}"
        return error_response(request, 503, "metadata_unavailable", message, headers={"Retry-After": "5"})

    async def on_store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The vector store's engine failed a call (a Milvus server away): retryable, like the metadata's.
        log.error("vector store unavailable", extra={"fields": {"reason": str(exc)}})
        message = f"the gallery's vector store is unavailable: {exc}"
        return error_response(request, 503, "vector_store_unavailable", message, headers={"Retry-After": "5"})

    async def on_client_gone(request: Request, exc: Exception) -> JSONResponse:
        # The client went away (or the protocol refused its framing) while its body was being read: not a
        # server error. The answer is not delivered; 499 (nginx's "client closed request") is what the
        # access log and the metrics record.
        log.info("client disconnected", extra={"request_id": request_id_of(request.scope)})
        return error_response(request, 499, "client_disconnected", "the client closed the request")

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": request_id_of(request.scope)})
        return error_response(request, 500, "internal_error", "internal error; see the server log")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(domain.ServiceError, on_domain_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(MetadataError, on_metadata_error)
    app.add_exception_handler(StoreUnavailable, on_store_unavailable)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: each listed status documented with ``ErrorBody``."""
    described = {
        400: "Malformed request or image",
        401: "Missing or wrong API key",
        403: "API key lacks the admin right",
        404: "Unknown task or image",
        409: "Task not indexed in the gallery, gallery out of date for the model, or a failed reload",
        413: "Body, image or pixel count too large",
        415: "Image type not allowed",
        422: "Invalid parameters",
        503: "Not ready, shutting down, or queue full (see Retry-After)",
        504: "Request took longer than the configured timeout",
        507: "No room on the gallery's disk: nothing was written; free space and retry (see Retry-After)",
    }
    return {
        s: {"model": ErrorBody, "description": described.get(s, HTTP_CODES.get(s, "error"))} for s in statuses
    }
