"""Embedded mode: SQLite, kombu's SQLAlchemy transport and a Celery worker on a thread of
this process (what ``tensortrim serve`` starts) run a job end to end."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_worker_support import TinyNet, create_job, save_model, wait_status


def test_embedded_worker_runs_a_job_on_sqlite_with_the_sqlalchemy_broker(tmp_path: Path) -> None:
    from app.db import make_engine, make_sessionmaker
    from app.migrate import upgrade
    from app.settings import Settings
    from app.storage import LocalStorage
    from worker.config import WorkerSettings
    from worker.embedded import EmbeddedWorker
    from worker.queue import enqueue_job

    data = tmp_path / "data"
    data.mkdir()
    settings = Settings(mode="embedded", data_dir=data, min_free_bytes=0)
    assert settings.broker_url.startswith("sqla+sqlite:///") and settings.database_url.startswith("sqlite:///")
    engine = make_engine(settings.database_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    storage = LocalStorage(settings.storage_dir)
    job_id = create_job(sessions, storage, save_model(TinyNet(), tmp_path / "net.pt"))

    worker = EmbeddedWorker(settings, WorkerSettings(heartbeat_interval_s=0.5, threads=1, reconcile_interval_s=1))
    worker.start()
    try:
        enqueue_job(job_id, "cpu", app=worker.celery)
        job = wait_status(sessions, job_id, {"succeeded", "failed"}, 150)
    finally:
        worker.stop()
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert {a.name for a in job.artifacts} == {"model.pt", "model.pt2", "report.json", "report.html", "job.log"}
    report = json.loads(storage.path(next(a for a in job.artifacts if a.name == "report.json").storage_key).read_text())
    assert job.metrics["macs_after"] == report["macs_after"] < report["macs_before"]
    assert [e.status for e in job.events if e.kind == "status"] == ["running", "succeeded"]
    engine.dispose()
