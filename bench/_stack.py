"""A throw-away full-mode TensorTrim stack on loopback, for benchmarks.

``full_stack()`` creates its own Postgres database on 127.0.0.1:5432 (trust auth,
user ``postgres``), takes an empty Redis database number on 127.0.0.1:6379, runs
the migrations the operator's way (``python -m app.migrate``), creates a user and
an API key, and starts ``uvicorn --factory app.main:create_app`` as a subprocess on
a free loopback port. ``Stack.start_worker()`` adds one real Celery worker subprocess
(``celery -A worker.celery_app worker -Q gpu,cpu --concurrency 1``), as the worker
tests do. Everything is stopped, the database dropped, the Redis database flushed
and the data directory removed in ``finally``.

Nothing here listens on or talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TENSORTRIM_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# Tests use db 14 (worker tests) and 0 is the default broker: the bench looks for an empty one among these.
REDIS_DB_CANDIDATES = (11, 12, 13, 10, 9, 8)
CELERY = str(Path(sys.executable).with_name("celery"))
SECRET_ENV = ("TENSORTRIM_SECRET_KEY",)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, tail: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail() if tail else ''}")


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class Service:
    """One subprocess in its own process group, logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: Any = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 4000) -> str:
        try:
            return f"--- {self.name} log ({self.log_path}) ---\n" + self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        try:
            _stop_group(self.proc, grace)
        finally:
            self._log.close()


def _spawn(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> Service:
    log = log_path.open("wb")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Service(name, proc, log_path, log)


@dataclass
class Stack:
    base_url: str
    token: str
    env: dict[str, str]
    data_dir: Path
    work_dir: Path
    db_name: str
    redis_db: int
    api: Service
    worker: Service | None = None

    @property
    def api_pid(self) -> int:
        return self.api.pid

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def public_settings(self) -> dict[str, str]:
        """The environment given to the API and the worker, secrets masked."""
        env = sorted(self.env.items())
        return {k: ("***" if k in SECRET_ENV else v) for k, v in env if k.startswith("TENSORTRIM_")}

    def start_worker(self, timeout: float = 120.0) -> Service:
        if self.worker is not None and self.worker.proc.poll() is None:
            return self.worker
        argv = [CELERY, "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu", "--concurrency", "1",
                "-n", f"bench-{self.db_name[-6:]}@%h", "--without-mingle", "--without-gossip", "--without-heartbeat",
                "-l", "INFO"]
        worker = _spawn("worker", argv, self.env, self.work_dir / "worker.log")
        self.worker = worker

        def ready() -> bool:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"the Celery worker exited with {worker.proc.returncode}\n{worker.tail()}")
            return "ready." in worker.log_path.read_text(errors="replace")

        wait_for(ready, timeout, "the Celery worker", worker.tail)
        return worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def flush_broker(self) -> None:
        """Drop every message in this stack's Redis database (e.g. for jobs cancelled while no worker ran)."""
        _flush(self.redis_db)

    def tails(self) -> str:
        return "\n".join(s.tail() for s in (self.api, self.worker) if s is not None)


def _pick_redis_db(requested: int | None) -> int:
    import redis

    candidates = (requested,) if requested is not None else REDIS_DB_CANDIDATES
    for db in candidates:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=3)
        try:
            if client.dbsize() == 0:
                return db
        except redis.exceptions.ConnectionError as e:
            raise RuntimeError(f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT}: {e}") from None
        finally:
            client.close()
    raise RuntimeError(f"no empty Redis database among {candidates}: pass one with redis_db=")


def _create_key(db_url: str, secret: str) -> str:
    from app.auth import create_key
    from app.db import make_engine, make_sessionmaker
    from app.models import User

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            user = User(email="bench@localhost")
            session.add(user)
            session.flush()
            _, token = create_key(session, user, secret=secret, name="bench")
            session.commit()
    finally:
        engine.dispose()
    return token


@contextlib.contextmanager
def full_stack(
    *,
    extra_env: dict[str, str] | None = None,
    redis_db: int | None = None,
    root: Path | None = None,
    keep_dir: bool = False,
    start_worker: bool = False,
    uvicorn_args: tuple[str, ...] = ("--log-level", "warning", "--no-access-log"),
) -> Iterator[Stack]:
    """Start the stack, yield it, tear everything down (also on errors and Ctrl-C)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    work_dir = Path(tempfile.mkdtemp(prefix="tensortrim-bench-", dir=root))
    data_dir = work_dir / "data"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    db_name = f"tensortrim_bench_{secrets.token_hex(6)}"
    db_created = False
    chosen_redis: int | None = None
    api: Service | None = None
    stack: Stack | None = None
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        db_created = True
        db_url = make_url(PG_ADMIN_URL).set(database=db_name).render_as_string(hide_password=False)
        chosen_redis = _pick_redis_db(redis_db)
        secret = secrets.token_urlsafe(48)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTRIM_")}
        env.update({
            "TENSORTRIM_MODE": "full",
            "TENSORTRIM_DATABASE_URL": db_url,
            "TENSORTRIM_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{chosen_redis}",
            "TENSORTRIM_SECRET_KEY": secret,
            "TENSORTRIM_DATA_DIR": str(data_dir),
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra_env or {})
        data_dir.mkdir(parents=True)

        migrate = subprocess.run([sys.executable, "-m", "app.migrate"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=300)
        if migrate.returncode != 0:
            raise RuntimeError(f"python -m app.migrate failed:\n{migrate.stdout}\n{migrate.stderr}")
        token = _create_key(db_url, secret)

        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
                "--port", str(port), *uvicorn_args]
        api = _spawn("api", argv, env, work_dir / "api.log")
        base_url = f"http://127.0.0.1:{port}"
        stack = Stack(base_url, token, env, data_dir, work_dir, db_name, chosen_redis, api)

        def ready() -> bool:
            if api.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {api.proc.returncode}\n{api.tail()}")
            try:
                return httpx.get(f"{base_url}/readyz", timeout=5, trust_env=False).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 120, "the API's /readyz", api.tail)
        if start_worker:
            stack.start_worker()
        yield stack
    finally:
        errors: list[str] = []
        for step in (
            (lambda: stack.stop_worker()) if stack is not None else None,
            (lambda: api.stop()) if api is not None else None,
            (lambda: _flush(chosen_redis)) if chosen_redis is not None else None,
        ):
            if step is None:
                continue
            try:
                step()
            except Exception as e:  # noqa: BLE001  (keep cleaning up; report at the end)
                errors.append(f"{type(e).__name__}: {e}")
        if db_created:
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            except Exception as e:  # noqa: BLE001
                errors.append(f"drop database {db_name}: {type(e).__name__}: {e}")
        admin.dispose()
        if keep_dir:
            print(f"kept {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
        if errors:
            print("bench stack clean-up problems: " + "; ".join(errors), file=sys.stderr)


def _flush(db: int) -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    try:
        client.flushdb()
    finally:
        client.close()
