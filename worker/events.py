"""Live job events on Redis pub/sub: channel ``tensortrim:job:<id>``, one JSON object
per message. The API's SSE endpoint subscribes to the same channel and falls back to
polling the database, so a lost message only delays what a client sees.

In embedded mode (no Redis) publishing is a no-op: the database holds every event.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "tensortrim:job:"

_clients: dict[str, Any] = {}
_lock = threading.Lock()


def channel(job_id: str | uuid.UUID) -> str:
    return f"{CHANNEL_PREFIX}{job_id}"


def redis_url() -> str | None:
    from app.settings import get_settings

    url = get_settings().broker_url
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


def _client(url: str) -> Any:
    with _lock:
        client = _clients.get(url)
        if client is None:
            import redis

            client = _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        return client


def publish(job_id: str | uuid.UUID, event: dict[str, Any], *, url: str | None = None) -> None:
    """Publish one event; never raises (the database is the record, this is a courtesy)."""
    url = url or redis_url()
    if url is None:
        return
    try:
        _client(url).publish(channel(job_id), json.dumps({"job_id": str(job_id), **event}, default=str))
    except Exception as e:  # noqa: BLE001
        log.warning("could not publish an event for job %s: %s", job_id, e)
