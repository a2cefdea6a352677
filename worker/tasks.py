"""The trusted supervisor (``tensortrim.run_job``) and the reconciler (``tensortrim.reconcile``).

The supervisor holds the database, broker and storage; it never loads the user's
model. For one attempt it: claims the job (fenced by attempt from then on), copies the
inputs into a fresh scratch directory, starts the sandboxed child, turns the child's
progress into heartbeats, database progress, JobEvent rows and Redis events, kills the
child on cancel / timeout / lost claim, re-checks what the child wrote, and stores the
artifacts (with sha256), metrics and per-layer ranks in the same transaction that
marks the job succeeded. Failures keep the engine's error code and a message meant
for the user; details (secrets scrubbed) go to the ``job.log`` artifact.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import shared_task
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, utcnow
from app.jobs import state
from app.models import Artifact, Dataset, Job, JobEvent, JobStatus, LayerRank, ModelFile
from app.settings import Settings, get_settings
from app.storage import Storage, StorageError, StoredFile, make_storage
from compression.progress import Overall
from worker import events
from worker.child import OUTPUT_NAMES
from worker.config import WorkerSettings, get_worker_settings
from worker.sandbox import Limits, Progress, Sandbox, protect_process, read_result_file

log = logging.getLogger(__name__)

REQUIRED_OUTPUTS = ("model.pt", "model.pt2", "report.json")
MAX_RESULT_BYTES = 1 << 20
MAX_REPORT_BYTES = 64 << 20
MAX_ZIP_ENTRIES = 100_000
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
PHASE_EVENT_MIN_S = 1.0  # at most one progress JobEvent per phase per second
PROGRESS_WRITE_MIN_S = 2.0  # progress that moved reaches the job's row at most this often between heartbeats


# --------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    settings: Settings
    ws: WorkerSettings
    sessions: sessionmaker[Session]
    storage: Storage
    scratch_root: Path
    redis_url: str | None
    sent: dict[str, float] = field(default_factory=dict)  # reconciler's memory when Redis is absent


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def configure(settings: Settings | None = None, ws: WorkerSettings | None = None) -> Runtime:
    """Build (or rebuild) this process's runtime: embedded mode passes its own settings."""
    global _runtime
    settings = settings or get_settings()
    ws = ws or get_worker_settings()
    engine = make_engine(settings.database_url)
    scratch_root = (ws.scratch_dir or settings.data_dir / "scratch").resolve()
    scratch_root.mkdir(parents=True, exist_ok=True)
    os.chmod(scratch_root, 0o700)
    url = settings.broker_url if settings.broker_url.startswith(("redis://", "rediss://")) else None
    with _runtime_lock:
        _runtime = Runtime(settings, ws, make_sessionmaker(engine),
                           make_storage(settings),
                           scratch_root, url)
    return _runtime


def runtime() -> Runtime:
    return _runtime or configure()


# --------------------------------------------------------------------------- tasks
@shared_task(name="tensortrim.run_job", ignore_result=True, acks_late=True)
def run_job_task(job_id: str) -> str:
    return run_job(job_id)


@shared_task(name="tensortrim.reconcile", ignore_result=True)
def reconcile_task() -> dict[str, int]:
    return reconcile()


# --------------------------------------------------------------------------- supervisor
class JobLost(Exception):
    """This attempt no longer holds the job: stop without writing anything."""


