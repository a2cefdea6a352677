"""Compression jobs: create (idempotent, quota-checked, enqueued after commit), read,
cancel, delete. Status changes go through :mod:`app.jobs.state` only."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs import state
from app.models import Artifact, Job, JobEvent, JobStatus, LayerRank, User
from app.problems import Conflict, NotFound, Unprocessable
from app.schemas.jobs import JobCreate
from app.services import quota
from app.services.budget_check import check_budget_reachable, rebuild_inventory
from app.services.datasets import get_dataset
from app.services.models import get_model
from app.services.pagination import Cursor, page
from app.services.tx import after_commit
from app.settings import Settings
from app.storage import Storage

MAX_IDEMPOTENCY_KEY = 200


class JobRepository:
    """Every query on jobs and what hangs off them, always scoped to one owner."""

    def __init__(self, session: Session, owner: User) -> None:
        self.session = session
        self.owner = owner

    def get(self, job_id: uuid.UUID) -> Job | None:
        return self.session.scalars(select(Job).where(Job.id == job_id, Job.owner_id == self.owner.id)).one_or_none()

    def by_idempotency_key(self, key: str) -> Job | None:
        return self.session.scalars(
            select(Job).where(Job.owner_id == self.owner.id, Job.idempotency_key == key)
        ).one_or_none()

    def list(self, limit: int, cursor: Cursor | None, statuses: Sequence[str]) -> list[Job]:
        q = select(Job).where(Job.owner_id == self.owner.id)
        if statuses:
            q = q.where(Job.status.in_(statuses))
        return page(self.session, q, Job, limit, cursor)

    def artifacts(self, job_id: uuid.UUID) -> list[Artifact]:
        return list(self.session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))

    def layer_ranks(self, job_id: uuid.UUID) -> list[LayerRank]:
        return list(self.session.scalars(select(LayerRank).where(LayerRank.job_id == job_id).order_by(LayerRank.id)))

    def delete_finished(self, job_id: uuid.UUID) -> bool:
        """One conditional DELETE: a job a worker might still write to is never removed."""
        result = self.session.execute(
            delete(Job)
            .where(Job.id == job_id, Job.owner_id == self.owner.id, Job.status.in_(state.TERMINAL))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def events_after(session: Session, job_id: uuid.UUID, last_id: int, limit: int = 500) -> list[JobEvent]:
    """A job's events after ``last_id``, oldest first. The caller has checked ownership."""
    return list(
        session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > last_id).order_by(JobEvent.id).limit(limit)
        )
    )


def _insert_for(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def get_job(session: Session, owner: User, job_id: uuid.UUID) -> Job:
    job = JobRepository(session, owner).get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id} belongs to you; list yours with GET /api/v1/jobs")
    return job


def _same_request(job: Job, body: JobCreate, input_spec: str) -> bool:
    return (
        job.model_id == body.model_id
        and job.dataset_id == body.dataset_id
        and job.input_spec == input_spec
        and job.budget == body.budget
        and job.method == body.chosen_method()
        and job.form == body.form
        and (job.options or {}) == body.options()
    )


def check_manual_ranks(body: JobCreate, inventory: dict[str, Any] | None) -> None:
    """422 on the ``ranks`` field when method and ranks disagree or, with the model's layer
    table at hand, when a name or a rank is wrong (the engine's own check, same message)."""
    method = body.chosen_method()
    if method == "manual" and not body.ranks:
        raise Unprocessable("method 'manual' needs ranks: {layer name: [ranks] or a ratio in (0, 1]}, "
                            "names as the model's layer table lists them", field="ranks")
    if body.ranks is not None and method != "manual":
        raise Unprocessable(f"ranks are used only by method 'manual', not {method!r}: leave the method out "
                            "or drop the ranks", field="ranks")
    if method == "manual" and body.sweep:
        raise Unprocessable("a sweep varies the budget, which manual ranks ignore: drop the sweep or choose "
                            "another method", field="sweep")
    if method != "manual" or not inventory:
        return
    from compression.errors import RankError
    from compression.ranks.base import SelectionContext
    from compression.ranks.manual import parse_entry

    inv = rebuild_inventory(inventory)
    if inv is None:
        return  # the worker checks against the real graph
    names = {layer.name: layer for layer in inv.layers}
    ctx = SelectionContext(None, inv, None, None, form=body.form)  # type: ignore[arg-type]  # only form is read
    for name, value in (body.ranks or {}).items():
        layer = names.get(name)
        if layer is None or not layer.decomposable:
            valid = ", ".join(x.name for x in inv.decomposable)
            why = "is not in the model" if layer is None else f"cannot be decomposed ({layer.skip_reason})"
            raise Unprocessable(f"layer {name!r} {why}; decomposable layers: {valid}", field="ranks")
        try:
            parse_entry(ctx, layer, value)
        except RankError as exc:
            raise Unprocessable(exc.message, code=exc.code, field="ranks") from None


