"""``/api/v1/jobs``: create, list, show, cancel, delete, stream events, download artifacts."""

from __future__ import annotations

import base64
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from app.api.deps import API_PREFIX, EnqueueDep, SessionDep, SettingsDep, StorageDep, StreamConfigDep, UserDep
from app.models import Artifact, Job, JobStatus
from app.problems import problem_responses
from app.schemas.jobs import ArtifactList, ArtifactOut, JobCreate, JobDetail, JobOut, JobPage, LayerRankOut
from app.services import jobs as service
from app.services.job_stream import job_events
from app.services.pagination import Cursor, split

router = APIRouter(prefix=f"{API_PREFIX}/jobs", tags=["jobs"])


def _artifact_out(request: Request, artifact: Artifact) -> ArtifactOut:
    url = request.url_for("download_artifact", job_id=str(artifact.job_id), name=artifact.name)
    return ArtifactOut.model_validate({**_columns(artifact), "url": url.path})


def _columns(obj: object) -> dict[str, object]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}  # type: ignore[attr-defined]


def _etags(header: str) -> set[str]:
    return {t.strip().removeprefix("W/").strip('"') for t in header.split(",")}


def _job_out(job: Job) -> JobOut:
    return JobOut.model_validate({**_columns(job), **service.job_view(job)})


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Start a compression job",
    description=(
        "Validates the request, checks your quotas, stores the job and queues it once stored. Send an "
        "`Idempotency-Key` header to make retries safe: the same key returns the job it first created "
        "(200 instead of 201)."
    ),
    responses={
        200: {"model": JobOut, "description": "Replay: the job this Idempotency-Key already created"},
        **problem_responses(401, 404, 409, 422, 429),
    },
)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    user: UserDep,
    settings: SettingsDep,
    enqueue: EnqueueDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JobOut:
    job, created = service.create_job(
        session, user, body, settings=settings, enqueue=enqueue, idempotency_key=idempotency_key
    )
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return _job_out(job)


@router.get("", response_model=JobPage, summary="List your jobs, newest first", responses=problem_responses(401, 422))
def list_jobs(
    session: SessionDep,
    user: UserDep,
    limit: Annotated[int, Query(ge=1, le=100, description="page size")] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    status: Annotated[list[JobStatus] | None, Query(description="only jobs in these states (repeatable)")] = None,
) -> JobPage:
    rows = service.JobRepository(session, user).list(
        limit, Cursor.decode(cursor) if cursor else None, [s.value for s in status or []]
    )
    items, next_cursor = split(rows, limit)
    return JobPage(items=[_job_out(j) for j in items], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    summary="Show a job: status, progress, ETA, metrics, per-layer ranks, error",
    responses=problem_responses(401, 404),
)
def get_job(job_id: uuid.UUID, request: Request, session: SessionDep, user: UserDep) -> JobDetail:
    job = service.get_job(session, user, job_id)
    repo = service.JobRepository(session, user)
    return JobDetail.model_validate(
        {
            **_columns(job),
            **service.job_view(job),
            "layers": [LayerRankOut.model_validate(r) for r in repo.layer_ranks(job.id)],
            "artifacts": [_artifact_out(request, a) for a in repo.artifacts(job.id)],
        }
    )


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    description="A queued job is cancelled at once; a running one moves to `cancelling` until its worker stops.",
    responses=problem_responses(401, 404, 409),
)
def cancel_job(job_id: uuid.UUID, session: SessionDep, user: UserDep) -> JobOut:
    return _job_out(service.cancel_job(session, user, job_id))


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Delete a finished job and its artifacts",
    description="Refused (409) while the job is queued, running or cancelling: cancel it first.",
    responses=problem_responses(401, 404, 409),
)
def delete_job(job_id: uuid.UUID, session: SessionDep, user: UserDep, storage: StorageDep) -> Response:
    service.delete_job(session, user, job_id, storage)
    return Response(status_code=204)


@router.get(
    "/{job_id}/events",
    summary="Stream a job's events (Server-Sent Events)",
    description=(
        "Replays the job's stored events after `Last-Event-ID`, then sends new ones live, plus `progress` "
        "events as the job advances. Ends with `event: end` once the job is finished, or after the maximum "
        "connection lifetime: reconnect with `Last-Event-ID` to resume."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **problem_responses(401, 404)},
)
def stream_events(
    job_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    user: UserDep,
    config: StreamConfigDep,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
    after: Annotated[int | None, Query(ge=0, description="like Last-Event-ID, for clients that cannot set it")] = None,
) -> StreamingResponse:
    job = service.get_job(session, user, job_id)
    stream = job_events(
        request.app.state.sessions,
        job.id,
        last_event_id=last_event_id if last_event_id is not None else (after or 0),
        max_lifetime_s=config.max_lifetime_s,
        poll_interval_s=config.poll_interval_s,
        keepalive_s=config.keepalive_s,
        redis_url=config.redis_url,
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactList,
    summary="List a job's output files with sizes and SHA-256",
    responses=problem_responses(401, 404),
)
def list_artifacts(job_id: uuid.UUID, request: Request, session: SessionDep, user: UserDep) -> ArtifactList:
    job = service.get_job(session, user, job_id)
    items = service.JobRepository(session, user).artifacts(job.id)
    return ArtifactList(items=[_artifact_out(request, a) for a in items])


@router.get(
    "/{job_id}/artifacts/{name}",
    name="download_artifact",
    summary="Download an output file",
    description="Streamed; `ETag` and `Digest` carry its SHA-256, so a client can verify the download.",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        304: {"description": "If-None-Match matched the ETag"},
        **problem_responses(401, 404),
    },
)
def download_artifact(
    job_id: uuid.UUID,
    name: str,
    session: SessionDep,
    user: UserDep,
    storage: StorageDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    artifact = service.get_artifact(session, user, job_id, name)
    b64 = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    headers = {
        "ETag": f'"{artifact.sha256}"',
        "Digest": f"sha-256={b64}",  # RFC 3230
        "Repr-Digest": f"sha-256=:{b64}:",  # RFC 9530
        "Cache-Control": "private, max-age=0, must-revalidate",
    }
    if if_none_match and artifact.sha256 in _etags(if_none_match):
        return Response(status_code=304, headers=headers)
    return storage.download_response(artifact.storage_key, filename=artifact.name, headers=headers)
