"""Uploaded TorchScript models."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import ORM


class LayerOut(BaseModel):
    """One conv/linear layer of the model, as the engine's inventory sees it."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(examples=["features.0"])
    kind: str = Field(examples=["conv2d"])
    in_channels: int | None = None
    out_channels: int | None = None
    kernel: list[int] | None = None
    macs: int | None = Field(default=None, description="multiply-accumulates per sample")
    params: int | None = None
    decomposable: bool | None = None
    skip_reason: str | None = None


class InventoryOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    route: str | None = Field(default=None, description="how the engine turned the model into an editable graph")
    total_macs: int = Field(description="MACs per sample of the whole network")
    total_params: int
    layer_macs: int | None = Field(default=None, description="MACs of the conv/linear layers alone")
    layers: list[LayerOut]


class ModelOut(ORM):
    id: uuid.UUID
    name: str = Field(examples=["resnet18.pt"])
    sha256: str = Field(examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"])
    size_bytes: int = Field(examples=[46827520])
    status: str = Field(
        examples=["ready"],
        description="`ready`: inspected with `input_spec`; `uploaded`: pre-checked, no input_spec given yet",
    )
    input_spec: str | None = Field(examples=["3,224,224"])
    inventory: InventoryOut | None = Field(description="the layer table; null until an input_spec was given")
    created_at: dt.datetime


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None = None

