"""Shared fixtures. The service fixtures below run every database test on SQLite and
on the real Postgres (127.0.0.1:5432), each in a database made for this test session
and dropped after it. They connect lazily: engine-only tests never touch a database."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine, create_engine, delete, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

if TYPE_CHECKING:  # app is imported lazily so that engine-only test runs do not depend on it
    from app.models import User

PG_ADMIN_URL = os.environ.get("TENSORTRIM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def pg_database() -> Iterator[Callable[[], str]]:
    """A factory of new Postgres databases, all dropped at the end of the session.
    (Each DROP DATABASE costs a checkpoint, ~2 s: tests reuse databases where they can.)"""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect():
            pass
    except OperationalError as e:
        pytest.skip(f"Postgres not reachable at {PG_ADMIN_URL}: {e.orig}")
    created: list[str] = []

    def new() -> str:
        name = f"tensortrim_test_{secrets.token_hex(6)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    yield new
    with admin.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def _pg_scratch(pg_database: Callable[[], str]) -> str:
    return pg_database()


@pytest.fixture
def empty_pg_url(_pg_scratch: str) -> str:
    """A Postgres database with no tables: one scratch database, wiped before each test."""
    engine = create_engine(_pg_scratch, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return _pg_scratch


def _sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / f'{uuid.uuid4().hex}.db'}"


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a new database with no tables, for migration tests."""
    return _sqlite_url(tmp_path) if request.param == "sqlite" else request.getfixturevalue("empty_pg_url")


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One database per backend, migrated to head once per test session."""
    from app.db import make_engine
    from app.migrate import upgrade

    if request.param == "sqlite":
        engine = make_engine(_sqlite_url(tmp_path_factory.mktemp("db")))
    else:  # a database of its own: the scratch one is wiped per test
        engine = make_engine(request.getfixturevalue("pg_database")())
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(migrated_engine: Engine) -> Iterator[Engine]:
    """The migrated database, emptied after each test."""
    from app.db import Base

    yield migrated_engine
    with migrated_engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(delete(table))


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    from app.db import make_sessionmaker

    with make_sessionmaker(engine)() as s:
        yield s


@pytest.fixture
def user(session: Session) -> User:
    from app.models import User

    u = User(email=f"{uuid.uuid4().hex[:8]}@example.com")
    session.add(u)
    session.commit()
    return u


@pytest.fixture
def make_job(session: Session, user: User) -> Callable[..., uuid.UUID]:
    """Create a queued job (and the model it points at); returns the job id, committed."""
    from app.models import Job, ModelFile

    def make(**fields: object) -> uuid.UUID:
        model = ModelFile(
            owner_id=user.id, name="net.pt", storage_key=f"models/00/{uuid.uuid4().hex}", sha256="0" * 64, size_bytes=1
        )
        session.add(model)
        session.flush()
        job = Job(owner_id=user.id, model_id=model.id, input_spec="3,32,32", **fields)
        session.add(job)
        session.commit()
        return job.id

    return make


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module: the tensors in engine tests are small, and on
    2 shared cores multi-threaded BLAS spin-waits cost far more than they gain."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
