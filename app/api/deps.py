"""Request dependencies as typed aliases: ``SessionDep``, ``UserDep``, ``StorageDep``...

Collaborators that reach outside the process (the broker, the inspection sandbox)
are dependencies too, so tests and deployments can point them elsewhere with
``app.dependency_overrides``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth import authenticate, bearer_token, has_scope
from app.models import ApiKey, User
from app.problems import Forbidden, Unauthorized
from app.services import rate_limit
from app.services.sandbox import (
    DatasetInspector,
    ModelInspector,
    default_dataset_inspector,
    default_model_inspector,
)
from app.services.tx import run_after_commit, run_on_rollback
from app.settings import Settings
from app.storage import Storage

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
Enqueue = Callable[[str, str | None], object]
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_session(request: Request) -> Iterator[Session]:
    """The request's unit of work: commits when the route returns (before the response
    is sent) and then runs the after-commit actions; on any error rolls back and runs
    the on-rollback ones (deleting a file stored for a row that never landed)."""
    session: Session = request.app.state.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        run_on_rollback(session)
        raise
    finally:
        session.close()
    run_after_commit(session)


# scope="function": the commit happens before the response goes out, so a client that
# reads a 201 can fetch what it created at once.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


StorageDep = Annotated[Storage, Depends(get_storage)]


def current_key(request: Request, session: SessionDep, settings: SettingsDep) -> ApiKey:
    """The caller's API key. Reads need the ``read`` scope, everything else ``write``."""
    header = request.headers.get("authorization")
    token = bearer_token(header)
    if token is None:
        raise Unauthorized("missing API key" if not header else "malformed Authorization header")
    key = authenticate(session, token, secret=settings.secret_key.get_secret_value())
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    scope = "read" if request.method in _READ_METHODS else "write"
    if not has_scope(key, scope):
        raise Forbidden(f"this API key lacks the {scope!r} scope; create a key with it")
    rate_limit.enforce(_limiter(request, settings), str(key.id), settings)
    return key


def _limiter(request: Request, settings: Settings) -> rate_limit.Limiter | None:
    """One limiter per app, made on first use (the lifespan knows nothing of it)."""
    state = request.app.state
    if not hasattr(state, "rate_limiter"):
        with _limiter_lock:
            if not hasattr(state, "rate_limiter"):
                state.rate_limiter = rate_limit.make_limiter(settings)
    return state.rate_limiter  # type: ignore[no-any-return]


_limiter_lock = threading.Lock()


KeyDep = Annotated[ApiKey, Depends(current_key)]


def current_user(key: KeyDep) -> User:
    return key.user


UserDep = Annotated[User, Depends(current_user)]


def _enqueue_via_worker(job_id: str, queue: str | None = None) -> object:
    from worker.queue import enqueue_job  # type: ignore[import-not-found]  # lazy: the API runs without Celery code

    return enqueue_job(job_id, queue)


def get_enqueue() -> Enqueue:
    """Sends a job id to the broker. Called only after the job's row is committed."""
    return _enqueue_via_worker


EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]


def _hidden_from_inspection(settings: Settings) -> list[Path]:
    """What an inspection child must not see: the data directory and storage (other uploads)."""
    return [settings.data_dir, settings.storage_dir]


def get_model_inspector(settings: SettingsDep) -> ModelInspector:
    return default_model_inspector(_hidden_from_inspection(settings))


ModelInspectorDep = Annotated[ModelInspector, Depends(get_model_inspector)]


def get_dataset_inspector(settings: SettingsDep) -> DatasetInspector:
    return default_dataset_inspector(_hidden_from_inspection(settings))


DatasetInspectorDep = Annotated[DatasetInspector, Depends(get_dataset_inspector)]


@dataclass(frozen=True)
class StreamConfig:
    """Server-Sent Events: how long one connection may live, how often the database is
    polled when no Redis message arrives, and how often a keep-alive comment is sent."""

    max_lifetime_s: float = 300.0
    poll_interval_s: float = 1.0
    keepalive_s: float = 15.0
    redis_url: str | None = None


def get_stream_config(settings: SettingsDep) -> StreamConfig:
    redis_url = settings.broker_url if settings.mode == "full" and settings.broker_url.startswith("redis") else None
    return StreamConfig(redis_url=redis_url)


StreamConfigDep = Annotated[StreamConfig, Depends(get_stream_config)]

INSPECT_TIMEOUT_S = 120.0
