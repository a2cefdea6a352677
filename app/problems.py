"""Errors as RFC 9457 problem details, for every 4xx/5xx the service answers.

A service raises a :class:`Problem` (or a subclass that fixes the status) with a
stable ``code`` and a ``detail`` that says what to fix; the handlers registered by
:func:`install` turn it, FastAPI's validation errors, Starlette's HTTP errors
(unknown routes, wrong methods) and unexpected exceptions into one JSON shape::

    {"type": "urn:tensortrim:problem:quota_exceeded", "title": "Quota exceeded",
     "status": 429, "detail": "...", "code": "quota_exceeded", "field": null}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

TYPE_PREFIX = "urn:tensortrim:problem:"
MEDIA_TYPE = "application/problem+json"
KEY_HELP = "create one with `tensortrim keys create --user NAME` and send it as `Authorization: Bearer <key>`"


class ProblemDetail(BaseModel):
    """The body of every error response (RFC 9457)."""

    type: str = Field(examples=[f"{TYPE_PREFIX}not_found"])
    title: str = Field(examples=["Not found"])
    status: int = Field(examples=[404])
    detail: str = Field(examples=["no job 0b6f... belongs to you"])
    code: str = Field(examples=["not_found"], description="stable machine-readable error code")
    field: str | None = Field(default=None, examples=["budget"], description="the request field at fault, if any")
    errors: list[dict[str, Any]] | None = Field(default=None, description="every validation error, for 422s")


class Problem(Exception):
    """An error that knows its HTTP status. Subclasses fix ``status`` and a default ``code``."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        field: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.field = field
        self.headers = headers or {}
        self.errors = errors

    def body(self) -> dict[str, Any]:
        return problem_body(self.status, self.code, self.detail, field=self.field, errors=self.errors)


class Unauthorized(Problem):
    status, code = 401, "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}: {KEY_HELP}", headers={"WWW-Authenticate": 'Bearer realm="tensortrim"'})


class Forbidden(Problem):
    status, code = 403, "insufficient_scope"


class NotFound(Problem):
    """Also what another user's object looks like: never 403, so ids leak nothing."""

    status, code = 404, "not_found"


class Conflict(Problem):
    status, code = 409, "conflict"


class PayloadTooLarge(Problem):
    status, code = 413, "too_large"


class Unprocessable(Problem):
    status, code = 422, "invalid_request"


class QuotaExceeded(Problem):
    status, code = 429, "quota_exceeded"


class InsufficientStorage(Problem):
    status, code = 507, "storage_full"


def problem_body(
    status: int, code: str, detail: str, *, field: str | None = None, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "field": field,
    }
    if errors is not None:
        body["errors"] = errors
    return body


def problem_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def _loc(loc: Sequence[Any]) -> str:
    # ("body", "budget") -> "budget"; ("query", "limit") -> "limit"; ("body",) -> "body"
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts)


def _validation_message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    # pydantic prefixes messages of errors raised in validators with "Value error, ".
    return msg.removeprefix("Value error, ")


async def _on_problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.body(), exc.headers)


async def _on_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _loc(e.get("loc", ())), "message": _validation_message(e), "type": e.get("type")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": None, "message": "invalid request"}
    detail = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors)
    return problem_response(422, problem_body(422, "validation_error", detail, field=first["field"], errors=errors))


_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable"}


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, "http_error")
    if status == 404 and exc.detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}; the API lives under /api/v1 (see /docs)"
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; see /docs for the methods it takes"
    else:
        detail = str(exc.detail)
    return problem_response(status, problem_body(status, code, detail), dict(exc.headers or {}))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = problem_body(500, "internal_error", "the server failed unexpectedly; the error was logged, try again")
    return problem_response(500, body)


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)


# For OpenAPI: `responses=problem_responses(404, 409)` on a route documents its problem bodies.
def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        s: {"model": ProblemDetail, "content": {MEDIA_TYPE: {}}, "description": HTTPStatus(s).phrase}
        for s in statuses
    }
