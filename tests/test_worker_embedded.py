"""Embedded mode: SQLite, kombu's SQLAlchemy transport and a Celery worker on a thread of
this process (what ``tensortrim serve`` starts) run a job end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.test_worker_support import TinyNet, create_job, save_model, wait_status


def _run_embedded(tmp_path: Path, **job_fields: Any) -> tuple[Any, Any]:
    """Run one job on the embedded stack; returns (finished job, storage)."""
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
    job_id = create_job(sessions, storage, save_model(TinyNet(), tmp_path / "net.pt"), **job_fields)

    worker = EmbeddedWorker(settings, WorkerSettings(heartbeat_interval_s=0.5, threads=1, reconcile_interval_s=1))
    worker.start()
    try:
        enqueue_job(job_id, "cpu", app=worker.celery)
        job = wait_status(sessions, job_id, {"succeeded", "failed"}, 240)
    finally:
        worker.stop()
        engine.dispose()
    assert job.status == "succeeded", (job.error_code, job.error_message)
    return job, storage


def test_embedded_worker_runs_a_job_on_sqlite_with_the_sqlalchemy_broker(tmp_path: Path) -> None:
    job, storage = _run_embedded(tmp_path)
    assert {a.name for a in job.artifacts} == {"model.pt", "model.pt2", "report.json", "report.html", "job.log"}
    report = json.loads(storage.path(next(a for a in job.artifacts if a.name == "report.json").storage_key).read_text())
    assert job.metrics["macs_after"] == report["macs_after"] < report["macs_before"]
    assert [e.status for e in job.events if e.kind == "status"] == ["running", "succeeded"]


def test_a_sweep_job_keeps_its_own_budgets_model_and_stores_the_curve(tmp_path: Path) -> None:
    job, storage = _run_embedded(tmp_path, budget="flops:2x", options={"sweep": ["flops:4x", "flops:3x"]})

    def artifact(name: str) -> bytes:
        return storage.path(next(a for a in job.artifacts if a.name == name).storage_key).read_bytes()

    assert {a.name for a in job.artifacts} == {"model.pt", "model.pt2", "report.json", "report.html", "sweep.json",
                                               "sweep.html", "job.log"}
    points = job.metrics["sweep"]
    assert [p["budget"] for p in points] == ["flops:2x", "flops:4x", "flops:3x"]
    ratios = [p["macs_ratio"] for p in points]
    assert all(r >= want * (1 - 1e-9) for r, want in zip(ratios, (2, 4, 3))), ratios  # each budget met
    assert ratios[0] < ratios[2] < ratios[1], ratios
    assert all(p["metric"] == "agreement" and 0 <= p["accuracy"] <= 1 for p in points)  # no data set: agreement
    assert points == [{k: v for k, v in p.items() if k != "dir"} for p in json.loads(artifact("sweep.json"))["sweep"]]
    # the job's own files are the first budget's
    report = json.loads(artifact("report.json"))
    assert report["budget"] == "flops:2x"
    assert report["macs_after"] == points[0]["macs_after"] == job.metrics["macs_after"]
    assert b"<svg" in artifact("sweep.html")
    progress = [e.progress for e in job.events if e.kind == "progress"]
    assert progress == sorted(progress) and {e.phase for e in job.events if e.kind == "progress"} >= {"sweep"}


def test_a_manual_job_gets_exactly_the_ranks_it_asked_for(tmp_path: Path) -> None:
    job, _ = _run_embedded(tmp_path, budget="flops:2x", method="manual",
                           options={"method_options": {"ranks": {"c2": [4, 8], "fc": [3]}}})
    assert sorted((r.layer, r.form, list(r.ranks)) for r in job.layer_ranks) == [("c2", "tucker2", [4, 8]),
                                                                                 ("fc", "svd", [3])]
    assert job.metrics["rank_method"] == "manual"


def test_progress_that_moves_reaches_the_job_row_between_heartbeats() -> None:
    """A poller of GET /jobs/{id} reads the row: a long phase must move there every couple of
    seconds, not once per heartbeat interval (10 s by default), or its ETA only climbs."""
    import uuid

    from worker.tasks import PROGRESS_WRITE_MIN_S, Supervisor

    sup = Supervisor(None, uuid.uuid4(), 1)  # type: ignore[arg-type]  # the runtime is only for publishing
    sup.last_heartbeat, interval = 100.0, 10.0
    assert not sup.write_due(100.0 + PROGRESS_WRITE_MIN_S, interval)  # nothing moved
    sup._overall.update("ranks", 0.5)
    assert not sup.write_due(100.0 + PROGRESS_WRITE_MIN_S / 2, interval)  # moved, but written a moment ago
    assert sup.write_due(100.0 + PROGRESS_WRITE_MIN_S, interval)
    sup.written = sup.overall  # what heartbeat() records
    assert not sup.write_due(100.0 + PROGRESS_WRITE_MIN_S, interval)
    assert sup.write_due(100.0 + interval, interval)  # the heartbeat itself, moved or not
