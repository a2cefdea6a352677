"""Resource faults with real processes: a full disk (a real 2 MiB tmpfs when we may mount
one, else the free-space reserve), a child that runs out of memory under its RLIMIT_AS,
and a child killed by SIGKILL (what the kernel's OOM killer does). Each ends the job
with a clear error code, promptly, with its scratch directory removed.

The supervisor runs in this process (``worker.tasks.run_job``, what the Celery task
calls); the sandboxed child is the real ``python -m worker.child``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tests.test_worker_support import LoaderNet, TinyNet, create_job, get_job, sandbox_children, save_model, wait_for


class Hog(torch.nn.Module):
    """``__setstate__`` allocates 8 GiB while ``torch.jit.load`` runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> bool:
        return self.training

    @torch.jit.export
    def __setstate__(self, state: bool) -> None:
        big = torch.ones(2147483648)
        self.training = bool(big[0] > 0) and state


class HogNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.hog = Hog()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hog(x)
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "2m") -> Iterator[bool]:
    """A real tmpfs of ``size`` at ``path`` when this process may mount (root); yields
    whether it is real. Always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave: int) -> None:
    """Fill the file system holding ``path`` until about ``leave`` bytes stay free."""
    import shutil

    free = shutil.disk_usage(path).free
    with (path / "filler.bin").open("ab") as f:
        f.write(b"\0" * max(0, free - leave))


def runtime(tmp: Path, storage_dir: Path, **ws: Any) -> Any:
    from app.db import make_engine
    from app.migrate import upgrade
    from app.settings import Settings
    from worker import tasks
    from worker.config import WorkerSettings

    db = f"sqlite:///{tmp / 'db.sqlite'}"
    upgrade(make_engine(db))
    settings = Settings(mode="embedded", data_dir=tmp / "data", database_url=db, storage_dir=storage_dir,
                        min_free_bytes=0, secret_key="x" * 40)
    return tasks.configure(settings, WorkerSettings(threads=1, heartbeat_interval_s=0.5, kill_grace_s=1, **ws))


def run_in_thread(job_id: uuid.UUID) -> tuple[threading.Thread, list[str]]:
    from worker.tasks import run_job

    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(run_job(str(job_id))), daemon=True)
    t.start()
    return t, out


def test_storage_full_upload_is_507_and_keeps_nothing(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from tests.api_support import API, SECRET

    disk = tmp_path / "disk"
    with tiny_disk(disk) as real:
        storage = disk / "storage"
        storage.mkdir()
        db = f"sqlite:///{tmp_path / 'api.sqlite'}"
        settings = Settings(mode="embedded", data_dir=tmp_path / "data", database_url=db, storage_dir=storage,
                            min_free_bytes=128 << 10 if real else 1 << 60, secret_key=SECRET)
        if real:
            fill(disk, 64 << 10)
        from app.auth import create_key
        from app.db import make_engine, make_sessionmaker
        from app.models import User

        with TestClient(create_app(settings)) as client:
            with make_sessionmaker(make_engine(db))() as s:
                u = User(email="full@example.com")
                s.add(u)
                s.flush()
                _, token = create_key(s, u, secret=SECRET, scopes=("read", "write"))
                s.commit()
            h = {"Authorization": f"Bearer {token}"}
            # Without a Content-Length the check assumes the cap; with one, the real size: both refused.
            r = client.post(f"{API}/models", headers=h, files={"file": ("m.pt", os.urandom(512 << 10))})
            assert r.status_code == 507, r.text
            assert r.json()["code"] == "storage_full" and "nothing was stored" in r.json()["detail"]
            left = [p for p in storage.rglob("*") if p.is_file()]
            assert left == [], left
            assert client.get("/healthz").status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "storage full" in ready.json()["checks"]["storage"]


def test_storage_full_while_storing_results_fails_the_job_cleanly(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    with tiny_disk(disk, "4m") as real:
        storage = disk / "storage"
        rt = runtime(tmp_path, storage)
        job_id = create_job(rt.sessions, rt.storage, save_model(TinyNet(), tmp_path / "net.pt"),
                            budget="flops:2x", method="uniform")
        if real:
            fill(disk, 16 << 10)  # the inputs are stored; the outputs will not fit
        else:
            rt.storage.min_free_bytes = 1 << 60
        t, out = run_in_thread(job_id)
        t.join(240)
        assert not t.is_alive(), "the supervisor hung"
        job = get_job(rt.sessions, job_id)
        assert job.status == "failed", (job.status, job.error_code, job.error_message)
        assert job.error_code == "storage_full", (job.error_code, job.error_message)
        assert "storage is full" in job.error_message
        assert list(rt.scratch_root.iterdir()) == []
        # Nothing half-stored: the only artifact file is the job log the failed job points at.
        assert {a.name for a in job.artifacts} <= {"job.log"}
        on_disk = {p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file()}
        assert {k for k in on_disk if not k.startswith("models/")} == {a.storage_key for a in job.artifacts}
        assert out == ["failed:storage_full"]


def test_child_out_of_memory_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    rt = runtime(tmp_path, tmp_path / "storage", child_memory_bytes=3 << 30)
    job_id = create_job(rt.sessions, rt.storage, save_model(HogNet(), tmp_path / "hog.pt"), budget="flops:2x")
    started = time.monotonic()
    t, out = run_in_thread(job_id)
    t.join(180)
    assert not t.is_alive(), "the supervisor hung on an out-of-memory child"
    job = get_job(rt.sessions, job_id)
    assert job.status == "failed" and job.error_code == "out_of_memory", (job.error_code, job.error_message)
    assert "ran out of memory" in job.error_message and "3.0 GiB" in job.error_message
    assert time.monotonic() - started < 180
    assert list(rt.scratch_root.iterdir()) == []


def test_child_killed_by_sigkill_fails_with_a_reason(tmp_path: Path) -> None:
    rt = runtime(tmp_path, tmp_path / "storage")
    job_id = create_job(rt.sessions, rt.storage, save_model(LoaderNet(spin=50_000_000), tmp_path / "slow.pt"))
    t, out = run_in_thread(job_id)
    child = wait_for(lambda: sandbox_children(job_id), 60, "the sandbox child")[0]
    os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
    t.join(60)
    assert not t.is_alive()
    job = get_job(rt.sessions, job_id)
    assert job.status == "failed" and job.error_code == "sandbox_killed", (job.error_code, job.error_message)
    assert "out of memory" in job.error_message
    assert list(rt.scratch_root.iterdir()) == []