class Supervisor:
    def __init__(self, rt: Runtime, job_id: uuid.UUID, attempt: int) -> None:
        self.rt = rt
        self.job_id = job_id
        self.attempt = attempt
        self.phase: str | None = None
        self.phase_fraction = 0.0
        self._overall = Overall()
        self.message = ""
        self.started = time.monotonic()
        self.last_heartbeat = 0.0
        self.written = 0.0  # the overall progress the last heartbeat wrote
        self.last_phase_event: dict[str, float] = {}
        self.last_publish = 0.0

    @property
    def overall(self) -> float:
        """The whole job's fraction done (from the phases reported so far)."""
        return self._overall.value

    # -- reporting ---------------------------------------------------------------
    def publish(self, event: dict[str, Any]) -> None:
        events.publish(self.job_id, {"attempt": self.attempt, **event}, url=self.rt.redis_url)

    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if self.overall < 0.05:
            return None
        return round(elapsed * (1 - self.overall) / self.overall, 1)

    def on_progress(self, p: Progress) -> bool:
        """Fold one progress report in; True when the phase changed (worth a DB write now)."""
        changed = p.phase != self.phase
        self.phase, self.phase_fraction, self.message = p.phase, p.fraction, p.message
        self._overall.update(p.phase, p.fraction)
        now = time.monotonic()
        if changed or p.fraction >= 1.0 or now - self.last_publish > 0.25:
            self.last_publish = now
            self.publish({"type": "progress", "phase": p.phase, "phase_progress": p.fraction,
                          "progress": round(self.overall, 4), "message": p.message, "eta_s": self.eta_s()})
        return changed

    def write_due(self, now: float, interval: float) -> bool:
        """Whether the job's row is due a write: the heartbeat interval has passed, or the progress
        moved since the last write and PROGRESS_WRITE_MIN_S have. Clients that poll the job (and
        its ETA) see a long phase move, not one step every heartbeat interval; the database gets
        at most one such write per running job every PROGRESS_WRITE_MIN_S."""
        since = now - self.last_heartbeat
        return since >= interval or (self.overall > self.written and since >= PROGRESS_WRITE_MIN_S)

    def heartbeat(self, session: Session, *, phases: list[str] | tuple[str, ...] = ()) -> JobStatus:
        """Write liveness + progress, and one progress event per phase in ``phases`` (the
        phases entered since the last write); raise JobLost if another attempt holds the job."""
        eta = self.eta_s()
        message = self.message + (f" (about {eta:.0f}s left)" if eta is not None else "")
        status = state.heartbeat(session, self.job_id, self.attempt, progress=self.overall,
                                 phase=self.phase, message=message[:1000] or None)
        if status is None:
            session.rollback()
            raise JobLost
        for phase in phases:
            message = self.message if phase == self.phase else None
            session.add(JobEvent(job_id=self.job_id, attempt=self.attempt, kind="progress", phase=phase,
                                 progress=self.overall, message=(message or "")[:1000] or None))
        session.commit()
        self.last_heartbeat, self.written = time.monotonic(), self.overall
        return status


def run_job(job_id: str) -> str:
    """Run one attempt of a job. Returns what happened (for logs and tests)."""
    protect_process()
    rt = runtime()
    try:
        jid = uuid.UUID(str(job_id))
    except ValueError:
        log.warning("ignoring a message with a malformed job id %r", job_id)
        return "malformed"
    stale = dt.timedelta(seconds=rt.settings.heartbeat_stale_s)
    with rt.sessions() as session:
        attempt = state.claim(session, jid, stale_after=stale, max_attempts=rt.settings.max_attempts)
        session.commit()
        if attempt is None:
            return _not_claimed(rt, session, jid, stale)
    sup = Supervisor(rt, jid, attempt)
    sup.publish({"type": "status", "status": JobStatus.RUNNING})
    try:
        return _attempt(rt, sup)
    except JobLost:
        log.info("job %s attempt %d lost its claim; stopped", jid, attempt)
        return "lost"


def _not_claimed(rt: Runtime, session: Session, jid: uuid.UUID, stale: dt.timedelta) -> str:
    """Someone else has it, it finished, or it used up its attempts (then fail it now)."""
    job = session.get(Job, jid)
    if job is None:
        return "missing"
    if (
        job.status in (JobStatus.RUNNING, JobStatus.CANCELLING)
        and job.attempt >= rt.settings.max_attempts
        and job.heartbeat_at is not None
        and job.heartbeat_at < utcnow() - stale
    ):
        status = state.abandon(session, jid, job.attempt, stale_after=stale)
        session.commit()
        if status is not None:
            events.publish(jid, {"type": "status", "status": status, "attempt": job.attempt}, url=rt.redis_url)
            return "exhausted"
    return "not_claimed"


