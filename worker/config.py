"""Worker-only settings (``TENSORTRIM_WORKER_*``), next to the service's ``app.settings``.

They size the sandbox and the supervisor's rhythm; nothing here is a secret, and
none of it reaches the sandboxed child except as limits.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3
QUEUES = ("gpu", "cpu")


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENSORTRIM_WORKER_", extra="ignore")

    # Queue for jobs that do not say which device they want; None: gpu in full mode, cpu in embedded.
    default_queue: str | None = None
    # Where each attempt gets its scratch directory; None: <data_dir>/scratch.
    scratch_dir: Path | None = None
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    # Reconciler: how often it runs (beat) and how long a queued job may wait before it is sent again.
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    unclaimed_after_s: float = Field(default=300.0, gt=0)

    # Sandbox limits. CPU seconds default to the job's wall-clock limit times the thread count.
    threads: int = Field(default=4, gt=0)
    child_memory_bytes: int = Field(default=32 * GiB, gt=0)  # RLIMIT_AS, CPU jobs only
    child_file_bytes: int = Field(default=8 * GiB, gt=0)  # RLIMIT_FSIZE: largest file the child may write
    child_open_files: int = Field(default=1024, gt=0)
    child_processes: int = Field(default=4096, gt=0)  # RLIMIT_NPROC counts threads of the whole user
    # Network namespace, read-only file system outside scratch, no capabilities: needs root (or
    # CAP_SYS_ADMIN); without it the child still runs, with limits and a scrubbed environment.
    isolate: bool = True
    # Fail jobs instead of running them without full isolation (production GPU hosts).
    require_isolation: bool = False
    kill_grace_s: float = Field(default=5.0, ge=0)  # SIGTERM -> SIGKILL
    max_log_bytes: int = Field(default=4 * 1024 * 1024, gt=0)


@lru_cache
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()


def default_queue(mode: str, ws: WorkerSettings | None = None) -> str:
    ws = ws or get_worker_settings()
    if ws.default_queue:
        if ws.default_queue not in QUEUES:
            raise ValueError(f"TENSORTRIM_WORKER_DEFAULT_QUEUE must be one of {QUEUES}")
        return ws.default_queue
    return "gpu" if mode == "full" else "cpu"
