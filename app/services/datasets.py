"""Data sets: register after the sandboxed format check, list, delete."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from app.models import Dataset, Job, UploadStatus, User
from app.problems import Conflict, NotFound, Unprocessable
from app.services.pagination import Cursor, page
from app.services.sandbox import DatasetInspector, InspectionError
from app.services.tx import after_commit, on_rollback
from app.services.uploads import Upload, safe_filename
from app.storage import Storage

FORMATS = ("npz", "image_folder")


class DatasetRepository:
    """Every query on data sets, always scoped to one owner."""

    def __init__(self, session: Session, owner: User) -> None:
        self.session = session
        self.owner = owner

    def get(self, dataset_id: uuid.UUID) -> Dataset | None:
        return self.session.scalars(
            select(Dataset).where(Dataset.id == dataset_id, Dataset.owner_id == self.owner.id)
        ).one_or_none()

    def list(self, limit: int, cursor: Cursor | None) -> list[Dataset]:
        return page(self.session, select(Dataset).where(Dataset.owner_id == self.owner.id), Dataset, limit, cursor)

    def in_use(self, dataset_id: uuid.UUID) -> bool:
        return bool(self.session.scalar(select(exists().where(Job.dataset_id == dataset_id))))


def get_dataset(session: Session, owner: User, dataset_id: uuid.UUID) -> Dataset:
    dataset = DatasetRepository(session, owner).get(dataset_id)
    if dataset is None:
        raise NotFound(
            f"no data set {dataset_id} belongs to you; list yours with GET /api/v1/datasets", field="dataset_id"
        )
    return dataset


def register_dataset(
    session: Session,
    owner: User,
    upload: Upload,
    *,
    storage: Storage,
    fmt: str | None,
    inspector: DatasetInspector,
    timeout: float,
) -> tuple[Dataset, dict[str, Any]]:
    """Check a stored upload in a child process and record it; the file is deleted on failure.
    Returns the row and what the check found (arrays or classes)."""
    key = upload.stored.key
    try:
        if fmt is not None and fmt not in FORMATS:
            raise Unprocessable(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}", field="format")
        try:
            with storage.local_copy(key) as path:
                info = inspector(path, fmt, timeout)
        except InspectionError as exc:
            raise Unprocessable(exc.message, code=exc.code, field="file") from None
        detected = str(info.get("format", fmt or "npz"))
        default_name = "data.npz" if detected == "npz" else "images.zip"
        dataset = Dataset(
            owner_id=owner.id,
            name=safe_filename(upload.filename or upload.fields.get("name"), default_name),
            format=detected,
            storage_key=key,
            sha256=upload.stored.sha256,
            size_bytes=upload.stored.size,
            num_samples=info.get("num_samples"),
            status=UploadStatus.READY,
        )
        session.add(dataset)
        session.flush()
    except BaseException:
        storage.delete(key)
        raise
    on_rollback(session, lambda: storage.delete(key))
    details = {k: v for k, v in info.items() if k not in ("format", "num_samples")}
    return dataset, details


def delete_dataset(session: Session, owner: User, dataset_id: uuid.UUID, storage: Storage) -> None:
    repo = DatasetRepository(session, owner)
    dataset = get_dataset(session, owner, dataset_id)
    if repo.in_use(dataset.id):
        raise Conflict(
            f"data set {dataset_id} is used by jobs; delete those jobs first (DELETE /api/v1/jobs/{{id}})",
            code="dataset_in_use",
        )
    key = dataset.storage_key
    session.delete(dataset)
    session.flush()
    after_commit(session, lambda: storage.delete(key))
