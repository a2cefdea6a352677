"""Pieces shared by every domain's schemas."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ORM(BaseModel):
    """A response model read from an ORM object's attributes."""

    model_config = ConfigDict(from_attributes=True)
