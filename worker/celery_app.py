"""The Celery application, built from ``app.settings``.

Full mode: Redis broker, one job per worker process (``max_tasks_per_child=1``).
Embedded mode: kombu's SQLAlchemy transport on a SQLite file next to the database.
Messages carry the job id only (JSON); the database is the source of truth, so
results are not stored and a lost or duplicated message is harmless: the claim
in ``app.jobs.state`` decides who runs a job, and the reconciler re-sends what
Redis lost.

``celery -A worker.celery_app worker -Q gpu`` / ``celery -A worker.celery_app beat``.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_init
from kombu import Queue

from app.settings import Settings, get_settings
from worker.config import QUEUES, default_queue, get_worker_settings

RUN_JOB = "tensortrim.run_job"
RECONCILE = "tensortrim.reconcile"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    ws = get_worker_settings()
    celery = Celery("tensortrim", broker=settings.broker_url, include=["worker.tasks"])
    full = settings.mode == "full"
    transport: dict[str, object] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Unacknowledged messages come back after this long: longer than any job, or a
        # running job's message would be delivered a second time (harmless, but noisy).
        transport["visibility_timeout"] = settings.job_time_limit_s + 3600
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # the attempt cap in the claim stops endless redelivery
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1 if full else None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue=default_queue(settings.mode, ws),
        task_routes={RUN_JOB: {"queue": default_queue(settings.mode, ws)}, RECONCILE: {"queue": "cpu"}},
        beat_schedule={
            "reconcile": {"task": RECONCILE, "schedule": ws.reconcile_interval_s, "options": {"expires": 60}},
        },
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return celery


@worker_init.connect
def _protect(**_: object) -> None:
    """The worker's main process holds the secrets in its environment: make it non-dumpable
    (inherited by the pool processes it forks) so no sandboxed child can read them from /proc."""
    from worker.sandbox import protect_process

    protect_process()


app = make_celery()
