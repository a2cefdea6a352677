"""``/api/v1/datasets``: upload, list, show and delete calibration / fine-tuning data."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    API_PREFIX,
    INSPECT_TIMEOUT_S,
    DatasetInspectorDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    UserDep,
)
from app.models import Dataset
from app.problems import problem_responses
from app.schemas.datasets import DatasetOut, DatasetPage, DatasetUploadOut
from app.services import datasets as service
from app.services import quota
from app.services.pagination import Cursor, split
from app.services.uploads import receive_upload

router = APIRouter(prefix=f"{API_PREFIX}/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "format": {"type": "string", "enum": list(service.FORMATS)},
                },
            }
        },
    },
}


@router.post(
    "",
    status_code=201,
    response_model=DatasetUploadOut,
    summary="Upload a data set",
    description=(
        "An `.npz` (`numpy.savez`, numeric arrays sharing their first, sample dimension) or a zip of images "
        "with one folder per class. Streamed to storage with the size cap enforced while reading, then checked "
        "in a child process (array headers only, never unpickled). A rejected file is not kept."
    ),
    responses=problem_responses(401, 413, 422, 429, 507),
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_dataset(
    request: Request,
    session: SessionDep,
    user: UserDep,
    storage: StorageDep,
    settings: SettingsDep,
    inspector: DatasetInspectorDep,
    format: Annotated[str | None, Query(description="`npz` or `image_folder`; detected when left out")] = None,
    name: Annotated[str | None, Query(max_length=255, description="display name (raw-body uploads)")] = None,
) -> DatasetUploadOut:
    left = await run_in_threadpool(quota.storage_left, session, user.id, settings)
    upload = await receive_upload(
        request, storage, kind="datasets", max_bytes=settings.max_upload_bytes, quota_left=left
    )
    if name and not upload.filename:
        upload.filename = name
    dataset, details = await run_in_threadpool(
        lambda: service.register_dataset(
            session,
            user,
            upload,
            storage=storage,
            fmt=format or upload.fields.get("format"),
            inspector=inspector,
            timeout=INSPECT_TIMEOUT_S,
        )
    )
    return DatasetUploadOut.model_validate({**DatasetOut.model_validate(dataset).model_dump(), "details": details})


@router.get("", response_model=DatasetPage, summary="List your data sets", responses=problem_responses(401, 422))
def list_datasets(
    session: SessionDep,
    user: UserDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> DatasetPage:
    rows = service.DatasetRepository(session, user).list(limit, Cursor.decode(cursor) if cursor else None)
    items, next_cursor = split(rows, limit)
    return DatasetPage(items=[DatasetOut.model_validate(d) for d in items], next_cursor=next_cursor)


@router.get(
    "/{dataset_id}", response_model=DatasetOut, summary="Show a data set", responses=problem_responses(401, 404)
)
def get_dataset(dataset_id: uuid.UUID, session: SessionDep, user: UserDep) -> Dataset:
    return service.get_dataset(session, user, dataset_id)


@router.delete(
    "/{dataset_id}",
    status_code=204,
    summary="Delete a data set and its file",
    responses=problem_responses(401, 404, 409),
)
def delete_dataset(dataset_id: uuid.UUID, session: SessionDep, user: UserDep, storage: StorageDep) -> Response:
    service.delete_dataset(session, user, dataset_id, storage)
    return Response(status_code=204)
