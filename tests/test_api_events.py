"""Server-Sent Events: replay after Last-Event-ID, live progress written through
app.jobs.state, Redis wake-ups in full mode, and the stream's end."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from typing import Any

import pytest

from app.api.deps import StreamConfig, get_stream_config
from app.events import channel
from app.jobs import state

try:
    from tests.api_support import API, Api, api, assert_problem, make_api  # noqa: F401
except ImportError:  # pytest run from inside tests/
    from api_support import API, Api, api, assert_problem, make_api  # type: ignore[no-redef]  # noqa: F401

STALE = dt.timedelta(minutes=2)
REDIS_URL = "redis://127.0.0.1:6379/15"


def _events(text: str) -> list[dict[str, Any]]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                fields[name] = json.loads(value) if name == "data" else value
        if "event" in fields:
            out.append(fields)
    return out


def _fast_stream(api: Api, **kw: Any) -> None:
    config = StreamConfig(**{"max_lifetime_s": 10.0, "poll_interval_s": 0.05, "keepalive_s": 5.0, **kw})
    api.app.dependency_overrides[get_stream_config] = lambda: config


def _job(api: Api) -> tuple[dict[str, str], uuid.UUID]:
    user = api.user()
    model = api.upload_model(user)
    return user, uuid.UUID(api.create_job(user, model["id"])["id"])


def _run_worker(api: Api, job_id: uuid.UUID, steps: list[float], pause: float) -> threading.Thread:
    """A stand-in worker: claims the job, reports progress, succeeds; all through app.jobs.state."""

    def work() -> None:
        time.sleep(pause)
        with api.session() as s:
            attempt = state.claim(s, job_id, stale_after=STALE)
            s.commit()
        assert attempt is not None
        for p in steps:
            time.sleep(pause)
            with api.session() as s:
                state.heartbeat(s, job_id, attempt, progress=p, phase="select", message=f"{p:.0%}")
                s.commit()
        time.sleep(pause)
        with api.session() as s:
            state.succeed(s, job_id, attempt, metrics={"macs_ratio": 2.0})
            s.commit()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_stream_shows_live_progress_and_closes_on_a_terminal_state(api: Api) -> None:
    _fast_stream(api)
    user, job_id = _job(api)
    worker = _run_worker(api, job_id, [0.3, 0.6], pause=0.4)
    started = time.monotonic()
    r = api.client.get(f"{API}/jobs/{job_id}/events", headers=user)
    worker.join(5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert time.monotonic() - started < 8  # ended with the job, not by the lifetime cap
    events = _events(r.text)
    statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    progress = [e["data"]["progress"] for e in events if e["event"] == "progress"]
    assert 0.3 in progress and 0.6 in progress
    assert progress == sorted(progress)
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "succeeded"
    ids = [int(e["id"]) for e in events if "id" in e]
    assert ids == sorted(ids) and len(ids) == 3


def test_reconnecting_with_last_event_id_replays_only_later_events(api: Api) -> None:
    _fast_stream(api)
    user, job_id = _job(api)
    with api.session() as s:
        attempt = state.claim(s, job_id, stale_after=STALE)
        s.commit()
        state.fail(s, job_id, attempt or 0, code="unsupported_model", message="no decomposable layer")
        s.commit()
    full = _events(api.client.get(f"{API}/jobs/{job_id}/events", headers=user).text)
    assert [e["data"].get("status") for e in full] == ["queued", "running", "failed", "failed"]
    assert full[2]["data"]["message"] == "no decomposable layer"

    first_id = full[0]["id"]
    again = _events(api.client.get(f"{API}/jobs/{job_id}/events", headers={**user, "Last-Event-ID": first_id}).text)
    assert [e["event"] for e in again] == ["status", "status", "end"]
    assert [e["data"]["status"] for e in again[:2]] == ["running", "failed"]
    via_query = _events(api.client.get(f"{API}/jobs/{job_id}/events?after={first_id}", headers=user).text)
    assert via_query == again


def test_stream_ends_at_its_maximum_lifetime_while_the_job_waits(api: Api) -> None:
    _fast_stream(api, max_lifetime_s=0.3)
    user, job_id = _job(api)
    started = time.monotonic()
    r = api.client.get(f"{API}/jobs/{job_id}/events", headers=user)
    assert time.monotonic() - started < 5
    assert "reconnect with Last-Event-ID" in r.text
    assert [e["event"] for e in _events(r.text)] == ["status"]  # the queued event; no `end`


def test_redis_progress_messages_are_forwarded_live(api: Api) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable: {exc}")
    # Slow polling: only a Redis wake-up can deliver the message in time.
    _fast_stream(api, poll_interval_s=0.5, redis_url=REDIS_URL)
    user, job_id = _job(api)

    def publish_then_finish() -> None:
        time.sleep(0.6)
        client.publish(channel(job_id), json.dumps({"type": "progress", "phase": "finetune", "progress": 0.42}))
        time.sleep(0.2)
        api.client.post(f"{API}/jobs/{job_id}/cancel", headers=user)  # queued -> cancelled
        client.publish(channel(job_id), json.dumps({"type": "status", "status": "cancelled"}))  # a wake-up

    thread = threading.Thread(target=publish_then_finish, daemon=True)
    thread.start()
    events = _events(api.client.get(f"{API}/jobs/{job_id}/events", headers=user).text)
    thread.join(5)
    client.close()
    live = [e for e in events if e["event"] == "progress"]
    assert live and live[0]["data"]["progress"] == 0.42 and live[0]["data"]["phase"] == "finetune"
    assert [e["data"].get("status") for e in events if e["event"] != "progress"] == ["queued", "cancelled", "cancelled"]


def test_events_of_an_unknown_job_are_a_404_problem(api: Api) -> None:
    assert_problem(api.client.get(f"{API}/jobs/{uuid.uuid4()}/events", headers=api.user()), 404, "not_found")
