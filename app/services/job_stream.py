"""A job's events as a Server-Sent Events stream.

First the stored ``JobEvent`` rows after the client's ``Last-Event-ID`` (replay),
then new ones as they land: woken by Redis pub/sub in full mode (see
:mod:`app.events`), by polling the database otherwise and as a safety net. Changes
of the job's progress/phase are sent as ``progress`` events without an id (they are
not rows). The stream ends after the job reaches a terminal state (``event: end``),
or when the connection has lived ``max_lifetime_s``: the client then reconnects with
``Last-Event-ID`` and loses nothing.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy.orm import Session, sessionmaker

from app.events import JobSubscription
from app.jobs import state
from app.models import Job, JobEvent, JobStatus
from app.services.jobs import eta_seconds, events_after

log = logging.getLogger(__name__)
BATCH = 500


@dataclass(frozen=True)
class Snapshot:
    status: str
    phase: str | None
    progress: float
    message: str | None
    eta_seconds: float | None


def sse(data: dict[str, Any], *, event: str, id: int | None = None) -> str:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def event_payload(ev: JobEvent) -> dict[str, Any]:
    return {
        "id": ev.id,
        "job_id": str(ev.job_id),
        "kind": ev.kind,
        "attempt": ev.attempt,
        "status": ev.status,
        "phase": ev.phase,
        "progress": ev.progress,
        "message": ev.message,
        "created_at": ev.created_at.isoformat(),
    }


def _read(sessions: sessionmaker[Session], job_id: uuid.UUID, last_id: int) -> tuple[Snapshot | None, list[JobEvent]]:
    with sessions() as session:
        # The job first, then its events: an event committed with a terminal status is then
        # always visible to the second read, so the stream never ends before sending it.
        job = session.get(Job, job_id)
        events = events_after(session, job_id, last_id, BATCH)
        if job is None:
            return None, events
        return Snapshot(job.status, job.phase, job.progress, job.message, eta_seconds(job)), events


async def job_events(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    *,
    last_event_id: int,
    max_lifetime_s: float,
    poll_interval_s: float,
    keepalive_s: float,
    redis_url: str | None,
) -> AsyncIterator[str]:
    start = time.monotonic()
    deadline = start + max_lifetime_s
    last_id = last_event_id
    last_progress: Snapshot | None = None
    last_sent = start
    async with AsyncExitStack() as stack:
        sub: JobSubscription | None = None
        if redis_url:
            try:  # subscribe before the first read, so nothing published in between is missed
                sub = await stack.enter_async_context(JobSubscription(redis_url, job_id))
            except Exception as exc:  # noqa: BLE001
                log.warning("no Redis for job %s events (%s); polling the database", job_id, exc)
        yield f"retry: {int(max(poll_interval_s, 1.0) * 1000)}\n\n"
        while True:
            snap, events = await anyio.to_thread.run_sync(_read, sessions, job_id, last_id)
            for ev in events:
                last_id = ev.id
                yield sse(event_payload(ev), event=ev.kind, id=ev.id)
            if events:
                last_sent = time.monotonic()
            if len(events) == BATCH:
                continue  # more to replay before looking at the job's state
            if snap is None:
                yield sse({"job_id": str(job_id), "status": "deleted"}, event="end")
                return
            if snap.status in (JobStatus.RUNNING, JobStatus.CANCELLING) and snap != last_progress:
                last_progress = snap
                yield sse({"job_id": str(job_id), **snap.__dict__}, event="progress")
                last_sent = time.monotonic()
            if snap.status in state.TERMINAL:
                yield sse({"job_id": str(job_id), "status": snap.status}, event="end")
                return
            now = time.monotonic()
            if now >= deadline:
                yield ": maximum connection lifetime reached; reconnect with Last-Event-ID\n\n"
                return
            wait = min(poll_interval_s, deadline - now)
            message: dict[str, Any] | None = None
            if sub is not None:
                try:
                    message = await sub.get(wait)
                except Exception as exc:  # noqa: BLE001  (Redis went away: keep going on the database)
                    log.warning("Redis failed during job %s events (%s); polling the database", job_id, exc)
                    sub = None
                if message is not None and message.get("type", message.get("kind")) == "progress":
                    yield sse({"job_id": str(job_id), **message}, event="progress")
                    last_sent = time.monotonic()
            else:
                await anyio.sleep(wait)
            if time.monotonic() - last_sent >= keepalive_s:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
