"""Calibration / fine-tuning data sets."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from pydantic import BaseModel, Field

from app.schemas.common import ORM


class DatasetOut(ORM):
    id: uuid.UUID
    name: str = Field(examples=["calib.npz"])
    format: str = Field(examples=["npz"], description="`npz` or `image_folder`")
    sha256: str
    size_bytes: int
    num_samples: int | None = Field(examples=[512])
    status: str = Field(examples=["ready"])
    created_at: dt.datetime


class DatasetUploadOut(DatasetOut):
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="what the check found: arrays with shape and dtype (npz) or classes (image folder)",
        examples=[{"arrays": {"x": {"shape": [512, 3, 32, 32], "dtype": "float32"}}}],
    )


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None = None