def _attempt(rt: Runtime, sup: Supervisor) -> str:
    scratch = rt.scratch_root / f"{sup.job_id.hex}-{sup.attempt}"
    log_path = rt.scratch_root / f"{sup.job_id.hex}-{sup.attempt}.log"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    logf = log_path.open("w", encoding="utf-8")
    try:
        with rt.sessions() as session:
            job = session.get_one(Job, sup.job_id)
            spec = _prepare(rt, session, job, scratch)
            gpu = spec["device"] is not None and spec["device"].startswith("cuda")
            wall = float(min(rt.settings.job_time_limit_s, _time_limit(job.options)))
        limits = Limits(
            wall_s=wall,
            cpu_s=int(wall * rt.ws.threads) + 60,
            file_bytes=rt.ws.child_file_bytes,
            open_files=rt.ws.child_open_files,
            processes=rt.ws.child_processes,
            memory_bytes=None if gpu else rt.ws.child_memory_bytes,
        )
        logf.write(f"[supervisor] job {sup.job_id} attempt {sup.attempt} on {os.uname().nodename}\n")
        logf.flush()
        box = Sandbox(
            scratch, "job.json", limits=limits, log=logf, threads=rt.ws.threads,
            cuda_devices=os.environ.get("CUDA_VISIBLE_DEVICES", "0") if gpu else None,
            isolate=rt.ws.isolate, scratch_root=rt.scratch_root, hide=_hidden_paths(rt),
            max_log_bytes=rt.ws.max_log_bytes, kill_grace_s=rt.ws.kill_grace_s,
        )
        box.write_log(f"[supervisor] sandbox pid {box.pid}; isolation {json.dumps(box.isolation.to_dict())}")
        box.write_log(f"[supervisor] child environment names: {', '.join(box.env_names or ['(unreadable)'])}")
        if rt.ws.isolate and not box.isolation.complete and rt.ws.require_isolation:
            box.kill("isolation unavailable")
            box.finish()
            return _finish_failed(rt, sup, logf, log_path, "sandbox_unavailable",
                                  "the worker could not isolate the job (see the worker configuration)")
        outcome = _supervise(rt, sup, box)
        rc = box.finish()
        box.write_log(f"[supervisor] child exited with {_describe_rc(rc)} after "
                      f"{time.monotonic() - box.started:.1f}s")
        if outcome == "cancelled":
            return _finish_cancelled(rt, sup, logf, log_path)
        if outcome == "timeout":
            return _finish_failed(rt, sup, logf, log_path, "time_limit",
                                  f"the job ran longer than its limit of {limits.wall_s:.0f}s")
        return _finish(rt, sup, scratch, rc, box, logf, log_path)
    except JobLost:
        raise
    except _InputError as e:
        return _finish_failed(rt, sup, logf, log_path, e.code, e.message)
    except Exception:
        log.exception("job %s attempt %d: supervisor error", sup.job_id, sup.attempt)
        logf.write("[supervisor] internal error (details in the worker's own log)\n")
        return _finish_failed(rt, sup, logf, log_path, "internal_error",
                              "the worker hit an internal error; the job can be submitted again")
    finally:
        logf.close()
        shutil.rmtree(scratch, ignore_errors=True)
        log_path.unlink(missing_ok=True)


