"""The job state machine: the only code that changes a job's status, attempt or heartbeat.

    queued ──claim──> running ──succeed──> succeeded
       │                 │ ──fail / abandon──> failed
       │                 └──request_cancel──> cancelling ──confirm_cancelled / abandon──> cancelled
       └──request_cancel──────────────────────────────────────────────────────────────> cancelled

Every transition is one conditional ``UPDATE ... WHERE status IN (...)`` whose
result says whether it applied, so two actors racing (two workers, a worker and a
cancel request, a worker and the reconciler) cannot both win. A worker's writes
after ``claim`` are fenced by the attempt number ``claim`` returned: once the job
is reclaimed by someone else, the old worker's progress and results are refused.

A queued job is cancelled at once rather than passing through ``cancelling``: no
worker holds it, so nobody would ever confirm the cancellation.

Functions execute on the caller's session and never commit: the caller decides the
transaction (a worker commits after each call; the API commits with the request).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import ColumnElement, case, func, update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import Job, JobEvent, JobStatus

QUEUED, RUNNING, CANCELLING = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# The legal moves, for documentation and tests: each function below performs a subset.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({RUNNING, SUCCEEDED, FAILED, CANCELLING}),  # running -> running: a stale job reclaimed
    CANCELLING: frozenset({CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

WORKER_LOST = "worker_lost"


def _update(
    session: Session, job_id: uuid.UUID, where: list[ColumnElement[bool]], values: dict[str, Any], *returning: Any
) -> Any:
    """Run one conditional UPDATE on a job; return the RETURNING row, or None if no row matched."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, *where)
        .values(values)
        .returning(*returning)
        .execution_options(synchronize_session="fetch")  # keep any loaded Job object in step
    )
    return session.execute(stmt).one_or_none()


def _event(session: Session, job_id: uuid.UUID, attempt: int, status: JobStatus, message: str | None = None) -> None:
    session.add(JobEvent(job_id=job_id, attempt=attempt, kind="status", status=status, message=message))


def claim(
    session: Session,
    job_id: uuid.UUID,
    *,
    stale_after: dt.timedelta,
    max_attempts: int | None = None,
    now: dt.datetime | None = None,
) -> int | None:
    """Take a queued job, or a running one whose worker stopped heartbeating.

    Returns the new attempt number (the fence for every later write), or None when
    the job is not claimable (someone else has it, it finished, it was cancelled, or
    it ran out of attempts)."""
    now = now or utcnow()
    where = [(Job.status == QUEUED) | ((Job.status == RUNNING) & (Job.heartbeat_at < now - stale_after))]
    if max_attempts is not None:
        where.append(Job.attempt < max_attempts)
    row = _update(
        session,
        job_id,
        where,
        {
            "status": RUNNING,
            "attempt": Job.attempt + 1,
            "heartbeat_at": now,
            "started_at": func.coalesce(Job.started_at, now),
            "progress": 0.0,
            "phase": None,
            "message": None,
        },
        Job.attempt,
    )
    if row is None:
        return None
    _event(session, job_id, row.attempt, RUNNING)
    return int(row.attempt)


def heartbeat(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    *,
    progress: float | None = None,
    phase: str | None = None,
    message: str | None = None,
    now: dt.datetime | None = None,
) -> JobStatus | None:
    """Record liveness (and progress, if given) for the attempt that holds the job.

    Returns the job's status, RUNNING or CANCELLING (the worker should stop), or None
    when this attempt no longer holds the job and must stop without writing more."""
    values: dict[str, Any] = {"heartbeat_at": now or utcnow()}
    if progress is not None:
        values["progress"] = min(max(progress, 0.0), 1.0)
    if phase is not None:
        values["phase"] = phase
    if message is not None:
        values["message"] = message
    row = _update(session, job_id, [Job.status.in_([RUNNING, CANCELLING]), Job.attempt == attempt], values, Job.status)
    return None if row is None else JobStatus(row.status)


def succeed(
    session: Session, job_id: uuid.UUID, attempt: int, *, metrics: dict[str, Any], now: dt.datetime | None = None
) -> bool:
    """running -> succeeded. Refused once a cancel was requested: cancellation wins."""
    now = now or utcnow()
    row = _update(
        session,
        job_id,
        [Job.status == RUNNING, Job.attempt == attempt],
        {"status": SUCCEEDED, "progress": 1.0, "metrics": metrics, "finished_at": now, "heartbeat_at": now},
        Job.id,
    )
    if row is not None:
        _event(session, job_id, attempt, SUCCEEDED)
    return row is not None


def fail(
    session: Session, job_id: uuid.UUID, attempt: int, *, code: str, message: str, now: dt.datetime | None = None
) -> bool:
    """running -> failed, with an error code the API shows as the problem type."""
    now = now or utcnow()
    row = _update(
        session,
        job_id,
        [Job.status == RUNNING, Job.attempt == attempt],
        {"status": FAILED, "error_code": code, "error_message": message, "finished_at": now, "heartbeat_at": now},
        Job.id,
    )
    if row is not None:
        _event(session, job_id, attempt, FAILED, message)
    return row is not None


def request_cancel(session: Session, job_id: uuid.UUID, *, now: dt.datetime | None = None) -> JobStatus | None:
    """queued -> cancelled, running -> cancelling. Returns the new status, or None if the
    job was already finished or cancelling."""
    now = now or utcnow()
    row = _update(
        session,
        job_id,
        [Job.status.in_([QUEUED, RUNNING])],
        {
            "status": case((Job.status == QUEUED, CANCELLED.value), else_=CANCELLING.value),
            "finished_at": case((Job.status == QUEUED, now), else_=Job.finished_at),
        },
        Job.status,
        Job.attempt,
    )
    if row is None:
        return None
    status = JobStatus(row.status)
    _event(session, job_id, row.attempt, status)
    return status


def confirm_cancelled(session: Session, job_id: uuid.UUID, attempt: int, *, now: dt.datetime | None = None) -> bool:
    """cancelling -> cancelled, by the worker once its child process is gone."""
    now = now or utcnow()
    row = _update(
        session,
        job_id,
        [Job.status == CANCELLING, Job.attempt == attempt],
        {"status": CANCELLED, "finished_at": now, "heartbeat_at": now},
        Job.id,
    )
    if row is not None:
        _event(session, job_id, attempt, CANCELLED)
    return row is not None


def abandon(
    session: Session, job_id: uuid.UUID, attempt: int, *, stale_after: dt.timedelta, now: dt.datetime | None = None
) -> JobStatus | None:
    """For the reconciler, when a job's worker is gone and no retry is left (or a cancel
    was pending): running -> failed (worker_lost), cancelling -> cancelled.

    Fenced by both the attempt the reconciler saw and the heartbeat still being stale,
    so a worker that was merely slow and heartbeats in between keeps its job."""
    now = now or utcnow()
    row = _update(
        session,
        job_id,
        [Job.status.in_([RUNNING, CANCELLING]), Job.attempt == attempt, Job.heartbeat_at < now - stale_after],
        {
            "status": case((Job.status == RUNNING, FAILED.value), else_=CANCELLED.value),
            "error_code": case((Job.status == RUNNING, WORKER_LOST), else_=Job.error_code),
            "error_message": case(
                (Job.status == RUNNING, "the worker stopped responding and no retry is left"), else_=Job.error_message
            ),
            "finished_at": now,
        },
        Job.status,
    )
    if row is None:
        return None
    status = JobStatus(row.status)
    _event(session, job_id, attempt, status, "worker lost")
    return status
