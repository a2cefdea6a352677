"""Fixtures and helpers shared by the tests/test_api_*.py files.

The app under test runs against the same migrated database as the ``engine``
fixture (SQLite and the real Postgres), with its own storage directory. The only
fake is the broker call (``enqueue_job``): it records the job ids it is given and
checks each job is already committed when it is sent.
"""

from __future__ import annotations

import io
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.api.deps import get_enqueue
from app.auth import create_key
from app.db import make_sessionmaker
from app.main import create_app
from app.models import Job, User
from app.settings import Settings

SECRET = "api-test-secret-" + "x" * 32
API = "/api/v1"


class TinyNet(torch.nn.Module):
    """Two convs and a linear layer on 3x16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


_MODEL_BYTES: bytes | None = None


def model_bytes() -> bytes:
    """A scripted TinyNet as torch.jit.save writes it (built once per test session)."""
    global _MODEL_BYTES
    if _MODEL_BYTES is None:
        torch.manual_seed(0)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(TinyNet().eval()), buf)
        _MODEL_BYTES = buf.getvalue()
    return _MODEL_BYTES


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def image_zip_bytes(classes: dict[str, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls, n in classes.items():
            for i in range(n):
                img = io.BytesIO()
                Image.new("RGB", (16, 16), (i * 10 % 255, 0, 0)).save(img, format="PNG")
                zf.writestr(f"root/{cls}/{i:03d}.png", img.getvalue())
    return buf.getvalue()


@dataclass
class Enqueued:
    """The recording fake of the broker call: (job id, queue) per call."""

    sessions: Callable[[], Session]
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    committed: list[bool] = field(default_factory=list)

    def __call__(self, job_id: str, queue: str | None = None) -> None:
        with self.sessions() as s:  # a new connection sees only committed rows
            self.committed.append(s.get(Job, uuid.UUID(job_id)) is not None)
        self.calls.append((job_id, queue))


@dataclass
class Api:
    client: TestClient
    app: FastAPI
    settings: Settings
    engine: Engine
    enqueued: Enqueued

    def user(self, email: str | None = None, scopes: tuple[str, ...] = ("read", "write")) -> dict[str, str]:
        """A new user with a key; returns the Authorization header."""
        with make_sessionmaker(self.engine)() as s:
            u = User(email=email or f"{uuid.uuid4().hex[:10]}@example.com")
            s.add(u)
            s.flush()
            _, token = create_key(s, u, secret=SECRET, scopes=scopes)
            s.commit()
        return {"Authorization": f"Bearer {token}"}

    def session(self) -> Session:
        return make_sessionmaker(self.engine)()

    @property
    def storage_dir(self) -> Path:
        return self.settings.storage_dir

    def stored_files(self) -> list[Path]:
        """Every file in storage, temporary ones included."""
        return sorted(p for p in self.storage_dir.rglob("*") if p.is_file())

    def upload_model(
        self, headers: dict[str, str], data: bytes | None = None, *, input_spec: str | None = None
    ) -> dict[str, Any]:
        files = {"file": ("tiny.pt", data if data is not None else model_bytes(), "application/octet-stream")}
        form = {"input_spec": input_spec} if input_spec else None
        r = self.client.post(f"{API}/models", headers=headers, files=files, data=form)
        assert r.status_code == 201, r.json()
        return r.json()  # type: ignore[no-any-return]

    def create_job(self, headers: dict[str, str], model_id: str, **body: Any) -> dict[str, Any]:
        payload = {"model_id": model_id, "input_spec": "3,16,16", "budget": "flops:2x", **body}
        r = self.client.post(f"{API}/jobs", headers=headers, json=payload)
        assert r.status_code == 201, r.json()
        return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def make_api(engine: Engine, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Build a running app (lifespan entered) with settings overrides; closed after the test."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> Api:
        values: dict[str, Any] = {
            "mode": "embedded",
            "data_dir": tmp_path / "data",
            "database_url": engine.url.render_as_string(hide_password=False),
            "storage_dir": tmp_path / f"storage{len(clients)}",
            "min_free_bytes": 0,
            "secret_key": SECRET,
            "max_upload_bytes": 4 << 20,
        }
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(settings)
        enqueued = Enqueued(make_sessionmaker(engine))
        app.dependency_overrides[get_enqueue] = lambda: enqueued
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return Api(client, app, settings, engine, enqueued)

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()


def assert_problem(r: Any, status: int, code: str | None = None, field: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem detail with this status (and code / field)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers["content-type"]
    body = r.json()
    assert {"type", "title", "status", "detail", "code"} <= body.keys(), body
    assert body["status"] == status
    assert body["type"].endswith(body["code"])
    assert body["detail"]
    if code is not None:
        assert body["code"] == code, body
    if field is not None:
        assert body["field"] == field, body
    return body  # type: ignore[no-any-return]
