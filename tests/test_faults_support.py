"""Shared pieces of the fault, security and soak runs (no tests here): PRIVATE Redis and
Postgres servers that a test may stop and restart without disturbing anyone else, and a
full-mode stack (the real API app + real Celery worker subprocesses) on top of them.

Everything started here is stopped by its owner (``stop()`` in a finally / fixture
teardown); the shared Postgres (5432) and Redis (6379) are never touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from tests.test_worker_support import REPO, CeleryWorker, wait_for

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1] if glob.glob("/usr/lib/postgresql/*/bin") else ""
SECRET_KEY = "faults-test-secret-" + "K3Y" * 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PrivateRedis:
    """``redis-server`` on a free loopback port, no persistence: a restart loses every
    queued message, which is exactly the failure the reconciler exists for."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(lambda: _port_open(self.port), 20, f"redis on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # like a crash: nothing saved
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class PrivatePostgres:
    """A throw-away cluster (initdb as the ``postgres`` user when run as root) on a free port."""

    def __init__(self) -> None:
        if not PG_BIN:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="tt-pg-"))
        self.port = free_port()
        self.data = self.root / "data"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        self._run(f"{PG_BIN}/initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        subprocess.run([*prefix, *cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120)

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off -c max_connections=100")
        self._run(f"{PG_BIN}/pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(f"{PG_BIN}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return _port_open(self.port)

    def destroy(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def full_mode_env(db_url: str, redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a full-mode process (API or worker): fast heartbeats for tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTRIM_")}
    env.update({
        "TENSORTRIM_MODE": "full",
        "TENSORTRIM_DATABASE_URL": db_url,
        "TENSORTRIM_BROKER_URL": redis_url,
        "TENSORTRIM_SECRET_KEY": SECRET_KEY,
        "TENSORTRIM_DATA_DIR": str(data_dir),
        "TENSORTRIM_MIN_FREE_BYTES": "0",
        "TENSORTRIM_HEARTBEAT_STALE_S": "4",
        "TENSORTRIM_MAX_ATTEMPTS": "3",
        "TENSORTRIM_WORKER_HEARTBEAT_INTERVAL_S": "0.5",
        "TENSORTRIM_WORKER_THREADS": "1",
        "TENSORTRIM_WORKER_KILL_GRACE_S": "1",
        "TENSORTRIM_WORKER_UNCLAIMED_AFTER_S": "2",
        "PYTHONPATH": str(REPO),
        **extra,
    })
    return env


class FullStack:
    """The real API app (in-process, full mode) + real Celery worker subprocesses, on the
    given database and Redis. ``reconcile()`` runs the real reconciler once."""

    def __init__(self, db_url: str, redis_url: str, tmp: Path, *, migrate: bool = True, **settings: Any) -> None:
        from fastapi.testclient import TestClient

        from app.auth import create_key
        from app.db import make_engine, make_sessionmaker
        from app.main import create_app
        from app.migrate import upgrade
        from app.models import User
        from app.settings import Settings
        from app.storage import LocalStorage

        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.db_url, self.redis_url = db_url, redis_url
        self.env = full_mode_env(db_url, redis_url, self.data_dir)
        settings.setdefault("quota_concurrent_jobs", 50)
        self.settings = Settings(mode="full", database_url=db_url, broker_url=redis_url, secret_key=SECRET_KEY,
                                 data_dir=self.data_dir, min_free_bytes=0, heartbeat_stale_s=4, max_attempts=3,
                                 **settings)
        self.engine = make_engine(db_url)
        if migrate:
            upgrade(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        self.storage = LocalStorage(self.settings.storage_dir)
        self.app = create_app(self.settings)
        from app.api.deps import get_enqueue
        from worker.celery_app import make_celery
        from worker.queue import enqueue_job

        self.celery = make_celery(self.settings)  # the module-level app follows the process's env, not these settings
        self.app.dependency_overrides[get_enqueue] = lambda: (
            lambda job_id, queue=None: enqueue_job(job_id, queue, app=self.celery)
        )
        self.client = TestClient(self.app)
        self.client.__enter__()
        with self.sessions() as s:
            user = User(email=f"{uuid.uuid4().hex[:10]}@example.com")
            s.add(user)
            s.flush()
            _, token = create_key(s, user, secret=SECRET_KEY, scopes=("read", "write"))
            s.commit()
        self.headers = {"Authorization": f"Bearer {token}"}
        self.workers: list[CeleryWorker] = []
        self._runtime: Any = None

    def worker(self, name: str) -> CeleryWorker:
        w = CeleryWorker(self.env, self.tmp / f"{name}.log", name)
        self.workers.append(w)
        return w

    def runtime(self) -> Any:
        """The reconciler's runtime (one engine for the stack's life)."""
        if self._runtime is None:
            from worker import tasks
            from worker.config import WorkerSettings

            self._runtime = tasks.configure(self.settings, WorkerSettings(unclaimed_after_s=2))
        return self._runtime

    def reconcile(self) -> dict[str, int]:
        from worker.queue import enqueue_job, queue_for
        from worker.tasks import reconcile

        return reconcile(self.runtime(), send=lambda job: enqueue_job(job.id, queue_for(job), app=self.celery))

    def upload(self, data: bytes, input_spec: str | None = None) -> Any:
        form = {"input_spec": input_spec} if input_spec else None
        return self.client.post("/api/v1/models", headers=self.headers, files={"file": ("m.pt", data)}, data=form)

    def submit(self, model_id: str, budget: str = "flops:2x", input_spec: str = "3,16,16") -> dict[str, Any]:
        r = self.client.post("/api/v1/jobs", headers=self.headers,
                             json={"model_id": model_id, "input_spec": input_spec, "budget": budget,
                                   "method": "uniform"})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/jobs/{job_id}", headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        with contextlib.suppress(Exception):
            self.client.__exit__(None, None, None)
        self.engine.dispose()


def model_file_bytes(module: torch.nn.Module) -> bytes:
    import io

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()
