"""Sending jobs to the workers. The API calls ``enqueue_job`` after the request's
commit: a worker that receives the message must find the job row."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from app.settings import get_settings
from worker.config import QUEUES, default_queue

if TYPE_CHECKING:
    from celery import Celery

    from app.models import Job

RUN_JOB = "tensortrim.run_job"
GPU_DEVICES = frozenset({"cuda", "gpu"})


def queue_for(job: Job) -> str:
    """``gpu`` when the job asks for CUDA (``options.device``), ``cpu`` when it asks for
    the CPU, else the deployment's default queue."""
    options: dict[str, Any] = job.options or {}
    device = str(options.get("device", "")).lower()
    if device in GPU_DEVICES or device.startswith("cuda:"):
        return "gpu"
    if device == "cpu":
        return "cpu"
    return default_queue(get_settings().mode)


def enqueue_job(job_id: str | uuid.UUID, queue: str | None = None, *, app: Celery | None = None) -> None:
    """Send ``tensortrim.run_job(job_id)`` with the job id as task id. Sending twice is
    harmless: only one worker can claim the job."""
    queue = queue or default_queue(get_settings().mode)
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {QUEUES}")
    if app is None:
        from worker.celery_app import app
    app.send_task(RUN_JOB, args=[str(job_id)], task_id=str(job_id), queue=queue)
