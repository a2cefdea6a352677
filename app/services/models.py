"""Uploaded models: register after the pre-check and the sandboxed inspection, list, delete."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from app.models import Job, ModelFile, UploadStatus, User
from app.problems import Conflict, NotFound, Unprocessable
from app.services.pagination import Cursor, page
from app.services.sandbox import InspectionError, ModelInspector
from app.services.tx import after_commit, on_rollback
from app.services.uploads import Upload, safe_filename
from app.storage import Storage


class ModelRepository:
    """Every query on models, always scoped to one owner."""

    def __init__(self, session: Session, owner: User) -> None:
        self.session = session
        self.owner = owner

    def get(self, model_id: uuid.UUID) -> ModelFile | None:
        return self.session.scalars(
            select(ModelFile).where(ModelFile.id == model_id, ModelFile.owner_id == self.owner.id)
        ).one_or_none()

    def list(self, limit: int, cursor: Cursor | None) -> list[ModelFile]:
        q = select(ModelFile).where(ModelFile.owner_id == self.owner.id)
        return page(self.session, q, ModelFile, limit, cursor)

    def in_use(self, model_id: uuid.UUID) -> bool:
        return bool(self.session.scalar(select(exists().where(Job.model_id == model_id))))


def get_model(session: Session, owner: User, model_id: uuid.UUID) -> ModelFile:
    model = ModelRepository(session, owner).get(model_id)
    if model is None:
        raise NotFound(f"no model {model_id} belongs to you; list yours with GET /api/v1/models", field="model_id")
    return model


def inspect(inspector: ModelInspector, path: Path, input_spec: str, timeout: float) -> dict[str, Any]:
    """Run the (sandboxed) inspector; any failure it explains becomes a 422 naming its code."""
    try:
        return inspector(path, input_spec, timeout)
    except InspectionError as exc:
        raise Unprocessable(exc.message, code=exc.code, field=_field_for(exc.code)) from None
    except Exception as exc:  # the worker's sandbox may raise its own types; use their code when they carry one
        code = getattr(exc, "code", None)
        if isinstance(code, str):
            message = getattr(exc, "message", None) or str(exc)
            raise Unprocessable(message, code=code, field=_field_for(code)) from None
        raise


def _field_for(code: str) -> str:
    return "input_spec" if code == "input_spec_mismatch" else "file"


def register_model(
    session: Session,
    owner: User,
    upload: Upload,
    *,
    storage: Storage,
    input_spec: str | None,
    inspector: ModelInspector,
    timeout: float,
) -> ModelFile:
    """Check a stored upload and record it. On any failure the stored file is deleted."""
    from compression.archive import precheck_archive
    from compression.errors import ArchiveError, InputSpecError
    from compression.input_spec import InputSpec

    key = upload.stored.key
    name = safe_filename(upload.filename or upload.fields.get("name"), "model.pt")
    try:
        spec = None
        if input_spec:
            try:
                spec = InputSpec.parse(input_spec).to_string()
            except InputSpecError as exc:
                raise Unprocessable(exc.message, code=exc.code, field="input_spec") from None
        with storage.local_copy(key) as path:
            try:
                precheck_archive(path)
            except ArchiveError as exc:
                # The archive's temporary name means nothing to the user: show theirs.
                message = exc.message.replace(path.name, name)
                raise Unprocessable(message, code=exc.code, field="file") from None
            inventory = inspect(inspector, path, spec, timeout) if spec else None
        model = ModelFile(
            owner_id=owner.id,
            name=name,
            storage_key=key,
            sha256=upload.stored.sha256,
            size_bytes=upload.stored.size,
            input_spec=spec,
            inventory=inventory,
            status=UploadStatus.READY if inventory is not None else UploadStatus.UPLOADED,
        )
        session.add(model)
        session.flush()
    except BaseException:
        storage.delete(key)
        raise
    on_rollback(session, lambda: storage.delete(key))
    return model


def delete_model(session: Session, owner: User, model_id: uuid.UUID, storage: Storage) -> None:
    repo = ModelRepository(session, owner)
    model = get_model(session, owner, model_id)
    if repo.in_use(model.id):
        raise Conflict(
            f"model {model_id} is used by jobs; delete those jobs first (DELETE /api/v1/jobs/{{id}})",
            code="model_in_use",
        )
    key = model.storage_key
    session.delete(model)
    session.flush()
    after_commit(session, lambda: storage.delete(key))
