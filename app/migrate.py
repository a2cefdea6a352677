"""Schema upgrades with Alembic, run from Python.

Embedded mode upgrades itself at start-up; full mode refuses to start on a stale
schema (several API replicas and workers must not race to migrate: an operator
runs ``python -m app.migrate`` once per deploy).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class StaleSchema(RuntimeError):
    """The database is not at the code's migration head."""


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn  # migrations/env.py uses it instead of opening its own
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrations/ has no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema_is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Upgrade (embedded mode) or insist the schema is already at head (full mode)."""
    if schema_is_current(engine):
        return
    if not auto_upgrade:
        raise StaleSchema(
            f"database is at revision {current_revision(engine)!r}, code expects {head_revision()!r}: "
            "run `python -m app.migrate` first"
        )
    upgrade(engine)


def main() -> None:
    from app.db import make_engine
    from app.settings import get_settings

    settings = get_settings()
    if settings.mode == "embedded":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)}")


if __name__ == "__main__":
    main()
