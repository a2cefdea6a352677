"""Listening to a job's live events: the subscribe side of ``worker/events.py``.

The worker publishes JSON objects on the Redis channel ``tensortrim:job:<id>``.
Redis pub/sub may drop messages and the database is the record, so the API treats
a message as a *wake-up*: it re-reads the job's rows at once instead of waiting for
its next poll. Messages with ``"type": "progress"`` (what ``worker.tasks`` publishes
as a phase advances) are also forwarded to the client as they are: fine-grained
progress is not stored as rows. Everything else (``"type": "status"``...) reaches
the client from the database, with an id the client can resume from.
"""

from __future__ import annotations

import json
import logging
import uuid
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "tensortrim:job:"


def channel(job_id: uuid.UUID | str) -> str:
    return f"{CHANNEL_PREFIX}{job_id}"


class JobSubscription:
    """``async with JobSubscription(url, job_id) as sub: msg = await sub.get(timeout)``.

    Entering raises when Redis is unreachable; callers then fall back to polling."""

    def __init__(self, redis_url: str, job_id: uuid.UUID | str) -> None:
        self.redis_url = redis_url
        self.channel = channel(job_id)
        self._client: Any = None
        self._pubsub: Any = None

    async def __aenter__(self) -> JobSubscription:
        from redis import asyncio as aioredis

        self._client = aioredis.from_url(self.redis_url, socket_connect_timeout=2)
        try:
            self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(self.channel)
        except BaseException:
            await self._client.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._pubsub is not None:
                await self._pubsub.aclose()
        finally:
            await self._client.aclose()

    async def get(self, timeout: float) -> dict[str, Any] | None:
        """The next message's payload (a dict), or None if none came within ``timeout``."""
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        if message is None or message.get("type") != "message":
            return None
        data = message.get("data")
        try:
            payload = json.loads(data)
        except (TypeError, ValueError):
            return {"type": "wakeup"}
        return payload if isinstance(payload, dict) else {"type": "wakeup"}
