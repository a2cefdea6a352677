"""``/ui``: server-rendered pages plus the small JSON/SSE endpoints their scripts call.

Pages (HTML): sign in / out, job list, new job (upload + budget + method), job detail.
Endpoints under ``/ui/api`` take the session cookie and the CSRF header and call the
same service functions as ``/api/v1`` (with the same dependencies, so overrides made
for the API apply here too); their errors are the API's problem details.
"""

from __future__ import annotations

import mimetypes
import uuid
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    INSPECT_TIMEOUT_S,
    DatasetInspectorDep,
    EnqueueDep,
    ModelInspectorDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    StreamConfigDep,
)
from app.auth import authenticate, bearer_token
from app.models import ApiKey, Job, ModelFile
from app.problems import NotFound, Problem
from app.schemas.datasets import DatasetOut, DatasetUploadOut
from app.schemas.jobs import JobCreate, JobOut
from app.schemas.models import ModelOut
from app.services import datasets as dataset_service
from app.services import jobs as job_service
from app.services import models as model_service
from app.services import quota
from app.services.job_stream import job_events
from app.services.pagination import Cursor, split
from app.services.uploads import receive_upload
from app.ui import views
from app.ui.deps import (
    CSRF_FIELD,
    OptionalUiKeyDep,
    UiUserDep,
    check_csrf,
    clear_session,
    csrf_token,
    persist_csrf,
    rotate_csrf,
    set_session,
)

ROOT = Path(__file__).resolve().parent.parent
STATIC_DIR = ROOT / "static"
templates = Jinja2Templates(directory=ROOT / "templates")
templates.env.filters["human"] = views.human

