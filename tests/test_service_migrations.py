"""The Alembic history builds exactly the schema the models describe, on both backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from app.db import Base, make_engine
from app.migrate import (
    StaleSchema,
    alembic_config,
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    schema_is_current,
    upgrade,
)


@pytest.fixture
def empty_engine(empty_db_url: str) -> Iterator[Engine]:
    engine = make_engine(empty_db_url)
    yield engine
    engine.dispose()


def _diff(engine: Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def test_history_has_one_head() -> None:
    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1


def test_upgrade_to_head_matches_models(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    assert schema_is_current(empty_engine)
    assert _diff(empty_engine) == []


def test_models_and_migrations_agree_on_every_table(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    tables = set(inspect(empty_engine).get_table_names()) - {"alembic_version"}
    assert tables == set(Base.metadata.tables)


def test_downgrade_to_base_removes_everything_and_upgrade_again_works(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    downgrade(empty_engine, "base")
    assert set(inspect(empty_engine).get_table_names()) <= {"alembic_version"}
    assert current_revision(empty_engine) is None
    upgrade(empty_engine)
    assert current_revision(empty_engine) == head_revision()


def test_full_mode_refuses_a_stale_schema(empty_engine: Engine) -> None:
    with pytest.raises(StaleSchema, match="python -m app.migrate"):
        ensure_schema(empty_engine, auto_upgrade=False)
    assert not schema_is_current(empty_engine)


def test_embedded_mode_migrates_itself(empty_engine: Engine) -> None:
    ensure_schema(empty_engine, auto_upgrade=True)
    assert schema_is_current(empty_engine)
    ensure_schema(empty_engine, auto_upgrade=False)  # now current: no error
