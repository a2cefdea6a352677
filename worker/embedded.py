"""Embedded mode's worker: a Celery worker (solo pool) on a thread of the API process,
consuming both queues from kombu's SQLAlchemy transport, plus a reconciler thread.

One job at a time; each job still runs in its own sandboxed child process.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.worker import WorkController

from app.settings import Settings
from worker.config import QUEUES, WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)


class EmbeddedWorker:
    def __init__(self, settings: Settings, ws: WorkerSettings | None = None, *, celery: Celery | None = None) -> None:
        from worker import tasks
        from worker.celery_app import make_celery

        self.settings = settings
        self.ws = ws or get_worker_settings()
        self.celery = celery or make_celery(settings)
        self.runtime = tasks.configure(settings, self.ws)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.controller: Any = None

    def start(self, *, timeout: float = 30.0) -> None:
        ready = threading.Event()

        class Controller(WorkController):  # type: ignore[misc]
            def on_consumer_ready(self, consumer: Any) -> None:
                ready.set()

        self.controller = Controller(
            app=self.celery, concurrency=1, pool="solo", queues=list(QUEUES), hostname="embedded@tensortrim",
            without_heartbeat=True, without_mingle=True, without_gossip=True, loglevel="WARNING",
        )
        worker_thread = threading.Thread(target=self.controller.start, name="tensortrim-worker", daemon=True)
        reconcile_thread = threading.Thread(target=self._reconcile_loop, name="tensortrim-reconcile", daemon=True)
        self._threads = [worker_thread, reconcile_thread]
        for t in self._threads:
            t.start()
        if not ready.wait(timeout):
            raise RuntimeError("the embedded worker did not start")

    def _reconcile_loop(self) -> None:
        from worker.queue import enqueue_job, queue_for
        from worker.tasks import reconcile

        while not self._stop.wait(self.ws.reconcile_interval_s):
            try:
                reconcile(self.runtime, send=lambda job: enqueue_job(job.id, queue_for(job), app=self.celery))
            except Exception:  # noqa: BLE001  (keep reconciling; the next round may succeed)
                log.exception("reconcile failed")

    def stop(self, timeout: float = 30.0) -> None:
        from celery.worker import state

        self._stop.set()
        if self.controller is not None:
            state.should_terminate = 0
            self._threads[0].join(timeout)
            state.should_terminate = None
        self._threads[1].join(5)
