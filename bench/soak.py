"""Soak run: many concurrent uploads and jobs against a full-mode stack on loopback, while a
worker is killed with SIGKILL once and Redis is restarted once.

The stack is ``bench._stack.full_stack`` (own Postgres database, uvicorn subprocess) with
the broker moved to a PRIVATE ``redis-server`` on a free port (so restarting it disturbs
nobody), plus two real Celery workers and the reconciler (``worker.tasks.reconcile``,
every 2 s, as beat would run it). Clients upload small TorchScript models and start jobs
(with an ``Idempotency-Key``, retried on 5xx / connection errors) for ``--seconds``; then
nothing new is sent and the run waits for every job to finish.

Checks afterwards: every job the clients were told about exists and is terminal (none
lost, none stuck), every stored artifact's bytes match its sha256 (downloaded through the
API and on disk), every uploaded model's stored bytes match what was sent.

Run: python -m bench.soak [--seconds 120] [--clients 4] [--max-in-flight 6]
Writes bench/results/soak.json and bench/results/soak.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import torch

from bench._stack import CELERY, Service, _spawn, full_stack, wait_for

RESULTS = Path(__file__).resolve().parent / "results"
TERMINAL = {"succeeded", "failed", "cancelled"}


class Net(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = torch.nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


_SCRIPT_LOCK = threading.Lock()  # torch.jit.script is not thread-safe


def model_bytes(seed: int) -> bytes:
    with _SCRIPT_LOCK:
        torch.manual_seed(seed)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(Net(8 + 4 * (seed % 3)).eval()), buf)
        return buf.getvalue()


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {"upload": [], "create_job": [], "poll": []}
        self.errors: Counter[str] = Counter()
        self.uploads: list[dict[str, Any]] = []  # {id, sha256}
        self.jobs: dict[str, str] = {}  # idempotency key -> job id
        self.in_flight: set[str] = set()

    def time(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latency[kind].append(seconds)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what] += 1


def request(client: httpx.Client, rec: Recorder, kind: str, method: str, url: str, *, attempts: int = 20,
            **kwargs: Any) -> httpx.Response | None:
    """One API call, retried on connection errors and 5xx (outages are part of the run)."""
    for _ in range(attempts):
        t = time.perf_counter()
        try:
            r = client.request(method, url, **kwargs)
        except httpx.TransportError as e:
            rec.error(f"{kind}: {type(e).__name__}")
            time.sleep(1)
            continue
        rec.time(kind, time.perf_counter() - t)
        if r.status_code >= 500:
            rec.error(f"{kind}: HTTP {r.status_code}")
            time.sleep(float(r.headers.get("Retry-After", "1")))
            continue
        return r
    return None


def client_loop(base: str, headers: dict[str, str], rec: Recorder, stop: threading.Event, max_in_flight: int,
                seed0: int) -> None:
    seed = seed0
    with httpx.Client(base_url=base, headers=headers, timeout=60, trust_env=False) as client:
        while not stop.is_set():
            seed += 1
            data = model_bytes(seed)
            r = request(client, rec, "upload", "POST", "/api/v1/models", files={"file": (f"net{seed}.pt", data)})
            if r is None or r.status_code != 201:
                rec.error(f"upload: {r.status_code if r is not None else 'gave up'}")
                continue
            model = r.json()
            with rec.lock:
                rec.uploads.append({"id": model["id"], "sha256": hashlib.sha256(data).hexdigest()})
                busy = len(rec.in_flight) >= max_in_flight
            if busy:  # keep uploading, but do not queue more work than the workers can drain
                stop.wait(1.0)
                continue
            key = uuid.uuid4().hex
            body = {"model_id": model["id"], "input_spec": "3,16,16", "budget": "flops:2x", "method": "uniform"}
            r = request(client, rec, "create_job", "POST", "/api/v1/jobs", json=body,
                        headers={"Idempotency-Key": key})
            if r is None or r.status_code not in (200, 201):
                rec.error(f"create_job: {r.status_code if r is not None else 'gave up'}")
                continue
            with rec.lock:
                rec.jobs[key] = r.json()["id"]
                rec.in_flight.add(r.json()["id"])


def poll_loop(base: str, headers: dict[str, str], rec: Recorder, done: threading.Event) -> None:
    with httpx.Client(base_url=base, headers=headers, timeout=30, trust_env=False) as client:
        while not done.is_set():
            with rec.lock:
                ids = list(rec.in_flight)
            for job_id in ids:
                r = request(client, rec, "poll", "GET", f"/api/v1/jobs/{job_id}", attempts=1)
                if r is not None and r.status_code == 200 and r.json()["status"] in TERMINAL:
                    with rec.lock:
                        rec.in_flight.discard(job_id)
            done.wait(1.0)


def start_worker(stack: Any, name: str) -> Service:
    argv = [CELERY, "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu", "--concurrency", "1", "-n",
            f"{name}@%h", "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "INFO"]
    w = _spawn(name, argv, stack.env, stack.work_dir / f"{name}.log")
    wait_for(lambda: "ready." in w.log_path.read_text(errors="replace"), 120, f"worker {name}", w.tail)
    return w


def reconcile_loop(env: dict[str, str], stop: threading.Event, counts: Counter[str]) -> None:
    from app.settings import Settings
    from worker import tasks
    from worker.celery_app import make_celery
    from worker.config import WorkerSettings
    from worker.queue import enqueue_job, queue_for

    settings = Settings(**{k.removeprefix("TENSORTRIM_").lower(): v for k, v in env.items()
                           if k.startswith("TENSORTRIM_") and not k.startswith("TENSORTRIM_WORKER_")})
    rt = tasks.configure(settings, WorkerSettings(unclaimed_after_s=float(env["TENSORTRIM_WORKER_UNCLAIMED_AFTER_S"])))
    celery = make_celery(settings)
    while not stop.wait(2.0):
        try:
            for k, v in tasks.reconcile(rt, send=lambda job: enqueue_job(job.id, queue_for(job), app=celery)).items():
                counts[k] += v
        except Exception as e:  # noqa: BLE001  (outages are part of the run)
            counts[f"error {type(e).__name__}"] += 1


def verify(stack: Any, rec: Recorder) -> dict[str, Any]:
    from app.db import make_engine, make_sessionmaker
    from app.models import Artifact, Job, ModelFile
    from app.storage import LocalStorage

    storage = LocalStorage(stack.data_dir / "storage")
    engine = make_engine(stack.env["TENSORTRIM_DATABASE_URL"])
    out: dict[str, Any] = {"artifacts_checked": 0, "artifact_mismatches": [], "model_mismatches": [],
                           "lost_jobs": [], "non_terminal": [], "downloads_checked": 0}
    try:
        with make_sessionmaker(engine)() as s, httpx.Client(base_url=stack.base_url, headers=stack.headers,
                                                            timeout=60, trust_env=False) as client:
            jobs = {str(j.id): j for j in s.query(Job).all()}
            out["lost_jobs"] = sorted(set(rec.jobs.values()) - set(jobs))
            out["non_terminal"] = sorted(j for j, job in jobs.items() if job.status not in TERMINAL)
            out["status"] = dict(Counter(job.status for job in jobs.values()))
            out["error_codes"] = dict(Counter(job.error_code for job in jobs.values() if job.error_code))
            out["attempts"] = dict(Counter(job.attempt for job in jobs.values()))
            for a in s.query(Artifact).all():
                data = storage.path(a.storage_key).read_bytes()
                out["artifacts_checked"] += 1
                if hashlib.sha256(data).hexdigest() != a.sha256 or len(data) != a.size_bytes:
                    out["artifact_mismatches"].append(f"{a.job_id}/{a.name}")
                if a.name == "model.pt":  # and through the API, as a client downloads it
                    r = client.get(f"/api/v1/jobs/{a.job_id}/artifacts/{a.name}")
                    out["downloads_checked"] += 1
                    if r.status_code != 200 or hashlib.sha256(r.content).hexdigest() != a.sha256:
                        out["artifact_mismatches"].append(f"download {a.job_id}/{a.name}")
            models = {str(m.id): m for m in s.query(ModelFile).all()}
            for up in rec.uploads:
                m = models.get(up["id"])
                if m is None or m.sha256 != up["sha256"] or \
                        hashlib.sha256(storage.path(m.storage_key).read_bytes()).hexdigest() != up["sha256"]:
                    out["model_mismatches"].append(up["id"])
            out["jobs_in_db"] = len(jobs)
            out["models_in_db"] = len(models)
    finally:
        engine.dispose()
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def run(stack: Any, args: argparse.Namespace, rec: Recorder, faults: list[dict[str, Any]],
        reconciled: Counter[str], redis: Any, workers: list[Service]) -> dict[str, Any]:
    """The timed run with its two faults, the drain, and the checks. ``workers`` is
    filled here and stopped by the caller."""
    workers.extend([start_worker(stack, "soak-a"), start_worker(stack, "soak-b")])
    stop, done, rstop = threading.Event(), threading.Event(), threading.Event()
    threads = [threading.Thread(target=client_loop, args=(stack.base_url, stack.headers, rec, stop,
                                                           args.max_in_flight, 1000 * i), daemon=True)
               for i in range(args.clients)]
    threads.append(threading.Thread(target=poll_loop, args=(stack.base_url, stack.headers, rec, done),
                                    daemon=True))
    recon = threading.Thread(target=reconcile_loop, args=(stack.env, rstop, reconciled), daemon=True)
    start = time.monotonic()
    for t in [*threads, recon]:
        t.start()
    killed = restarted = False
    while time.monotonic() - start < args.seconds:
        elapsed = time.monotonic() - start
        if not killed and elapsed > args.seconds * 0.33:
            victim = workers[0]
            os.killpg(victim.pid, signal.SIGKILL)
            victim.proc.wait(10)
            victim.stop()
            faults.append({"at_s": round(elapsed, 1), "fault": "kill -9 worker soak-a"})
            workers[0] = start_worker(stack, "soak-c")
            killed = True
        if not restarted and elapsed > args.seconds * 0.66:
            redis.restart(down_s=1.0)
            faults.append({"at_s": round(elapsed, 1), "fault": "redis restart (messages lost)"})
            restarted = True
        time.sleep(0.5)
    stop.set()
    for t in threads[:-1]:
        t.join(120)
    submitted_at = time.monotonic()
    wait_for(lambda: not rec.in_flight, args.drain_timeout, "every job to finish")
    drain_s = time.monotonic() - submitted_at
    done.set()
    rstop.set()
    threads[-1].join(30)
    recon.join(30)
    result = verify(stack, rec)
    result["drain_s"] = round(drain_s, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-in-flight", type=int, default=6)
    p.add_argument("--drain-timeout", type=float, default=600.0)
    args = p.parse_args(argv)

    from tests.test_faults_support import PrivateRedis

    work = Path(tempfile.mkdtemp(prefix="tt-soak-"))
    redis = PrivateRedis(work / "redis")
    extra = {
        "TENSORTRIM_BROKER_URL": redis.url,
        "TENSORTRIM_MIN_FREE_BYTES": "0",
        "TENSORTRIM_HEARTBEAT_STALE_S": "10",
        "TENSORTRIM_MAX_ATTEMPTS": "3",
        "TENSORTRIM_QUOTA_CONCURRENT_JOBS": "1000",
        "TENSORTRIM_RATE_LIMIT_PER_S": "0",
        "TENSORTRIM_WORKER_HEARTBEAT_INTERVAL_S": "1",
        "TENSORTRIM_WORKER_THREADS": "1",
        "TENSORTRIM_WORKER_KILL_GRACE_S": "1",
        "TENSORTRIM_WORKER_UNCLAIMED_AFTER_S": "5",
    }
    rec = Recorder()
    faults: list[dict[str, Any]] = []
    reconciled: Counter[str] = Counter()
    result: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        with full_stack(extra_env=extra) as stack:
            workers: list[Service] = []
            try:
                result = run(stack, args, rec, faults, reconciled, redis, workers)
            finally:
                for w in workers:
                    w.stop(grace=5)
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)

    lat = {k: {"n": len(v), "p50_ms": pct(v, 0.5), "p95_ms": pct(v, 0.95),
               "mean_ms": round(statistics.mean(v) * 1000, 1) if v else None} for k, v in rec.latency.items()}
    summary = {
        "seconds": args.seconds, "clients": args.clients, "max_in_flight": args.max_in_flight,
        "wall_s": round(time.monotonic() - t0, 1), "uploads": len(rec.uploads), "jobs_created": len(rec.jobs),
        "faults": faults, "reconciler": dict(reconciled), "client_errors_retried": dict(rec.errors),
        "latency": lat, **result, "host": platform.node(), "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    ok = (not summary["lost_jobs"] and not summary["non_terminal"] and not summary["artifact_mismatches"]
          and not summary["model_mismatches"])
    summary["ok"] = ok
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(summary, indent=2))
    rows = [
        ("run", f"{args.seconds:.0f} s, {args.clients} clients, <= {args.max_in_flight} jobs in flight, 2 workers"),
        ("faults", "; ".join(f"{f['fault']} at {f['at_s']} s" for f in faults)),
        ("uploads (verified)", f"{len(rec.uploads)} ({len(rec.uploads) - len(summary['model_mismatches'])} ok)"),
        ("jobs created / in DB", f"{len(rec.jobs)} / {summary.get('jobs_in_db')}"),
        ("job states", json.dumps(summary.get("status", {}))),
        ("error codes", json.dumps(summary.get("error_codes", {}))),
        ("attempts", json.dumps(summary.get("attempts", {}))),
        ("lost / stuck", f"{len(summary['lost_jobs'])} / {len(summary['non_terminal'])}"),
        ("artifacts verified", f"{summary['artifacts_checked']} on disk, {summary['downloads_checked']} downloads, "
                               f"{len(summary['artifact_mismatches'])} mismatches"),
        ("reconciler", json.dumps(dict(reconciled))),
        ("client retries", json.dumps(dict(rec.errors))),
        ("drain after submit stop", f"{summary.get('drain_s')} s"),
        *[(f"{k} latency", f"n={v['n']} p50 {v['p50_ms']} ms, p95 {v['p95_ms']} ms") for k, v in lat.items()],
        ("verdict", "OK" if ok else "FAILED"),
    ]
    width = max(len(r[0]) for r in rows)
    table = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    print(table)
    md = ["# Soak run", "", f"`python -m bench.soak --seconds {args.seconds:g} --clients {args.clients}` "
          f"on {platform.node()} ({time.strftime('%Y-%m-%d %H:%M')})", "", "| what | result |", "|---|---|",
          *[f"| {k} | {v} |" for k, v in rows]]
    (RESULTS / "soak.md").write_text("\n".join(md) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