router = APIRouter(prefix="/ui", include_in_schema=False)


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    settings = request.app.state.settings
    ctx = {"csrf_token": csrf_token(request, settings), "user": None, **context}
    response = templates.TemplateResponse(request, name, ctx, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    # The pages load nothing from elsewhere and are never framed.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    persist_csrf(request, response)
    return response


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/jobs"


def _not_found(request: Request, key: ApiKey, what: str) -> HTMLResponse:
    return render(request, "404.html", {"user": key.user, "what": what}, status_code=404)


def _parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


# --- static files --------------------------------------------------------------------------


@router.get("/static/{name}", name="ui_static")
def static(name: str) -> Response:
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise NotFound(f"no static file {name!r}")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=300"})


# --- signing in and out --------------------------------------------------------------------


@router.get("", include_in_schema=False)
@router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/login", name="ui_login")
def login_form(request: Request, key: OptionalUiKeyDep, next: str | None = None) -> Response:
    if key is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
    csrf: Annotated[str, Form(alias=CSRF_FIELD)] = "",
    next: Annotated[str, Form()] = "/ui/jobs",
) -> Response:
    check_csrf(request, settings, csrf)
    token = bearer_token(f"Bearer {api_key.strip()}")
    key = authenticate(session, token, secret=settings.secret_key.get_secret_value()) if token else None
    if key is None:
        error = "That API key is not valid (or was revoked). Create one with: tensortrim keys create --user NAME"
        return render(request, "login.html", {"next": _safe_next(next), "error": error}, status_code=401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session(response, request, settings, key)
    rotate_csrf(request)  # a fresh token for the signed-in session
    persist_csrf(request, response)
    return response


@router.post("/logout")
def logout(request: Request, settings: SettingsDep, csrf: Annotated[str, Form(alias=CSRF_FIELD)] = "") -> Response:
    check_csrf(request, settings, csrf)
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session(response)
    return response


# --- pages ---------------------------------------------------------------------------------


def _job_rows(session: Any, key: ApiKey, jobs: list[Job]) -> list[dict[str, Any]]:
    ids = {j.model_id for j in jobs}
    names = dict(
        session.execute(
            select(ModelFile.id, ModelFile.name).where(ModelFile.id.in_(ids), ModelFile.owner_id == key.user_id)
        ).all()
    ) if ids else {}
    return [
        {
            "job": j,
            "model": names.get(j.model_id, "?"),
            "status_label": views.STATUS_LABELS.get(j.status, j.status),
            "reduction": views.reduction(j.metrics),
            "accuracy": views.accuracy_change(j.metrics),
        }
        for j in jobs
    ]


@router.get("/jobs", name="ui_jobs")
def jobs_page(
    request: Request, session: SessionDep, key: OptionalUiKeyDep, cursor: Annotated[str | None, Query()] = None
) -> Response:
    if key is None:
        return _to_login(request)
    try:
        after = Cursor.decode(cursor) if cursor else None
    except Problem:
        after = None
    rows = job_service.JobRepository(session, key.user).list(25, after, [])
    items, next_cursor = split(rows, 25)
    return render(
        request, "jobs.html", {"user": key.user, "rows": _job_rows(session, key, items), "next_cursor": next_cursor}
    )


@router.get("/jobs/new", name="ui_new_job")
def new_job_page(request: Request, key: OptionalUiKeyDep, settings: SettingsDep) -> Response:
    if key is None:
        return _to_login(request)
    return render(
        request, "new_job.html",
        {"user": key.user, "methods": views.METHODS, "max_upload": settings.max_upload_bytes},
    )


@router.get("/jobs/{job_id}", name="ui_job")
def job_page(job_id: str, request: Request, session: SessionDep, key: OptionalUiKeyDep) -> Response:
    if key is None:
        return _to_login(request)
    jid = _parse_uuid(job_id)
    repo = job_service.JobRepository(session, key.user)
    job = repo.get(jid) if jid else None
    if job is None:
        return _not_found(request, key, "job")
    model = model_service.ModelRepository(session, key.user).get(job.model_id)
    layers = [
        {"layer": r.layer, "form": r.form, "ranks": list(r.ranks), "macs_before": r.macs_before,
         "macs_after": r.macs_after}
        for r in repo.layer_ranks(job.id)
    ]
    points = views.sweep_points(job.metrics)
    view = job_service.job_view(job)
    return render(
        request, "job.html",
        {
            "user": key.user,
            "job": job,
            "model": model,
            "eta": view["eta_seconds"],
            "status_label": views.STATUS_LABELS.get(job.status, job.status),
            "active": job.status in views.ACTIVE,
            "layers": layers,
            "ranks_chart": views.ranks_chart(layers),
            "macs_chart": views.macs_chart(layers),
            "sweep_chart": views.sweep_chart(points, views.sweep_label(job.metrics)),
            "sweep_label": views.sweep_label(job.metrics),
            "sweep_rows": views.sweep_rows(job.metrics),
            "metric_rows": views.metric_rows(job.metrics),
            "reduction": views.reduction(job.metrics),
            "artifacts": repo.artifacts(job.id),
        },
    )


@router.get("/jobs/{job_id}/artifacts/{name}", name="ui_download")
def download(job_id: str, name: str, request: Request, session: SessionDep, key: OptionalUiKeyDep,
             storage: StorageDep) -> Response:
    if key is None:
        return _to_login(request)
    jid = _parse_uuid(job_id)
    try:
        artifact = job_service.get_artifact(session, key.user, jid, name) if jid else None
    except NotFound:
        artifact = None
    if artifact is None:
        return _not_found(request, key, "file")
    return storage.download_response(
        artifact.storage_key, filename=artifact.name,
        headers={"ETag": f'"{artifact.sha256}"', "Cache-Control": "private, no-cache"},
    )


# --- what the pages' scripts call (session cookie + X-CSRF-Token) --------------------------


@router.post("/api/models", status_code=201, response_model=ModelOut)
async def upload_model(
    request: Request,
    session: SessionDep,
    user: UiUserDep,
    storage: StorageDep,
    settings: SettingsDep,
    inspector: ModelInspectorDep,
) -> ModelFile:
    left = await run_in_threadpool(quota.storage_left, session, user.id, settings)
    upload = await receive_upload(request, storage, kind="models", max_bytes=settings.max_upload_bytes,
                                  quota_left=left)
    return await run_in_threadpool(
        lambda: model_service.register_model(
            session, user, upload, storage=storage, input_spec=upload.fields.get("input_spec") or None,
            inspector=inspector, timeout=INSPECT_TIMEOUT_S,
        )
    )


@router.post("/api/datasets", status_code=201, response_model=DatasetUploadOut)
async def upload_dataset(
    request: Request,
    session: SessionDep,
    user: UiUserDep,
    storage: StorageDep,
    settings: SettingsDep,
    inspector: DatasetInspectorDep,
) -> DatasetUploadOut:
    left = await run_in_threadpool(quota.storage_left, session, user.id, settings)
    upload = await receive_upload(request, storage, kind="datasets", max_bytes=settings.max_upload_bytes,
                                  quota_left=left)
    dataset, details = await run_in_threadpool(
        lambda: dataset_service.register_dataset(
            session, user, upload, storage=storage, fmt=upload.fields.get("format") or None, inspector=inspector,
            timeout=INSPECT_TIMEOUT_S,
        )
    )
    return DatasetUploadOut.model_validate({**DatasetOut.model_validate(dataset).model_dump(), "details": details})


def _job_out(job: Job) -> JobOut:
    columns = {c.key: getattr(job, c.key) for c in Job.__table__.columns}
    return JobOut.model_validate({**columns, **job_service.job_view(job)})


@router.post("/api/jobs", status_code=201, response_model=JobOut)
def create_job(
    body: JobCreate,
    session: SessionDep,
    user: UiUserDep,
    settings: SettingsDep,
    enqueue: EnqueueDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JobOut:
    job, _ = job_service.create_job(
        session, user, body, settings=settings, enqueue=enqueue, idempotency_key=idempotency_key
    )
    return _job_out(job)


@router.post("/api/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: uuid.UUID, session: SessionDep, user: UiUserDep) -> JobOut:
    return _job_out(job_service.cancel_job(session, user, job_id))


@router.get("/api/jobs/{job_id}/events")
def job_event_stream(
    job_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    user: UiUserDep,
    config: StreamConfigDep,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
) -> StreamingResponse:
    job = job_service.get_job(session, user, job_id)
    stream = job_events(
        request.app.state.sessions, job.id, last_event_id=last_event_id or 0, max_lifetime_s=config.max_lifetime_s,
        poll_interval_s=config.poll_interval_s, keepalive_s=config.keepalive_s, redis_url=config.redis_url,
    )
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
