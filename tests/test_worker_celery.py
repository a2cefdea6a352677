"""Full mode for real: Postgres, Redis (db 14) and ``celery -A worker.celery_app worker``
subprocesses running jobs end to end in the sandbox."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from tests.test_worker_support import (
    INPUT_SPEC,
    REPO,
    SECRET,
    CeleryWorker,
    LoaderNet,
    TinyNet,
    alive,
    create_job,
    get_job,
    sandbox_children,
    save_model,
    wait_for,
    wait_status,
)

REDIS_URL = os.environ.get("TENSORTRIM_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
ALLOWED_CHILD_ENV = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE",
                     "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                     "CUDA_VISIBLE_DEVICES"}
JOB_TIMEOUT = 150


class Stack:
    def __init__(self, db_url: str, data_dir: Path, tmp: Path) -> None:
        from app.db import make_engine, make_sessionmaker
        from app.migrate import upgrade
        from app.settings import Settings
        from app.storage import LocalStorage
        from worker.celery_app import make_celery

        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TENSORTRIM_")},
            "TENSORTRIM_MODE": "full",
            "TENSORTRIM_DATABASE_URL": db_url,
            "TENSORTRIM_BROKER_URL": REDIS_URL,
            "TENSORTRIM_SECRET_KEY": SECRET,
            "TENSORTRIM_DATA_DIR": str(data_dir),
            "TENSORTRIM_MIN_FREE_BYTES": "0",
            "TENSORTRIM_HEARTBEAT_STALE_S": "4",
            "TENSORTRIM_MAX_ATTEMPTS": "3",
            "TENSORTRIM_WORKER_HEARTBEAT_INTERVAL_S": "0.5",
            "TENSORTRIM_WORKER_THREADS": "1",
            "TENSORTRIM_WORKER_KILL_GRACE_S": "1",
            "PYTHONPATH": str(REPO),
        }
        self.settings = Settings(mode="full", database_url=db_url, broker_url=REDIS_URL, secret_key=SECRET,
                                 data_dir=data_dir, min_free_bytes=0, heartbeat_stale_s=4, max_attempts=3)
        self.engine = make_engine(db_url)
        upgrade(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        self.storage = LocalStorage(self.settings.storage_dir)
        self.celery = make_celery(self.settings)
        self.tmp = tmp
        self.workers: list[CeleryWorker] = []

    def worker(self, name: str) -> CeleryWorker:
        w = CeleryWorker(self.env, self.tmp / f"{name}.log", name)
        self.workers.append(w)
        return w

    def enqueue(self, job_id: uuid.UUID, queue: str = "cpu") -> None:
        from worker.queue import enqueue_job

        enqueue_job(job_id, queue, app=self.celery)

    def runtime(self) -> Any:
        from worker import tasks
        from worker.config import WorkerSettings

        return tasks.configure(self.settings, WorkerSettings(unclaimed_after_s=1))

    def job_log(self, job: Any) -> str:
        logs = [a for a in job.artifacts if a.name == "job.log"]
        return self.storage.path(logs[0].storage_key).read_text() if logs else "(no job.log)"

    def artifact_bytes(self, job: Any, name: str) -> bytes:
        art = next(a for a in job.artifacts if a.name == name)
        data = self.storage.path(art.storage_key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == art.sha256 and len(data) == art.size_bytes
        return data


@pytest.fixture(scope="module")
def stack(pg_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as e:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {e}")
    tmp = tmp_path_factory.mktemp("worker")
    st = Stack(pg_database(), tmp / "data", tmp)
    yield st
    for w in st.workers:
        w.stop()
    st.engine.dispose()
    client.flushdb()


@pytest.fixture(scope="module")
def worker(stack: Stack) -> CeleryWorker:
    return stack.worker("main")


def test_job_runs_end_to_end_with_progress_artifacts_and_ranks(stack: Stack, worker: CeleryWorker,
                                                               tmp_path: Path) -> None:
    import redis

    from compression.input_spec import InputSpec
    from compression.inventory import count_macs
    from compression.pipeline import load_editable

    messages: list[dict[str, Any]] = []
    pubsub = redis.Redis.from_url(REDIS_URL).pubsub()
    pubsub.psubscribe("tensortrim:job:*")
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            m = pubsub.get_message(timeout=0.2)
            if m and m["type"] == "pmessage":
                messages.append({"channel": m["channel"].decode(), **json.loads(m["data"])})

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    job_id = create_job(stack.sessions, stack.storage, save_model(TinyNet(), tmp_path / "net.pt"))
    stack.enqueue(job_id)
    job = wait_status(stack.sessions, job_id, {"succeeded", "failed"}, JOB_TIMEOUT, worker)
    stop.set()
    listener.join(2)
    assert job.status == "succeeded", (job.error_code, job.error_message, stack.job_log(job))
    assert job.attempt == 1 and job.progress == 1.0

    statuses = [e.status for e in job.events if e.kind == "status"]
    assert statuses == ["running", "succeeded"]
    assert {e.phase for e in job.events if e.kind == "progress"} >= {"load", "export"}

    mine = [m for m in messages if m["channel"] == f"tensortrim:job:{job_id}"]
    assert [m["status"] for m in mine if m["type"] == "status"] == ["running", "succeeded"]
    progress = [m for m in mine if m["type"] == "progress"]
    assert progress and all(0 <= m["progress"] <= 1 and "eta_s" in m for m in progress)

    names = {a.name for a in job.artifacts}
    assert names == {"model.pt", "model.pt2", "report.json", "report.html", "job.log"}
    report = json.loads(stack.artifact_bytes(job, "report.json"))
    model_path = tmp_path / "compressed.pt"
    model_path.write_bytes(stack.artifact_bytes(job, "model.pt"))
    stack.artifact_bytes(job, "model.pt2")

    spec = InputSpec.parse(INPUT_SPEC)
    ts, editable = load_editable(model_path, spec)
    example = spec.example(4, seed=1)
    assert count_macs(editable.gm, example) == report["macs_after"] == job.metrics["macs_after"]
    assert ts(*example).shape == (4, 10)
    assert job.metrics["macs_before"] == report["macs_before"] > report["macs_after"]
    assert sorted(r.layer for r in job.layer_ranks) == sorted(lp["name"] for lp in report["plan"]["layers"])

    log = stack.artifact_bytes(job, "job.log").decode()
    assert SECRET not in log and stack.settings.database_url not in log
    names_line = next(line for line in log.splitlines() if "child environment names:" in line)
    child_env = {n.strip() for n in names_line.split(":", 1)[1].split(",")}
    assert child_env <= ALLOWED_CHILD_ENV, child_env - ALLOWED_CHILD_ENV


def test_cancel_kills_the_running_sandbox_whose_env_is_scrubbed(stack: Stack, worker: CeleryWorker,
                                                               tmp_path: Path) -> None:
    from app.jobs import state

    slow = save_model(LoaderNet(spin=50_000_000), tmp_path / "slow.pt")  # minutes of loading
    job_id = create_job(stack.sessions, stack.storage, slow)
    stack.enqueue(job_id)
    pids = wait_for(lambda: sandbox_children(job_id), 90, "the sandbox child to start", worker.tail)
    wait_for(lambda: get_job(stack.sessions, job_id).phase == "load", 60, "the child's first progress")
    child = pids[0]

    # What the child process really has, read by us from /proc (not what it reports).
    env = dict(item.split(b"=", 1) for item in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if item)
    names = {k.decode() for k in env}
    assert names <= ALLOWED_CHILD_ENV, names - ALLOWED_CHILD_ENV
    assert not any(SECRET.encode() in v or b"postgresql" in v or b"redis://" in v for v in env.values())
    assert Path(os.readlink(f"/proc/{child}/cwd")).name.startswith(job_id.hex)
    if os.geteuid() == 0:  # isolation needs root; without it the job still runs, recorded as not isolated
        assert os.readlink(f"/proc/{child}/ns/net") != os.readlink("/proc/self/ns/net")

    with stack.sessions() as s:
        assert state.request_cancel(s, job_id) == "cancelling"
        s.commit()
    job = wait_status(stack.sessions, job_id, {"cancelled", "failed", "succeeded"}, 30, worker)
    assert job.status == "cancelled"
    wait_for(lambda: not alive(child), 10, "the child to be gone")
    assert not sandbox_children(job_id)
    assert "cancel requested" in stack.artifact_bytes(job, "job.log").decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="the read-only sandbox needs root (or CAP_SYS_ADMIN)")
def test_hostile_model_cannot_write_outside_its_scratch(stack: Stack, worker: CeleryWorker, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)
    target = outside / "victim.bin"
    target.write_bytes(b"safe")
    target.chmod(0o666)
    job_id = create_job(stack.sessions, stack.storage, save_model(LoaderNet(path=str(target)), tmp_path / "evil.pt"))
    stack.enqueue(job_id)
    job = wait_status(stack.sessions, job_id, {"succeeded", "failed"}, JOB_TIMEOUT, worker)
    assert target.read_bytes() == b"safe"
    assert job.status == "failed"
    assert "Traceback" not in (job.error_message or "") and "/" not in (job.error_code or "")
    log = stack.artifact_bytes(job, "job.log").decode()
    # the write hits a read-only mount, or finds nothing at all where the path was covered
    assert ("Read-only file system" in log or "No such file or directory" in log) and SECRET not in log


def test_worker_killed_mid_job_is_requeued_and_finished_by_another_worker(stack: Stack, worker: CeleryWorker,
                                                                         tmp_path: Path) -> None:
    from worker.tasks import reconcile

    worker.stop()  # this test needs the only worker to be the one it kills
    doomed = stack.worker("doomed")
    job_id = create_job(stack.sessions, stack.storage, save_model(TinyNet(), tmp_path / "net.pt"))
    stack.enqueue(job_id)
    child = wait_for(lambda: sandbox_children(job_id), 90, "the sandbox child to start", doomed.tail)[0]
    assert get_job(stack.sessions, job_id).attempt == 1
    doomed.kill9()
    wait_for(lambda: not alive(child), 10, "the orphaned child to die with its supervisor")

    rt = stack.runtime()
    beat = get_job(stack.sessions, job_id).heartbeat_at
    # A fresh heartbeat is left alone; checked only with 2 s to spare (on a loaded machine the
    # kill alone can outlast the stale threshold, and a first reconcile would claim the job).
    if beat > dt.datetime.now(dt.UTC) - dt.timedelta(seconds=rt.settings.heartbeat_stale_s - 2):
        assert reconcile(rt, send=lambda job: None) == {"resent": 0, "requeued": 0, "abandoned": 0}
    wait_for(lambda: get_job(stack.sessions, job_id).heartbeat_at
             < dt.datetime.now(dt.UTC) - dt.timedelta(seconds=4.5), 15, "a stale heartbeat")
    rescuer = stack.worker("rescuer")
    counts = reconcile(rt, send=lambda job: stack.enqueue(job.id))
    assert counts["requeued"] == 1
    job = wait_status(stack.sessions, job_id, {"succeeded", "failed"}, JOB_TIMEOUT, rescuer)
    assert job.status == "succeeded" and job.attempt == 2, (job.error_code, job.error_message)
    assert [(e.attempt, e.status) for e in job.events if e.kind == "status"] == [
        (1, "running"), (2, "running"), (2, "succeeded")]


def test_reconcile_fails_a_stale_job_that_used_its_attempts(stack: Stack, tmp_path: Path) -> None:
    from app.models import Job
    from worker.tasks import reconcile

    job_id = create_job(stack.sessions, stack.storage, save_model(TinyNet(), tmp_path / "net.pt"))
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    with stack.sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="running", attempt=3, heartbeat_at=old))
        s.commit()
    sent: list[uuid.UUID] = []
    counts = reconcile(stack.runtime(), send=lambda job: sent.append(job.id))
    assert counts["abandoned"] >= 1 and job_id not in sent
    job = get_job(stack.sessions, job_id)
    assert job.status == "failed" and job.error_code == "worker_lost"


def test_reconcile_resends_a_queued_job_nobody_claimed(stack: Stack, tmp_path: Path) -> None:
    from app.models import Job
    from worker.tasks import reconcile

    job_id = create_job(stack.sessions, stack.storage, save_model(TinyNet(), tmp_path / "net.pt"))
    with stack.sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(created_at=dt.datetime.now(dt.UTC)
                                                             - dt.timedelta(minutes=1)))
        s.commit()
    sent: list[uuid.UUID] = []
    rt = stack.runtime()
    reconcile(rt, send=lambda job: sent.append(job.id))
    reconcile(rt, send=lambda job: sent.append(job.id))  # not again within unclaimed_after_s
    assert sent.count(job_id) == 1
