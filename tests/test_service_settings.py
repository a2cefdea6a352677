"""Settings: embedded mode works with no configuration; full mode insists on real secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/tensortrim"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TENSORTRIM_"):
            monkeypatch.delenv(name)


def test_embedded_defaults_live_under_the_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.mode == "embedded"
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/tensortrim.db"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path.resolve()}/broker.db"
    assert s.storage_dir == tmp_path / "storage"


def test_environment_variables_use_the_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TENSORTRIM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TENSORTRIM_MAX_UPLOAD_BYTES", "1000")
    s = Settings()
    assert (s.data_dir, s.max_upload_bytes) == (tmp_path, 1000)


def test_full_mode_refuses_the_default_secret() -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(mode="full", database_url=PG)
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(mode="full", database_url=PG, secret_key="short")


def test_full_mode_needs_a_database_and_defaults_to_redis() -> None:
    with pytest.raises(ValidationError, match="DATABASE_URL"):
        Settings(mode="full", secret_key="k" * 32)
    s = Settings(mode="full", secret_key="k" * 32, database_url=PG)
    assert s.broker_url.startswith("redis://")


def test_secret_is_not_shown_in_repr() -> None:
    assert "k" * 32 not in repr(Settings(mode="full", secret_key="k" * 32, database_url=PG))


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValidationError):
        Settings(max_upload_bytes=0)
