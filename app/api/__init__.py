"""The REST API under ``/api/v1``: one router per domain, problem-detail errors, metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from app import problems
from app.api import datasets, jobs, metrics, models
from app.api.deps import API_PREFIX
from app.storage import StorageUnavailable

__all__ = ["API_PREFIX", "api_router", "install"]

log = logging.getLogger(__name__)

# Each router carries the full /api/v1 prefix, so route templates (metric labels) are complete.
# Every /api/v1 route may answer these (a bad parameter, a rate limit, a database outage):
# documented once here, as problem details (FastAPI would document its own 422 shape).
api_router = APIRouter(responses=problems.problem_responses(422, 429, 503))
api_router.include_router(models.router)
api_router.include_router(datasets.router)
api_router.include_router(jobs.router)


DB_RETRY_AFTER_S = 5


async def _on_database_down(request: Request, exc: Exception) -> JSONResponse:
    """The database is unreachable (restart, failover, network): a 503 the client may retry,
    not a 500. Anything else the database says is a real error and stays a 500."""
    if not _connection_problem(exc):
        return await problems._on_unexpected(request, exc)  # noqa: SLF001  (the one 500 shape)
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0])
    body = problems.problem_body(
        503, "database_unavailable", f"the database is unavailable; retry in {DB_RETRY_AFTER_S} s"
    )
    return problems.problem_response(503, body, {"Retry-After": str(DB_RETRY_AFTER_S)})


def _connection_problem(exc: Exception) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError))


STORAGE_RETRY_AFTER_S = 10


async def _on_storage_down(request: Request, exc: Exception) -> JSONResponse:
    """The object store is unreachable: a 503 to retry; nothing half-stored stays (the
    writers abort their multipart uploads before this is raised)."""
    log.warning("storage unavailable on %s %s: %s", request.method, request.url.path, exc)
    body = problems.problem_body(
        503, "storage_unavailable",
        f"file storage is unavailable; nothing was stored. Retry in {STORAGE_RETRY_AFTER_S} s",
    )
    return problems.problem_response(503, body, {"Retry-After": str(STORAGE_RETRY_AFTER_S)})


def install(app: FastAPI) -> None:
    """Register the API, its error handlers and /metrics on ``app``."""
    problems.install(app)
    app.add_exception_handler(sa_exc.DBAPIError, _on_database_down)
    app.add_exception_handler(sa_exc.TimeoutError, _on_database_down)  # pool exhausted while it is down
    app.add_exception_handler(StorageUnavailable, _on_storage_down)
    metrics.install(app)
    app.include_router(api_router)