def _replay(job: Job, body: JobCreate, input_spec: str, key: str) -> Job:
    if not _same_request(job, body, input_spec):
        raise Conflict(
            f"Idempotency-Key {key!r} was already used for job {job.id} with different parameters; "
            "use a new key for a new job",
            code="idempotency_key_reused",
            field="Idempotency-Key",
        )
    return job


def create_job(
    session: Session,
    owner: User,
    body: JobCreate,
    *,
    settings: Settings,
    enqueue: Callable[[str, str | None], object],
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Create and (after the commit) enqueue a job. Returns ``(job, created)``: a retried
    request with the same ``Idempotency-Key`` gets the first job back, ``created=False``."""
    repo = JobRepository(session, owner)
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise Unprocessable(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", field="Idempotency-Key"
        )
    model = get_model(session, owner, body.model_id)
    input_spec = body.input_spec or model.input_spec
    if not input_spec:
        raise Unprocessable(
            "input_spec is required: TorchScript does not record input shapes, and none was given when the model "
            "was uploaded. Give one sample's shape without the batch dimension, e.g. '3,224,224'",
            code="input_spec_required",
            field="input_spec",
        )
    if idempotency_key is not None and (existing := repo.by_idempotency_key(idempotency_key)) is not None:
        return _replay(existing, body, input_spec, idempotency_key), False
    if body.dataset_id is not None:
        get_dataset(session, owner, body.dataset_id)
    check_manual_ranks(body, model.inventory if input_spec == model.input_spec else None)
    if input_spec == model.input_spec:  # the stored layer table was measured at this shape
        check_budget_reachable(model.inventory, body.budget, body.form)
        for extra in body.sweep or []:
            check_budget_reachable(model.inventory, extra, body.form, field="sweep")
    quota.check_job_quota(session, owner.id, settings)

    values = {
        "id": uuid.uuid4(),
        "owner_id": owner.id,
        "model_id": model.id,
        "dataset_id": body.dataset_id,
        "input_spec": input_spec,
        "budget": body.budget,
        "method": body.chosen_method(),
        "form": body.form,
        "options": body.options(),
        "idempotency_key": idempotency_key,
    }
    # ON CONFLICT DO NOTHING (Postgres and SQLite): a concurrent twin request with the same
    # key waits for the first to commit and then finds its job, instead of failing the request.
    insert = _insert_for(session)(Job).values(values).on_conflict_do_nothing()
    if session.execute(insert.returning(Job.id)).first() is None:
        existing = repo.by_idempotency_key(idempotency_key) if idempotency_key is not None else None
        if existing is None:
            raise Conflict("the job could not be created because of a concurrent change; retry", code="conflict")
        return _replay(existing, body, input_spec, idempotency_key), False  # type: ignore[arg-type]
    job = session.get_one(Job, values["id"])
    session.add(JobEvent(job_id=job.id, attempt=0, kind="status", status=JobStatus.QUEUED))
    session.flush()
    job_id = str(job.id)
    after_commit(session, lambda: enqueue(job_id, None))
    return job, True


def cancel_job(session: Session, owner: User, job_id: uuid.UUID) -> Job:
    job = get_job(session, owner, job_id)
    new = state.request_cancel(session, job.id)
    if new is None and job.status in state.TERMINAL:
        raise Conflict(f"job {job_id} already finished ({job.status}); nothing to cancel", code="job_finished")
    session.refresh(job)
    return job


def delete_job(session: Session, owner: User, job_id: uuid.UUID, storage: Storage) -> None:
    repo = JobRepository(session, owner)
    job = get_job(session, owner, job_id)
    keys = [a.storage_key for a in repo.artifacts(job.id)]
    if not repo.delete_finished(job.id):
        raise Conflict(
            f"job {job_id} is {job.status}: cancel it first (POST /api/v1/jobs/{job_id}/cancel), "
            "then delete it once it is cancelled",
            code="job_not_finished",
        )
    session.expunge(job)

    def remove_files() -> None:
        for key in keys:
            storage.delete(key)

    after_commit(session, remove_files)


def get_artifact(session: Session, owner: User, job_id: uuid.UUID, name: str) -> Artifact:
    job = get_job(session, owner, job_id)
    artifact = session.scalars(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name)).one_or_none()
    if artifact is None:
        names = ", ".join(a.name for a in JobRepository(session, owner).artifacts(job.id)) or "none yet"
        raise NotFound(f"job {job_id} has no artifact {name!r} (it has: {names})")
    return artifact


def eta_seconds(job: Job, now: dt.datetime | None = None) -> float | None:
    """Linear extrapolation from progress so far; None when there is nothing to go on."""
    if job.status != JobStatus.RUNNING or job.started_at is None or not 0.01 <= job.progress < 1.0:
        return None
    elapsed = ((now or utcnow()) - job.started_at).total_seconds()
    return round(max(elapsed, 0.0) * (1.0 - job.progress) / job.progress, 1)


def job_view(job: Job) -> dict[str, Any]:
    """The fields of JobOut that are not plain columns."""
    error = {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
    return {"eta_seconds": eta_seconds(job), "error": error}
