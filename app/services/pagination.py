"""Keyset pagination, newest first, on ``(created_at, id)``: stable under inserts,
and the cursor is opaque to clients (base64 of the last row's key)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.problems import Unprocessable

T = TypeVar("T")


@dataclass(frozen=True)
class Cursor:
    created_at: dt.datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), str(self.id)]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created, id_ = json.loads(raw)
            return cls(dt.datetime.fromisoformat(created), uuid.UUID(id_))
        except (ValueError, TypeError):
            raise Unprocessable(
                "cursor is not one this API returned: pass next_cursor from the previous page unchanged",
                code="invalid_cursor",
                field="cursor",
            ) from None

    @classmethod
    def after(cls, row: Any) -> Cursor:
        return cls(row.created_at, row.id)


def page(session: Session, query: Select[Any], model: Any, limit: int, cursor: Cursor | None) -> list[Any]:
    """Up to ``limit + 1`` rows after ``cursor`` (one extra tells whether another page exists)."""
    if cursor is not None:
        query = query.where(
            or_(model.created_at < cursor.created_at, and_(model.created_at == cursor.created_at, model.id < cursor.id))
        )
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    return list(session.scalars(query))


def split(rows: list[T], limit: int) -> tuple[list[T], str | None]:
    """The page's items and the cursor of the next page (None on the last one)."""
    if len(rows) <= limit:
        return rows, None
    items = rows[:limit]
    return items, Cursor.after(items[-1]).encode()
