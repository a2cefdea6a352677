"""Tables. Every user-owned row carries ``owner_id``; services always filter on it.

Statuses are plain strings with a CHECK constraint (not database enums) so that
adding a state is a one-line migration on both SQLite and Postgres.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, utcnow

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class UploadStatus(StrEnum):
    """Lifecycle of an uploaded model or data set: checked in the sandbox before use."""

    UPLOADED = "uploaded"
    INSPECTING = "inspecting"
    READY = "ready"
    REJECTED = "rejected"


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, default=uuid.uuid4)


def _created() -> Mapped[dt.datetime]:
    return mapped_column(default=utcnow)


def _owner() -> Mapped[uuid.UUID]:
    return mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = _uuid_pk()
    email: Mapped[str] = mapped_column(String(320), unique=True)
    created_at: Mapped[dt.datetime] = _created()
    disabled_at: Mapped[dt.datetime | None]

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="user", passive_deletes=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _owner()
    name: Mapped[str] = mapped_column(String(100))
    # First characters of the token, shown in listings so a user can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    # HMAC-SHA256(secret_key, token), hex: the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]]
    created_at: Mapped[dt.datetime] = _created()
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]

    user: Mapped[User] = relationship(back_populates="api_keys")


class ModelFile(Base):
    """An uploaded TorchScript archive (table ``models``)."""

    __tablename__ = "models"
    __table_args__ = (CheckConstraint(_in("status", UploadStatus), name="status"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    owner_id: Mapped[uuid.UUID] = _owner()
    # The client's file name, for display only: storage_key is made by the server.
    name: Mapped[str] = mapped_column(String(255))
    storage_key: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    input_spec: Mapped[str | None] = mapped_column(Text)
    inventory: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(String(16), default=UploadStatus.UPLOADED)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = _created()


class Dataset(Base):
    """Calibration / fine-tuning data: ``.npz``, safetensors or an image-folder zip."""

    __tablename__ = "datasets"
    __table_args__ = (CheckConstraint(_in("status", UploadStatus), name="status"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    owner_id: Mapped[uuid.UUID] = _owner()
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    storage_key: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16), default=UploadStatus.UPLOADED)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = _created()


class Job(Base):
    """One compression run. ``id`` is also the Celery task id. Only app.jobs.state
    changes ``status``, ``attempt`` and ``heartbeat_at``."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JobStatus), name="status"),
        # Retrying a POST with the same key returns the first job instead of a second one.
        UniqueConstraint("owner_id", "idempotency_key"),
        # Owners' job listings, newest first.
        Index("ix_jobs_owner_id_created_at", "owner_id", "created_at"),
        # The reconciler's scan: queued jobs nobody claimed, running jobs with stale heartbeats.
        Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), index=True)
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    input_spec: Mapped[str] = mapped_column(Text)
    budget: Mapped[str | None] = mapped_column(String(200))
    method: Mapped[str | None] = mapped_column(String(32))
    form: Mapped[str] = mapped_column(String(32), default="tucker2")
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    attempt: Mapped[int] = mapped_column(default=0)
    progress: Mapped[float] = mapped_column(default=0.0)
    phase: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    heartbeat_at: Mapped[dt.datetime | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None]

    created_at: Mapped[dt.datetime] = _created()
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    events: Mapped[list[JobEvent]] = relationship(passive_deletes=True, order_by="JobEvent.id")
    artifacts: Mapped[list[Artifact]] = relationship(passive_deletes=True)
    layer_ranks: Mapped[list[LayerRank]] = relationship(passive_deletes=True)


class JobEvent(Base):
    """Append-only log of a job: state changes and notable progress. The integer id
    orders events and serves as the SSE ``Last-Event-ID``."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(16))
    phase: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float | None]
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = _created()


class Artifact(Base):
    """A file a job produced (``model.pt``, ``model.pt2``, ``report.json``)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = _created()


class LayerRank(Base):
    """The rank chosen for one layer of a finished job, with its cost before and after."""

    __tablename__ = "layer_ranks"
    __table_args__ = (UniqueConstraint("job_id", "layer"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    layer: Mapped[str] = mapped_column(String(255))
    form: Mapped[str] = mapped_column(String(32))
    ranks: Mapped[list[int]]
    macs_before: Mapped[int] = mapped_column(BigInteger)
    macs_after: Mapped[int] = mapped_column(BigInteger)
