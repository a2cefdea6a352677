"""Shared pieces of the worker tests (no tests here): tiny scripted models, job rows, a real
Celery worker subprocess, and polling helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

REPO = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))
SECRET = "worker-test-secret-" + "S3CR3T" * 4  # must never reach the child or the log
INPUT_SPEC = "3,16,16"


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


class Loader(torch.nn.Module):
    """Identity in forward; its scripted ``__setstate__`` runs inside ``torch.jit.load``:
    it burns CPU for ``spin`` iterations and, given a path, writes into that host file."""

    def __init__(self, spin: int, path: str) -> None:
        super().__init__()
        self.spin = spin
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[int, str, bool]:
        return (self.spin, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, str, bool]) -> None:
        self.spin = state[0]
        self.path = state[1]
        self.training = state[2]
        acc = torch.zeros(64, 64)
        for _ in range(self.spin):
            acc = acc + torch.ones(64, 64)
        self.training = bool(acc.sum() >= 0) and state[2]
        if self.path != "":
            written = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
            written.fill_(88)
            self.spin = int(written.sum())  # used, so the compiler keeps the write


class LoaderNet(TinyNet):
    def __init__(self, spin: int = 0, path: str = "") -> None:
        super().__init__()
        self.loader = Loader(spin, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.loader(x)
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


def save_model(module: torch.nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def create_job(sessions: sessionmaker[Session], storage: Any, model_path: Path, **fields: Any) -> uuid.UUID:
    from app.models import Job, ModelFile, User

    stored = storage.save_file(model_path, kind="models")
    with sessions() as s:
        user = User(email=f"{uuid.uuid4().hex[:10]}@example.com")
        s.add(user)
        s.flush()
        model = ModelFile(owner_id=user.id, name="net.pt", storage_key=stored.key, sha256=stored.sha256,
                          size_bytes=stored.size, status="ready", input_spec=INPUT_SPEC)
        s.add(model)
        s.flush()
        job = Job(owner_id=user.id, model_id=model.id, input_spec=INPUT_SPEC, options=fields.pop("options", {}),
                  **fields)
        s.add(job)
        s.commit()
        return job.id


def get_job(sessions: sessionmaker[Session], job_id: uuid.UUID) -> Any:
    from app.models import Job

    with sessions() as s:
        job = s.get_one(Job, job_id)
        _ = (job.events, job.artifacts, job.layer_ranks)  # load before the session closes
        return job


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, on_timeout: Callable[[], str] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{extra}")


def wait_status(sessions: sessionmaker[Session], job_id: uuid.UUID, statuses: set[str], timeout: float,
                worker: CeleryWorker | None = None) -> Any:
    def done() -> Any:
        job = get_job(sessions, job_id)
        return job if job.status in statuses else None

    return wait_for(done, timeout, f"job in {statuses}", (lambda: worker.tail()) if worker else None)


def sandbox_children(job_id: uuid.UUID) -> list[int]:
    """Pids of sandbox children working on ``job_id`` (their cwd is its scratch directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"worker.child" in cmd and job_id.hex in cwd:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


class CeleryWorker:
    """``celery -A worker.celery_app worker`` as a real subprocess in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str, queues: str = "gpu,cpu") -> None:
        self.log_path = log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [CELERY, "-A", "worker.celery_app", "worker", "-Q", queues, "--concurrency", "1", "-n", f"{name}@%h",
             "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "INFO"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(lambda: "ready." in log_path.read_text() or self.proc.poll() is not None, 60, "worker ready",
                 self.tail)
        assert self.proc.poll() is None, self.tail()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text()[-n:]

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