class _InputError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _time_limit(options: dict[str, Any] | None) -> float:
    value = (options or {}).get("time_limit_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return float("inf")


def _hidden_paths(rt: Runtime) -> list[Path]:
    """What the child must not see: everything in the data directory except the path down
    to scratch, and the storage directory wherever it is."""
    scratch = rt.scratch_root
    hide: list[Path] = []
    data = rt.settings.data_dir.resolve()
    if data.is_dir():
        for entry in data.iterdir():
            p = entry.resolve()
            if p == scratch or p in scratch.parents:
                continue
            hide.append(p)
    storage = rt.settings.storage_dir.resolve()
    if storage not in hide and scratch not in (storage, *storage.parents) and storage not in scratch.parents:
        hide.append(storage)
    return [p for p in hide if p.exists()]


def _prepare(rt: Runtime, session: Session, job: Job, scratch: Path) -> dict[str, Any]:
    """Copy the inputs into scratch and write job.json. File names are ours, never the user's."""
    model = session.get(ModelFile, job.model_id)
    if model is None or model.owner_id != job.owner_id:
        raise _InputError("model_missing", "the job's model no longer exists")
    _copy_from_storage(rt, model.storage_key, scratch / "model.pt", model.sha256)
    options = dict(job.options or {})
    spec: dict[str, Any] = {
        "model": "model.pt",
        "input_spec": job.input_spec,
        "out_dir": "out",
        "form": job.form,
        "budget": job.budget,
        "method": job.method,
        "threads": rt.ws.threads,
        "device": None,
    }
    device = str(options.pop("device", "") or "").lower()
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        spec["device"] = "cuda"
    for key in ("time_limit_s", "queue"):
        options.pop(key, None)
    if "ranks" in options:
        spec["ranks"] = options.pop("ranks")
    spec["options"] = options
    if job.dataset_id is not None:
        ds = session.get(Dataset, job.dataset_id)
        if ds is None or ds.owner_id != job.owner_id:
            raise _InputError("dataset_missing", "the job's data set no longer exists")
        ext = {"npz": ".npz", "safetensors": ".safetensors", "imagefolder": ".zip", "zip": ".zip"}.get(ds.format, "")
        _copy_from_storage(rt, ds.storage_key, scratch / f"dataset{ext}", ds.sha256)
        spec["dataset"] = f"dataset{ext}"
        spec["dataset_format"] = ds.format
    (scratch / "job.json").write_text(json.dumps(spec))
    return spec


def _copy_from_storage(rt: Runtime, key: str, dest: Path, sha256: str) -> None:
    import hashlib

    h = hashlib.sha256()
    try:
        with rt.storage.open(key) as src, dest.open("wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _InputError("storage_full", "the worker's scratch disk is full; submit the job again later") from e
        raise _InputError("input_missing", "an input file of the job is missing from storage") from e
    except ValueError as e:
        raise _InputError("input_missing", "an input file of the job is missing from storage") from e
    if sha256 and set(sha256) != {"0"} and h.hexdigest() != sha256:
        raise _InputError("input_corrupted", "an input file of the job does not match its checksum")


def _supervise(rt: Runtime, sup: Supervisor, box: Sandbox) -> str:
    """Watch the child until it exits. Returns 'exited', 'cancelled' or 'timeout'."""
    interval = rt.ws.heartbeat_interval_s
    with rt.sessions() as session:
        try:
            while True:
                # Every phase entered gets its event, even when several pass within one drain.
                now = time.monotonic()
                entered = [p.phase for p in box.drain() if sup.on_progress(p)]
                fresh = [q for q in dict.fromkeys(entered)
                         if now - sup.last_phase_event.get(q, 0.0) >= PHASE_EVENT_MIN_S]
                if fresh or sup.write_due(now, interval):
                    for q in fresh:
                        sup.last_phase_event[q] = now
                    status = sup.heartbeat(session, phases=fresh)
                    if status == JobStatus.CANCELLING:
                        box.write_log("[supervisor] cancel requested: stopping the child")
                        box.kill("cancelled")
                        return "cancelled"
                if box.poll() is not None:
                    last = [p.phase for p in box.drain() if sup.on_progress(p)]
                    if last:
                        sup.heartbeat(session, phases=list(dict.fromkeys(last)))
                    return "exited"
                if box.timed_out():
                    box.write_log(f"[supervisor] wall-clock limit of {box.limits.wall_s:.0f}s reached")
                    box.kill("timeout")
                    return "timeout"
                time.sleep(min(0.2, interval))
        except JobLost:
            box.write_log("[supervisor] the job was claimed by another attempt: stopping the child")
            box.kill("lost")
            raise
        except BaseException:
            box.kill("supervisor error")
            raise


def _describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def _crash_error(rc: int, box: Sandbox) -> tuple[str, str]:
    if rc == -signal.SIGXCPU:
        return "cpu_time_limit", "the job used more CPU time than it is allowed"
    if rc == -signal.SIGXFSZ:
        return "file_size_limit", "the job tried to write a file larger than allowed"
    if rc == -signal.SIGKILL:
        return "sandbox_killed", "the compression process was killed (most often: out of memory)"
    if rc < 0:
        return "sandbox_crashed", (f"the compression process crashed ({_describe_rc(rc)}); the model file may be "
                                   "damaged or use an operator this server cannot run")
    return "sandbox_crashed", f"the compression process stopped without a result ({_describe_rc(rc)})"


# --------------------------------------------------------------------------- results
@dataclass
class CheckedFile:
    name: str
    path: Path
    size: int


class OutputError(Exception):
    pass


def read_result(scratch: Path) -> dict[str, Any] | None:
    try:
        return read_result_file(scratch / "result.json", MAX_RESULT_BYTES)
    except ValueError as e:
        raise OutputError(str(e)) from e


def check_outputs(scratch: Path, result: dict[str, Any], *, max_bytes: int) -> dict[str, CheckedFile]:
    """Re-check the child's outputs without loading them: names from the allow-list, regular
    files inside scratch/out, sizes, checksums against what the child declared, zip structure."""
    out = scratch / "out"
    if out.is_symlink() or not out.is_dir():
        raise OutputError("no output directory")
    declared = result.get("files")
    if not isinstance(declared, dict):
        raise OutputError("result.json lists no files")
    found: dict[str, CheckedFile] = {}
    with os.scandir(out) as it:
        for entry in it:
            if entry.name not in OUTPUT_NAMES:
                continue  # ignored, never copied
            if not entry.is_file(follow_symlinks=False):
                raise OutputError(f"{entry.name} is not a regular file")
            path = Path(entry.path)
            if path.resolve().parent != out.resolve():
                raise OutputError(f"{entry.name} points outside the scratch directory")
            size = entry.stat(follow_symlinks=False).st_size
            limit = MAX_REPORT_BYTES if entry.name.startswith(("report", "sweep")) else max_bytes
            if size > limit:
                raise OutputError(f"{entry.name} is {size} bytes (limit {limit})")
            found[entry.name] = CheckedFile(entry.name, path, size)
    missing = [n for n in REQUIRED_OUTPUTS if n not in found]
    if missing:
        raise OutputError(f"missing outputs: {', '.join(missing)}")
    for name, f in found.items():
        d = declared.get(name)
        if not isinstance(d, dict) or d.get("size") != f.size:
            raise OutputError(f"{name}: size does not match result.json")
    for name in ("model.pt", "model.pt2"):
        _check_zip(found[name].path, torchscript=name == "model.pt")
    return found


def _check_zip(path: Path, *, torchscript: bool) -> None:
    if torchscript:
        from compression.archive import precheck_archive
        from compression.errors import ArchiveError

        try:
            precheck_archive(path)
        except ArchiveError as e:
            raise OutputError(f"{path.name}: {e.message}") from e
        return
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if not infos or len(infos) > MAX_ZIP_ENTRIES:
                raise OutputError(f"{path.name}: {len(infos)} zip entries")
            for info in infos:
                name = info.filename
                if name.startswith("/") or ".." in name.split("/"):
                    raise OutputError(f"{path.name}: unsafe entry name {name!r}")
            if zf.testzip() is not None:
                raise OutputError(f"{path.name}: CRC error")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise OutputError(f"{path.name} is not a valid zip archive") from e


def parse_report(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-layer ranks from report.json, taking only well-typed fields."""
    try:
        report = json.loads(path.read_bytes())
    except ValueError as e:
        raise OutputError("report.json is not JSON") from e
    if not isinstance(report, dict):
        raise OutputError("report.json is not an object")
    metrics: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, bool):
            continue
        number = isinstance(value, (int, float)) and value == value and abs(value) < 1e300
        if number or (isinstance(value, str) and len(value) <= 200):
            metrics[key] = value
    evaluation = report.get("evaluation")
    if isinstance(evaluation, dict):  # the page shows accuracy before/after side by side
        report = {**report, "accuracy": {"before": evaluation.get("original"), "after": evaluation.get("compressed"),
                                         "after_decompose": evaluation.get("after_decompose")}}
    for key in ("seconds", "accuracy", "finetune", "budget", "latency", "evaluation", "file_sizes"):
        value = report.get(key)
        if isinstance(value, dict) and len(json.dumps(value)) < 10_000:
            metrics[key] = value
    layers: list[dict[str, Any]] = []
    plan = report.get("plan")
    raw = plan.get("layers") if isinstance(plan, dict) else None
    if isinstance(raw, list):
        for item in raw[:100_000]:
            if not isinstance(item, dict):
                continue
            name, form, ranks = item.get("name"), item.get("form"), item.get("ranks")
            mb, ma = item.get("macs_before"), item.get("macs_after")
            if (isinstance(name, str) and 0 < len(name) <= 255 and isinstance(form, str) and len(form) <= 32
                    and isinstance(ranks, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)
                    and isinstance(mb, int) and isinstance(ma, int)):
                layers.append({"layer": name, "form": form, "ranks": ranks, "macs_before": mb, "macs_after": ma})
        if isinstance(plan, dict) and isinstance(plan.get("method"), str):
            metrics["rank_method"] = plan["method"][:64]
    return metrics, layers


_SWEEP_FIELDS = {"budget": str, "metric": str, "macs_after": int, "params_after": int, "macs_ratio": float,
                 "accuracy": float}


def parse_sweep(path: Path) -> list[dict[str, Any]]:
    """The accuracy-vs-MACs points of sweep.json, taking only well-typed fields."""
    try:
        report = json.loads(path.read_bytes())
    except ValueError as e:
        raise OutputError("sweep.json is not JSON") from e
    raw = report.get("sweep") if isinstance(report, dict) else None
    if not isinstance(raw, list) or not raw:
        raise OutputError("sweep.json has no points")
    points = []
    for item in raw[:64]:
        if not isinstance(item, dict):
            raise OutputError("a sweep point is not an object")
        point: dict[str, Any] = {}
        for key, kind in _SWEEP_FIELDS.items():
            value = item.get(key)
            if kind is str and isinstance(value, str):
                point[key] = value[:64]
            elif kind is not str and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                point[key] = kind(value)
        if "macs_after" not in point or "budget" not in point:
            raise OutputError("a sweep point lacks its budget or MACs")
        points.append(point)
    return points


def _finish(rt: Runtime, sup: Supervisor, scratch: Path, rc: int, box: Sandbox, logf: io.TextIOBase,
            log_path: Path) -> str:
    try:
        result = read_result(scratch)
    except OutputError as e:
        box.write_log(f"[supervisor] rejected the child's result: {e}")
        return _finish_failed(rt, sup, logf, log_path, "invalid_output", "the compression produced an invalid result")
    if result is None:
        code, message = _crash_error(rc, box)
        return _finish_failed(rt, sup, logf, log_path, code, message)
    if not result.get("ok") or rc != 0:
        code = result.get("code")
        message = result.get("message")
        code = code if isinstance(code, str) and _CODE.match(code) else "compression_failed"
        message = message[:2000] if isinstance(message, str) and message else "the compression failed"
        return _finish_failed(rt, sup, logf, log_path, code, message)
    try:
        files = check_outputs(scratch, result, max_bytes=rt.settings.max_upload_bytes * 4)
        metrics, layers = parse_report(files["report.json"].path)
        if "sweep.json" in files:
            metrics["sweep"] = parse_sweep(files["sweep.json"].path)
    except OutputError as e:
        box.write_log(f"[supervisor] rejected the child's output: {e}")
        return _finish_failed(rt, sup, logf, log_path, "invalid_output",
                              f"the compression produced invalid output: {e}")
    metrics["sandbox"] = box.isolation.to_dict()
    metrics["attempt"] = sup.attempt
    box.write_log(f"[supervisor] outputs verified: {', '.join(sorted(files))}")
    return _store_success(rt, sup, files, result, metrics, layers, logf, log_path)


def _store_success(rt: Runtime, sup: Supervisor, files: dict[str, CheckedFile], result: dict[str, Any],
                   metrics: dict[str, Any], layers: list[dict[str, Any]], logf: io.TextIOBase,
                   log_path: Path) -> str:
    stored: list[tuple[str, StoredFile]] = []
    try:
        for name, f in sorted(files.items()):
            sf = rt.storage.save_file(f.path, kind="artifacts")
            stored.append((name, sf))
            declared = result["files"][name].get("sha256")
            if declared != sf.sha256:
                raise OutputError(f"{name}: checksum changed between the child and storage")
        logf.write("[supervisor] artifacts stored\n")
        logf.flush()
        stored.append(("job.log", _store_log(rt, log_path)))
    except OutputError as e:
        _delete(rt, stored)
        return _finish_failed(rt, sup, logf, log_path, "invalid_output", str(e))
    except (StorageError, OSError) as e:
        _delete(rt, stored)
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # not a full disk: an internal error
        log.warning("job %s: storing the results failed: %s", sup.job_id, e)
        return _finish_failed(rt, sup, logf, log_path, "storage_full",
                              "the server's storage is full, so the results could not be kept; nothing was "
                              "stored. Submit the job again later")
    except BaseException:
        _delete(rt, stored)
        raise
    with rt.sessions() as session:
        if state.succeed(session, sup.job_id, sup.attempt, metrics=metrics):
            _add_artifacts(session, sup.job_id, stored)
            for row in layers:
                session.add(LayerRank(job_id=sup.job_id, **row))
            session.commit()
            sup.publish({"type": "status", "status": JobStatus.SUCCEEDED, "progress": 1.0})
            return "succeeded"
        session.rollback()
    _delete(rt, stored)
    # Refused: cancellation won the race, or the job is no longer ours.
    return _finish_cancelled(rt, sup, None, None)


def _add_artifacts(session: Session, job_id: uuid.UUID, stored: list[tuple[str, StoredFile]]) -> None:
    existing = set(session.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
    for name, sf in stored:
        if name in existing:  # a log from an earlier attempt: keep the newest
            old = session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)).one()
            session.delete(old)
            session.flush()
        session.add(Artifact(job_id=job_id, name=name, storage_key=sf.key, sha256=sf.sha256, size_bytes=sf.size))


def _delete(rt: Runtime, stored: list[tuple[str, StoredFile]]) -> None:
    for _, sf in stored:
        with contextlib.suppress(OSError, ValueError):
            rt.storage.delete(sf.key)


def _store_log(rt: Runtime, log_path: Path) -> StoredFile:
    text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
    text = scrub(text, rt.settings)
    data = text.encode()
    return rt.storage.save(iter([data]), kind="artifacts", max_bytes=len(data) + 1, expected_bytes=len(data))


def _try_store_log(rt: Runtime, log_path: Path) -> list[tuple[str, StoredFile]]:
    """The job log as an artifact, or none when storage refuses it (full): the job's
    outcome is recorded either way."""
    try:
        return [("job.log", _store_log(rt, log_path))]
    except (StorageError, OSError) as e:
        log.warning("could not store the job log %s: %s", log_path.name, e)
        return []


def scrub(text: str, settings: Settings) -> str:
    """Remove secrets from log text: TENSORTRIM_* values, the secret key, URL passwords."""
    secrets = {settings.secret_key.get_secret_value(), settings.database_url, settings.broker_url}
    secrets |= {v for k, v in os.environ.items() if k.startswith("TENSORTRIM_") and len(v) >= 8}
    for s in sorted((s for s in secrets if s and len(s) >= 8), key=len, reverse=True):
        text = text.replace(s, "***")
    return re.sub(r"(\w+://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def _finish_failed(rt: Runtime, sup: Supervisor, logf: io.TextIOBase, log_path: Path, code: str, message: str) -> str:
    with contextlib.suppress(ValueError):
        logf.write(f"[supervisor] failed: {code}: {message}\n")
        logf.flush()
    stored = _try_store_log(rt, log_path)
    with rt.sessions() as session:
        if state.fail(session, sup.job_id, sup.attempt, code=code, message=message):
            _add_artifacts(session, sup.job_id, stored)
            session.commit()
            sup.publish({"type": "status", "status": JobStatus.FAILED, "error_code": code, "message": message})
            return f"failed:{code}"
        session.rollback()
    _delete(rt, stored)
    return _finish_cancelled(rt, sup, None, None)


def _finish_cancelled(rt: Runtime, sup: Supervisor, logf: io.TextIOBase | None, log_path: Path | None) -> str:
    stored = []
    if logf is not None and log_path is not None:
        with contextlib.suppress(ValueError):
            logf.write("[supervisor] cancelled\n")
            logf.flush()
        stored = _try_store_log(rt, log_path)
    with rt.sessions() as session:
        if state.confirm_cancelled(session, sup.job_id, sup.attempt):
            _add_artifacts(session, sup.job_id, stored)
            session.commit()
            sup.publish({"type": "status", "status": JobStatus.CANCELLED})
            return "cancelled"
        session.rollback()
    _delete(rt, stored)
    return "lost"


# --------------------------------------------------------------------------- reconciler
def reconcile(
    rt: Runtime | None = None, *, now: dt.datetime | None = None, send: Callable[[Job], None] | None = None
) -> dict[str, int]:
    """Re-send queued jobs nobody claimed for ``unclaimed_after_s``; for running jobs whose
    heartbeat is stale, re-send them (the next claim takes them over) while attempts remain,
    else fail them (or finish a pending cancel)."""
    rt = rt or runtime()
    now = now or utcnow()
    if send is None:
        from worker.queue import enqueue_job, queue_for

        def send(job: Job) -> None:
            enqueue_job(job.id, queue_for(job))

    stale = dt.timedelta(seconds=rt.settings.heartbeat_stale_s)
    unclaimed = dt.timedelta(seconds=rt.ws.unclaimed_after_s)
    counts = {"resent": 0, "requeued": 0, "abandoned": 0}
    with rt.sessions() as session:
        queued = session.scalars(
            select(Job).where(Job.status == JobStatus.QUEUED, Job.created_at < now - unclaimed).limit(1000)
        ).all()
        for job in queued:
            if _mark_sent(rt, job.id, rt.ws.unclaimed_after_s):
                send(job)
                counts["resent"] += 1
        stuck = session.scalars(
            select(Job).where(Job.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]),
                              Job.heartbeat_at < now - stale).limit(1000)
        ).all()
        for job in stuck:
            if job.status == JobStatus.RUNNING and job.attempt < rt.settings.max_attempts:
                if _mark_sent(rt, job.id, rt.settings.heartbeat_stale_s):
                    send(job)
                    counts["requeued"] += 1
                continue
            status = state.abandon(session, job.id, job.attempt, stale_after=stale, now=now)
            session.commit()
            if status is not None:
                counts["abandoned"] += 1
                events.publish(job.id, {"type": "status", "status": status, "attempt": job.attempt},
                               url=rt.redis_url)
    if any(counts.values()):
        log.info("reconcile: %s", counts)
    return counts


def _mark_sent(rt: Runtime, job_id: uuid.UUID, ttl_s: float) -> bool:
    """True if the job was not re-sent within ``ttl_s`` (and records this send)."""
    if rt.redis_url:
        try:
            import redis

            client = redis.Redis.from_url(rt.redis_url, socket_timeout=2)
            return bool(client.set(f"tensortrim:resent:{job_id}", "1", nx=True, px=max(1, int(ttl_s * 1000))))
        except Exception:  # noqa: BLE001  (if Redis is down, sending fails anyway)
            return True
    now = time.monotonic()
    last = rt.sent.get(str(job_id))
    if last is not None and now - last < ttl_s:
        return False
    rt.sent[str(job_id)] = now
    return True
