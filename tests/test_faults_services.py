"""Redis and Postgres going away under a running full-mode stack: the real API app and a
real Celery worker subprocess on a PRIVATE Postgres cluster and a PRIVATE redis-server
(both started here on free ports, restarted by the tests, stopped at the end; the shared
servers are never touched).

* Redis restarted (no persistence) with jobs queued: their messages are gone; the
  reconciler sends them again and they complete. The worker reconnects by itself.
* Postgres stopped under load: API requests answer 503 problem details at once (no
  hang) while it is down, and succeed again once it is back; the job that was running
  is taken over by a later attempt (reconciler) and completes; the worker keeps working.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_faults_support import FullStack, PrivatePostgres, PrivateRedis, model_file_bytes
from tests.test_worker_support import TinyNet, sandbox_children, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FullStack, PrivateRedis, PrivatePostgres]]:
    tmp = tmp_path_factory.mktemp("faults")
    try:
        pg = PrivatePostgres()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot start a private PostgreSQL: {e}")
    redis = PrivateRedis(tmp / "redis")
    st = None
    try:
        st = FullStack(pg.url, redis.url, tmp)
        yield st, redis, pg
    finally:
        if st is not None:
            st.close()
        redis.stop()
        pg.destroy()


def _model(st: FullStack) -> str:
    r = st.upload(model_file_bytes(TinyNet()))
    assert r.status_code == 201, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def _wait_terminal(st: FullStack, job_ids: list[str], timeout: float, *, reconcile: bool, tail: str = "") -> dict:
    def done() -> dict | None:
        if reconcile:
            st.reconcile()
        jobs = {j: st.job(j) for j in job_ids}
        return jobs if all(j["status"] in TERMINAL for j in jobs.values()) else None

    return wait_for(done, timeout, f"jobs {job_ids} to finish", lambda: tail or st.workers[-1].tail())  # type: ignore[no-any-return]


def test_redis_restart_loses_queued_messages_and_the_reconciler_resends_them(stack: tuple) -> None:
    st, redis, _ = stack
    model = _model(st)
    jobs = [st.submit(model)["id"]]  # no worker yet: the message waits in Redis
    redis.restart()  # ... and are lost (no persistence)
    worker = st.worker("after-redis-restart")
    time.sleep(3)
    assert [st.job(j)["status"] for j in jobs] == ["queued"], "the message should have been lost"
    finished = _wait_terminal(st, jobs, 240, reconcile=True)
    assert [finished[j]["status"] for j in jobs] == ["succeeded"], finished

    # The worker survives a Redis restart while idle and consumes what is sent afterwards.
    redis.restart(down_s=1.0)
    job = st.submit(model)["id"]
    assert _wait_terminal(st, [job], 180, reconcile=False)[job]["status"] == "succeeded", worker.tail()
    assert worker.proc.poll() is None


def test_postgres_outage_gives_503s_not_hangs_and_everything_recovers(stack: tuple, tmp_path: Path) -> None:
    st, _, pg = stack
    worker = st.workers[-1] if st.workers else st.worker("pg")
    model = _model(st)
    job = st.submit(model)["id"]
    wait_for(lambda: sandbox_children(uuid.UUID(job)), 90, "the job to start", worker.tail)
    pg.stop("fast")
    try:
        for method, path in (("GET", "/api/v1/jobs"), ("GET", f"/api/v1/jobs/{job}"), ("POST", "/api/v1/jobs")):
            t = time.monotonic()
            kwargs = {"json": {"model_id": model, "budget": "flops:2x"}} if method == "POST" else {}
            r = st.client.request(method, path, headers=st.headers, **kwargs)
            elapsed = time.monotonic() - t
            assert elapsed < 10, f"{method} {path} took {elapsed:.1f}s during the outage"
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "database_unavailable" and r.headers["Retry-After"]
        ready = st.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
        time.sleep(2)  # the worker notices too (its heartbeats fail)
    finally:
        pg.start()
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        st.client.get("/api/v1/jobs", headers=st.headers)), 30, "the API to recover")
    assert r.status_code == 200
    finished = _wait_terminal(st, [job], 240, reconcile=True)[job]
    assert finished["status"] in ("succeeded", "failed"), finished
    if finished["status"] == "failed":  # only with a clear reason, never stuck in running
        assert finished["error"]["code"] in ("worker_lost", "internal_error"), finished
    assert worker.proc.poll() is None  # the worker process outlived the outage (and ran the later attempt)
