"""Start-up and health endpoints in both modes."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.db import make_engine
from app.main import create_app
from app.migrate import StaleSchema, schema_is_current, upgrade
from app.settings import Settings

SECRET = "k" * 40
REDIS_TEST_DB = "redis://127.0.0.1:6379/15"


def _migrate(url: str) -> None:
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()


def test_embedded_mode_starts_from_nothing_and_is_ready(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", min_free_bytes=0)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.get("/readyz")
        assert r.status_code == 200, r.json()
        assert r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    engine = make_engine(settings.database_url)
    assert schema_is_current(engine)
    engine.dispose()


def test_full_mode_refuses_to_start_on_a_stale_schema(empty_pg_url: str) -> None:
    settings = Settings(mode="full", database_url=empty_pg_url, broker_url=REDIS_TEST_DB, secret_key=SECRET)
    with pytest.raises(StaleSchema), TestClient(create_app(settings)):
        pass


def test_full_mode_is_ready_on_postgres_and_redis(empty_pg_url: str, tmp_path: Path) -> None:
    url = empty_pg_url
    _migrate(url)
    settings = Settings(
        mode="full",
        database_url=url,
        broker_url=REDIS_TEST_DB,
        secret_key=SECRET,
        storage_dir=tmp_path,
        min_free_bytes=0,
    )
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
    assert r.status_code == 200, r.json()


def test_readyz_names_the_dependency_that_is_down(empty_pg_url: str, tmp_path: Path) -> None:
    url = empty_pg_url
    _migrate(url)
    settings = Settings(
        mode="full",
        database_url=url,
        broker_url="redis://127.0.0.1:1/0",  # nothing listens on port 1
        secret_key=SECRET,
        storage_dir=tmp_path,
        min_free_bytes=1 << 62,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["broker"] != "ok"
    assert checks["storage"].startswith("storage full")
