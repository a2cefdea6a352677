"""Per-owner quotas: bytes stored (models + data sets + job artifacts) and jobs in flight."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Artifact, Dataset, Job, JobStatus, ModelFile, User
from app.problems import QuotaExceeded
from app.settings import Settings

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)
# Retry-After on quota 429s: a job slot frees when a job ends; storage only when the user deletes.
JOB_RETRY_AFTER_S = 30
STORAGE_RETRY_AFTER_S = 300


def storage_used(session: Session, owner_id: uuid.UUID) -> int:
    models = select(func.coalesce(func.sum(ModelFile.size_bytes), 0)).where(ModelFile.owner_id == owner_id)
    datasets = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.owner_id == owner_id)
    artifacts = (
        select(func.coalesce(func.sum(Artifact.size_bytes), 0)).join(Job).where(Job.owner_id == owner_id)
    )
    return sum(int(session.scalar(q) or 0) for q in (models, datasets, artifacts))


def storage_left(session: Session, owner_id: uuid.UUID, settings: Settings) -> int:
    return settings.quota_storage_bytes - storage_used(session, owner_id)


def active_jobs(session: Session, owner_id: uuid.UUID) -> int:
    return int(session.scalar(select(func.count()).where(Job.owner_id == owner_id, Job.status.in_(ACTIVE))) or 0)


def lock_owner(session: Session, owner_id: uuid.UUID) -> None:
    """Serialise one owner's quota checks (Postgres row lock; SQLite serialises writers anyway),
    so two concurrent requests cannot both take the last slot."""
    session.execute(select(User.id).where(User.id == owner_id).with_for_update())


def check_job_quota(session: Session, owner_id: uuid.UUID, settings: Settings) -> None:
    lock_owner(session, owner_id)
    running = active_jobs(session, owner_id)
    if running >= settings.quota_concurrent_jobs:
        raise QuotaExceeded(
            f"you already have {running} unfinished jobs (limit {settings.quota_concurrent_jobs}); "
            "wait for one to finish or cancel one (POST /api/v1/jobs/{id}/cancel), then retry",
            code="too_many_jobs",
            headers={"Retry-After": str(JOB_RETRY_AFTER_S)},
        )
    used = storage_used(session, owner_id)
    if used >= settings.quota_storage_bytes:
        raise QuotaExceeded(
            f"your storage quota is used up ({used} of {settings.quota_storage_bytes} bytes), and a job's results "
            "need room: delete models, data sets or finished jobs you no longer need, then retry",
            code="storage_quota_exceeded",
            headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)},
        )
