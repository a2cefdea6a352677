"""``/api/v1/models``: upload, list, show and delete TorchScript models."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import API_PREFIX, INSPECT_TIMEOUT_S, ModelInspectorDep, SessionDep, SettingsDep, StorageDep, UserDep
from app.models import ModelFile
from app.problems import problem_responses
from app.schemas.models import ModelOut, ModelPage
from app.services import models as service
from app.services import quota
from app.services.pagination import Cursor, split
from app.services.uploads import receive_upload

router = APIRouter(prefix=f"{API_PREFIX}/models", tags=["models"])

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "the torch.jit.save file"},
                    "input_spec": {"type": "string", "description": "one sample's shape, e.g. 3,224,224"},
                },
            }
        },
    },
}


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    summary="Upload a TorchScript model",
    description=(
        "Send the file written by `torch.jit.save`, as the raw body (`--data-binary @model.pt`) or as the "
        "multipart field `file`. It is streamed to storage with the size cap enforced while reading, pre-checked "
        "at once, and, when `input_spec` is given, inspected in a sandboxed child process to return the layer "
        "table with MACs and parameters. A rejected file is not kept."
    ),
    responses=problem_responses(401, 413, 422, 429, 507),
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_model(
    request: Request,
    session: SessionDep,
    user: UserDep,
    storage: StorageDep,
    settings: SettingsDep,
    inspector: ModelInspectorDep,
    input_spec: Annotated[
        str | None, Query(description="one sample's input shape without batch, e.g. `3,224,224`")
    ] = None,
    name: Annotated[str | None, Query(max_length=255, description="display name (raw-body uploads)")] = None,
) -> ModelFile:
    left = await run_in_threadpool(quota.storage_left, session, user.id, settings)
    upload = await receive_upload(
        request, storage, kind="models", max_bytes=settings.max_upload_bytes, quota_left=left
    )
    if name and not upload.filename:
        upload.filename = name
    return await run_in_threadpool(
        lambda: service.register_model(
            session,
            user,
            upload,
            storage=storage,
            input_spec=input_spec or upload.fields.get("input_spec"),
            inspector=inspector,
            timeout=INSPECT_TIMEOUT_S,
        )
    )


@router.get("", response_model=ModelPage, summary="List your models", responses=problem_responses(401, 422))
def list_models(
    session: SessionDep,
    user: UserDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> ModelPage:
    rows = service.ModelRepository(session, user).list(limit, Cursor.decode(cursor) if cursor else None)
    items, next_cursor = split(rows, limit)
    return ModelPage(items=[ModelOut.model_validate(m) for m in items], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelOut, summary="Show a model", responses=problem_responses(401, 404))
def get_model(model_id: uuid.UUID, session: SessionDep, user: UserDep) -> ModelFile:
    return service.get_model(session, user, model_id)


@router.delete(
    "/{model_id}",
    status_code=204,
    summary="Delete a model and its file",
    responses=problem_responses(401, 404, 409),
)
def delete_model(model_id: uuid.UUID, session: SessionDep, user: UserDep, storage: StorageDep) -> Response:
    service.delete_model(session, user, model_id, storage)
    return Response(status_code=204)
