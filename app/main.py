"""The FastAPI application factory: ``uvicorn --factory app.main:create_app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu import Connection
from sqlalchemy import text

from app.api import install as install_api
from app.db import make_engine, make_sessionmaker
from app.migrate import ensure_schema, schema_is_current
from app.settings import Settings, get_settings
from app.storage import StorageFull, make_storage
from app.ui import router as ui_router


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.mode == "embedded":
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url)
        try:
            # Embedded mode is one process: it may migrate. In full mode several replicas
            # start at once, so an operator migrates and a stale schema stops start-up.
            ensure_schema(engine, auto_upgrade=settings.mode == "embedded")
            app.state.settings = settings
            app.state.engine = engine
            app.state.sessions = make_sessionmaker(engine)
            app.state.storage = make_storage(settings)
            yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="TensorTrim",
        summary="Model compression by tensor decomposition with budget-aware rank selection",
        description=(
            "Upload a TorchScript model, start a job with a budget (`flops:3x`), follow it as Server-Sent "
            "Events, download the compressed model. Every `/api/v1` route needs `Authorization: Bearer <key>` "
            "(create one with `tensortrim keys create --user NAME`); errors are RFC 9457 problem details."
        ),
        version="1",
        lifespan=lifespan,
    )
    install_api(app)
    app.include_router(ui_router)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers. Restarting it would not fix a dependency outage."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        """Readiness: database at the current schema, broker reachable, storage has room."""
        checks = {
            "database": _check(lambda: _database_ready(request)),
            "broker": _check(lambda: _broker_ready(settings.broker_url)),
            "storage": _check(lambda: request.app.state.storage.check_free_space(0)),
        }
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)

    return app


def _check(probe: Any) -> str:
    try:
        probe()
    except StorageFull as e:
        return f"storage full: {e}"
    except Exception as e:  # noqa: BLE001  (any failure means not ready; say which)
        return f"{type(e).__name__}: {e}"
    return "ok"


def _database_ready(request: Request) -> None:
    engine = request.app.state.engine
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    if not schema_is_current(engine):
        raise RuntimeError("schema is not at the migration head")


def _broker_ready(url: str) -> None:
    with Connection(url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
