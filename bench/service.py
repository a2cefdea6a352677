"""Service benchmark: the API and one Celery worker in full mode, on loopback.

Starts its own stack with ``bench._stack.full_stack`` (a fresh Postgres database, an
empty Redis database number, migrations, ``uvicorn --factory app.main:create_app``
and one ``celery worker`` subprocess) and measures, with only 127.0.0.1 traffic and
loops that are bounded by a request count or a timeout:

1. Read latency at ``--concurrency`` clients (one ``httpx.AsyncClient``):
   ``GET /api/v1/jobs/{id}`` (random ids among the jobs) and ``GET /api/v1/jobs?limit=20``,
   p50 / p90 / p99 / max and requests/s, with ``--jobs`` jobs in the database. The jobs are
   created through the API (``POST /api/v1/jobs`` for a tiny uploaded TorchScript model)
   while no worker runs, then cancelled through the API and their queued messages flushed
   from Redis, so the worker never sees them.
2. Submit -> running and submit -> succeeded for the tiny model, one job at a time with
   the worker idle (one untimed warm-up job first), seen by polling ``GET /api/v1/jobs/{id}``;
   the server's own ``created_at`` / ``started_at`` / ``finished_at`` are reported beside it.
3. Upload throughput and the API process's memory for a large upload streamed with a
   generator body (``Content-Length`` set): a real ``torch.jit.save`` archive with an extra
   stored (uncompressed) entry that pads it to ``--upload-mb`` MiB, so the API's pre-check
   (which CRCs every entry) accepts it. VmRSS of the uvicorn process is sampled every
   20 ms from /proc/<pid>/status, plus VmHWM before and after. Skipped when less than
   5 GB (or 4x the upload) is free. The file is deleted afterwards.

The client runs on the same machine as the server (and here the machine is shared), so
the numbers are an upper bound on latency for this hardware, not a capacity figure.

Run: ``python -m bench.service`` (full) or ``python -m bench.service --quick``.
Writes bench/results/service.json and service.md (``--quick``: service.quick.json / .md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from bench._stack import Stack, full_stack

RESULTS = Path(__file__).parent / "results"
API = "/api/v1"
MiB = 1024**2
GB = 10**9
INPUT_SPEC = "3,16,16"
BUDGET = "flops:2x"
TERMINAL = {"succeeded", "failed", "cancelled"}


class TinyNet(torch.nn.Module):
    """The worker tests' tiny network: two 3x3 convolutions and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- helpers
def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    k = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[k]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of ``pid`` from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_gib": round(mem / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "httpx": httpx.__version__,
        "git_commit": commit + ("+dirty" if dirty else ""),
    }


class RssSampler:
    """Samples VmRSS of one process every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = proc_status(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def check(r: httpx.Response, *expected: int) -> httpx.Response:
    if r.status_code not in expected:
        raise RuntimeError(f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text[:500]}")
    return r


# --------------------------------------------------------------------------- phase 1: read latency
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def hammer(client: httpx.AsyncClient, path_for: Callable[[int], str], total: int, concurrency: int,
                 warmup: int, api_pid: int) -> dict[str, Any]:
    """``total`` GETs from ``concurrency`` coroutines (after ``warmup`` untimed ones), with the CPU time
    the API process and this (client) process spent per request."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counter = 0

    async def one_client(limit: int, record: bool) -> None:
        nonlocal counter
        while counter < limit:
            i = counter
            counter += 1
            t = time.perf_counter()
            try:
                r = await client.get(path_for(i))
                ok = r.status_code == 200
                if not ok:
                    errors[str(r.status_code)] += 1
            except httpx.HTTPError as e:
                errors[type(e).__name__] += 1
                ok = False
            if record and ok:
                latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(one_client(warmup, False) for _ in range(concurrency)))
    counter = 0
    api_cpu, client_cpu = cpu_seconds(api_pid), time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(one_client(total, True) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    api_cpu, client_cpu = cpu_seconds(api_pid) - api_cpu, time.process_time() - client_cpu
    return {
        "requests": total,
        "ok": len(latencies),
        "errors": dict(errors),
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "rps": round(total / wall, 1),
        "p50_ms": ms(percentile(latencies, 50)),
        "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies)),
        "mean_ms": ms(statistics.fmean(latencies)),
        "api_cpu_ms_per_req": ms(api_cpu / total),
        "client_cpu_ms_per_req": ms(client_cpu / total),
    }


async def fan_out(client: httpx.AsyncClient, n: int, concurrency: int,
                  call: Callable[[int], Any]) -> tuple[list[Any], list[float]]:
    """Run ``call(i)`` for i < n with at most ``concurrency`` in flight; results and latencies in order."""
    sem = asyncio.Semaphore(concurrency)
    lat = [0.0] * n

    async def one(i: int) -> Any:
        async with sem:
            t = time.perf_counter()
            out = await call(i)
            lat[i] = time.perf_counter() - t
            return out

    return list(await asyncio.gather(*(one(i) for i in range(n)))), lat


async def read_latency(stack: Stack, model_id: str, args: argparse.Namespace, out: dict[str, Any]) -> None:
    # keepalive_expiry below uvicorn's 5 s keep-alive timeout: otherwise the client may reuse a connection
    # the server is closing at that moment (a ReadError that says nothing about the service).
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency,
                          keepalive_expiry=3.0)
    async with httpx.AsyncClient(base_url=stack.base_url, headers=stack.headers, limits=limits,
                                 timeout=httpx.Timeout(120.0), trust_env=False) as client:

        async def create(i: int) -> str:
            r = check(await client.post(f"{API}/jobs", json={"model_id": model_id, "budget": BUDGET}), 201)
            return str(r.json()["id"])

        t = time.perf_counter()
        job_ids, post_lat = await fan_out(client, args.jobs, 8, create)
        out["create_jobs"] = {
            "jobs": args.jobs, "client_concurrency": 8, "wall_s": round(time.perf_counter() - t, 2),
            "p50_ms": ms(percentile(post_lat, 50)), "p99_ms": ms(percentile(post_lat, 99)),
        }
        print(f"created {len(job_ids)} jobs via POST {API}/jobs in {out['create_jobs']['wall_s']} s", flush=True)

        rng = random.Random(0)
        picks = [rng.choice(job_ids) for _ in range(args.requests + args.concurrency * 2)]
        out["api_rss_before_reads"] = proc_status(stack.api_pid)["VmRSS"]
        out["load_before_reads"] = loadavg()
        endpoints = {"get_job": lambda i: f"{API}/jobs/{picks[i]}", "list_jobs": lambda i: f"{API}/jobs?limit=20"}
        for key, path_for in endpoints.items():
            out[key] = await hammer(client, path_for, args.requests, args.concurrency, args.concurrency * 2,
                                    stack.api_pid)
            print(f"{key} x{args.concurrency}: {out[key]}", flush=True)
        for key, path_for in endpoints.items():  # one client: the service time without queueing
            out[f"{key}_serial"] = await hammer(client, path_for, args.serial_requests, 1, 10, stack.api_pid)
            print(f"{key} x1: {out[f'{key}_serial']}", flush=True)
        out["api_rss_after_reads"] = proc_status(stack.api_pid)["VmRSS"]

        async def cancel(i: int) -> str:
            r = check(await client.post(f"{API}/jobs/{job_ids[i]}/cancel"), 200)
            return str(r.json()["status"])

        statuses, _ = await fan_out(client, len(job_ids), 8, cancel)
        out["cancelled"] = dict(Counter(statuses))
    stack.flush_broker()  # no worker ran: drop the cancelled jobs' messages


# --------------------------------------------------------------------------- phase 2: job latency
def _parse_ts(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def time_one_job(client: httpx.Client, model_id: str, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = check(client.post(f"{API}/jobs", json={"model_id": model_id, "budget": BUDGET}), 201)
    t_post = time.perf_counter()
    job_id = r.json()["id"]
    t_running = None
    detail: dict[str, Any] = {}
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        detail = check(client.get(f"{API}/jobs/{job_id}"), 200).json()
        now = time.perf_counter()
        if t_running is None and detail["status"] != "queued":
            t_running = now
        if detail["status"] in TERMINAL:
            break
        time.sleep(0.02 if t_running is None else 0.1)
    t_end = time.perf_counter()
    created, started, finished = (_parse_ts(detail.get(k)) for k in ("created_at", "started_at", "finished_at"))
    engine_s = None
    if detail.get("status") == "succeeded":  # the engine's own phase timings, from the job's report
        report = client.get(f"{API}/jobs/{job_id}/artifacts/report.json")
        if report.status_code == 200:
            engine_s = {k: round(v, 2) for k, v in report.json().get("seconds", {}).items()}
    return {
        "job_id": job_id,
        "status": detail.get("status"),
        "error": detail.get("error"),
        "post_ms": ms(t_post - t0),
        "submit_to_running_s": None if t_running is None else round(t_running - t0, 3),
        "submit_to_terminal_s": round(t_end - t0, 3) if detail.get("status") in TERMINAL else None,
        "server_queued_s": round((started - created).total_seconds(), 3) if created and started else None,
        "server_total_s": round((finished - created).total_seconds(), 3) if created and finished else None,
        "server_run_s": round((finished - started).total_seconds(), 3) if started and finished else None,
        "engine_s": engine_s,
    }


def job_latency(stack: Stack, model_id: str, args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    stack.start_worker()
    worker_start_s = round(time.perf_counter() - t, 2)
    time.sleep(args.settle)
    runs = []
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=60, trust_env=False) as client:
        for i in range(args.timed_jobs + 1):
            run = time_one_job(client, model_id, args.job_timeout)
            run["warmup"] = i == 0
            runs.append(run)
            print(f"job {i} ({'warm-up' if i == 0 else 'timed'}): {run}", flush=True)
            if run["status"] not in TERMINAL:
                raise RuntimeError(f"job {run['job_id']} did not finish in {args.job_timeout}s\n{stack.tails()}")
            time.sleep(args.settle)  # the worker replaces its pool process after each task
    timed = [r for r in runs if not r["warmup"]]
    ok = [r for r in timed if r["status"] == "succeeded"]

    def med(key: str, rows: list[dict[str, Any]]) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "worker_start_s": worker_start_s,
        "timed_jobs": len(timed),
        "succeeded": len(ok),
        "median_submit_to_running_s": med("submit_to_running_s", timed),
        "median_server_queued_s": med("server_queued_s", timed),
        "median_submit_to_succeeded_s": med("submit_to_terminal_s", ok),
        "median_server_total_s": med("server_total_s", ok),
        "median_server_run_s": med("server_run_s", ok),
        "runs": runs,
    }


# --------------------------------------------------------------------------- phase 3: upload
def padded_archive(model: Path, dst: Path, total: int) -> int:
    """Copy ``model``'s entries into ``dst`` and pad it with a stored entry to about ``total`` bytes."""
    block = random.Random(1).randbytes(MiB)
    with zipfile.ZipFile(model) as zin, zipfile.ZipFile(dst, "w") as zout:
        top = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        name = f"{top}/extra/padding.bin"
        overhead = 2 * (len(name) + 80) + 200  # local + central headers, end record, slack
        left = total - zout.fp.tell() - overhead  # type: ignore[union-attr]
        info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        with zout.open(info, "w", force_zip64=left >= 2**31) as f:
            while left > 0:
                n = min(left, MiB)
                f.write(block[:n])
                left -= n
    return dst.stat().st_size


def upload(stack: Stack, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    size_target = args.upload_mb * MiB
    free = shutil.disk_usage(stack.work_dir).free
    need = max(5 * GB, 4 * size_target)
    result: dict[str, Any] = {"target_bytes": size_target, "disk_free_bytes": free}
    if free < need:
        result["skipped"] = f"only {free / GB:.1f} GB free on {stack.work_dir}, need {need / GB:.1f} GB"
        print(f"upload skipped: {result['skipped']}", flush=True)
        return result
    path = stack.work_dir / "big.pt"
    try:
        t = time.perf_counter()
        size = padded_archive(model, path, size_target)
        result["build_s"] = round(time.perf_counter() - t, 2)
        result["bytes"] = size
        chunk = args.chunk_kib * 1024
        sent_at: list[float] = []

        def body() -> Iterator[bytes]:
            with path.open("rb") as f:
                while data := f.read(chunk):
                    yield data
            sent_at.append(time.perf_counter())

        before = proc_status(stack.api_pid)
        timeout = httpx.Timeout(600.0, connect=10.0)
        with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=timeout, trust_env=False) as client:
            with RssSampler(stack.api_pid) as sampler:
                t0 = time.perf_counter()
                r = client.post(f"{API}/models", params={"name": "big.pt"}, content=body(),
                                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
                t_done = time.perf_counter()
            after = proc_status(stack.api_pid)
            time.sleep(2.0)
            settled = proc_status(stack.api_pid)
            body_json = r.json() if r.headers.get("content-type", "").endswith("json") else {}
            result.update({
                "status_code": r.status_code,
                "model_status": body_json.get("status"),
                "problem": None if r.status_code == 201 else body_json,
                "client_chunk_bytes": chunk,
                "body_sent_s": round(sent_at[0] - t0, 3) if sent_at else None,
                "response_s": round(t_done - t0, 3),
                "rss_before": before["VmRSS"],
                "rss_after": after["VmRSS"],
                "rss_after_2s": settled["VmRSS"],
                "rss_peak_sampled": sampler.peak,
                "rss_samples": sampler.samples,
                "hwm_before": before["VmHWM"],
                "hwm_after": after["VmHWM"],
            })
            if sent_at:
                result["send_mb_s"] = round(size / MiB / (sent_at[0] - t0), 1)
            result["end_to_end_mb_s"] = round(size / MiB / (t_done - t0), 1)
            result["rss_growth_peak"] = max(sampler.peak, after["VmHWM"] if after["VmHWM"] > before["VmHWM"] else 0) \
                - before["VmRSS"]
            if r.status_code == 201:
                check(client.delete(f"{API}/models/{body_json['id']}"), 204)
        print(f"upload: {result}", flush=True)
        return result
    finally:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- report
def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def render(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    lines = [
        f"# Service benchmark{' (quick)' if s['quick'] else ''}",
        "",
        f"{res['date']} - {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_gib']} GiB RAM, "
        f"Python {m['python']}, torch {m['torch']}, commit {m['git_commit']}.",
        f"Load average (1/5/15 min) at start {res['load_start']}, before the reads "
        f"{res['reads'].get('load_before_reads')}, before the jobs {res.get('load_before_jobs')}, before the "
        f"upload {res.get('load_before_upload')}, at end {res['load_end']} (a shared machine: other engineers' "
        f"test runs were going on). Whole run: {res.get('total_s')} s.",
        "Client and server share the machine; uvicorn is one process (uvloop + httptools, access log off), "
        "Postgres 127.0.0.1:5432, Redis 127.0.0.1:6379, one Celery worker (concurrency 1).",
        "",
        "## Reads",
        "",
        f"{s['jobs']} jobs in the database (created via the API, then cancelled), {s['requests']} requests per "
        f"endpoint after {2 * s['concurrency']} warm-up ones, {s['concurrency']} concurrent clients "
        "(one httpx.AsyncClient), then a few hundred from one client.",
        "",
        "API CPU = user+system time of the uvicorn process per request (/proc/<pid>/stat); client CPU = this "
        "benchmark's own. Both change less with the machine's load than the latencies do.",
        "",
        "| endpoint | clients | requests | p50 ms | p90 ms | p99 ms | max ms | req/s | API CPU ms/req "
        "| client CPU ms/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, key in (("GET /api/v1/jobs/{id}", "get_job"), ("GET /api/v1/jobs?limit=20", "list_jobs")):
        for k in (key, f"{key}_serial"):
            r = res["reads"][k]
            lines.append(
                f"| `{label}` | {r['concurrency']} | {r['requests']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} "
                f"| {r['max_ms']} | {r['rps']} | {r['api_cpu_ms_per_req']} | {r['client_cpu_ms_per_req']} "
                f"| {r['errors'] or 'none'} |")
    cj = res["reads"]["create_jobs"]
    lines += [
        "",
        f"Creating the jobs (`POST /api/v1/jobs`, 8 concurrent): p50 {cj['p50_ms']} ms, p99 {cj['p99_ms']} ms, "
        f"{cj['wall_s']} s for {cj['jobs']}. Uploading the tiny model (with its sandboxed inspection) took "
        f"{res['tiny_model_upload_s']} s. API VmRSS: {mb(res['api_rss_at_start'])} MiB once ready, "
        f"{mb(res['api_rss_after_model_upload'])} MiB after the model upload, "
        f"{mb(res['reads']['api_rss_before_reads'])} MiB after creating the jobs, "
        f"{mb(res['reads']['api_rss_after_reads'])} MiB after the reads.",
        "",
        "## Job latency (tiny model, worker idle)",
        "",
    ]
    j = res["jobs"]
    lines += [
        f"TinyNet (2 convolutions + linear, input {INPUT_SPEC}), budget `{BUDGET}`; one untimed warm-up job, then "
        f"{j['timed_jobs']} jobs one at a time, {s['settle_s']} s apart; polling every 20 ms until running.",
        "",
        "| measure | median s |",
        "|---|---:|",
        f"| submit -> running (polled) | {j['median_submit_to_running_s']} |",
        f"| created_at -> started_at (server clock) | {j['median_server_queued_s']} |",
        f"| submit -> succeeded (polled) | {j['median_submit_to_succeeded_s']} |",
        f"| started_at -> finished_at (server clock) | {j['median_server_run_s']} |",
        "",
        "| job | status | POST ms | to running s | to terminal s | server queued s | server run s "
        "| engine phases s (report.json) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(j["runs"]):
        phases = ", ".join(f"{k} {v}" for k, v in (r["engine_s"] or {}).items()) or "-"
        lines.append(f"| {'warm-up' if r['warmup'] else i} | {r['status']} | {r['post_ms']} | "
                     f"{r['submit_to_running_s']} | {r['submit_to_terminal_s']} | {r['server_queued_s']} | "
                     f"{r['server_run_s']} | {phases} |")
    u = res["upload"]
    lines += ["", "## Large upload", ""]
    if "skipped" in u:
        lines.append(f"Skipped: {u['skipped']}.")
    else:
        lines += [
            f"A real `torch.jit.save` archive padded with a stored entry to {u['bytes']:,} bytes "
            f"({mb(u['bytes'])} MiB), sent as a generator body in {u['client_chunk_bytes'] // 1024} KiB chunks with "
            "Content-Length, raw `application/octet-stream`, no input_spec (so no sandboxed inspection; the "
            "pre-check still CRCs every entry).",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| HTTP status / model status | {u['status_code']} / {u['model_status']} |",
            f"| body sent | {u['body_sent_s']} s ({u.get('send_mb_s')} MiB/s) |",
            f"| response received (store + sha256 + pre-check) | {u['response_s']} s "
            f"({u['end_to_end_mb_s']} MiB/s) |",
            f"| API VmRSS before / peak (sampled, {u['rss_samples']} samples) / after / 2 s later, MiB | "
            f"{mb(u['rss_before'])} / {mb(u['rss_peak_sampled'])} / {mb(u['rss_after'])} / "
            f"{mb(u['rss_after_2s'])} |",
            f"| API VmHWM before / after, MiB | {mb(u['hwm_before'])} / {mb(u['hwm_after'])} |",
            f"| peak RSS growth during the upload, MiB | {mb(u['rss_growth_peak'])} |",
        ]
        if u["problem"]:
            lines.append(f"\nThe API refused it: `{json.dumps(u['problem'])[:400]}`")
    lines += ["", "## Settings", "", "```", json.dumps(s, indent=2), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run: 500 requests, 50 jobs, 3 timed jobs, 100 MiB")
    p.add_argument("--requests", type=int, help="requests per read endpoint (default 3000; quick 500)")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--serial-requests", type=int, help="requests per endpoint from one client (default 300; quick 100)")
    p.add_argument("--jobs", type=int, help="jobs in the database for the reads (default 200; quick 50)")
    p.add_argument("--timed-jobs", type=int, help="jobs timed end to end (default 5; quick 3)")
    p.add_argument("--upload-mb", type=int, help="upload size in MiB (default 1024; quick 100); 0 skips it")
    p.add_argument("--chunk-kib", type=int, default=1024, help="client body chunk size")
    p.add_argument("--settle", type=float, default=3.0, help="seconds between timed jobs (worker idle)")
    p.add_argument("--job-timeout", type=float, default=300.0)
    p.add_argument("--redis-db", type=int, help="Redis database number (default: an empty one among 8-13)")
    p.add_argument("--keep-dir", action="store_true", help="keep the stack's directory (logs) afterwards")
    p.add_argument("--no-write", action="store_true", help="print only; do not write bench/results")
    args = p.parse_args(argv)
    defaults = (500, 100, 50, 3, 100) if args.quick else (3000, 300, 200, 5, 1024)
    names = ("requests", "serial_requests", "jobs", "timed_jobs", "upload_mb")
    for name, default in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)

    res: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_start": loadavg(),
    }
    print(f"machine: {res['machine']}; load average {res['load_start']}", flush=True)
    uvicorn_args = ("--log-level", "warning", "--no-access-log")
    extra_env = {
        "TENSORTRIM_MAX_UPLOAD_BYTES": str(max(4 * 1024**3, 2 * args.upload_mb * MiB)),
        "TENSORTRIM_QUOTA_CONCURRENT_JOBS": str(args.jobs + args.timed_jobs + 10),
        "TENSORTRIM_QUOTA_STORAGE_BYTES": str(64 * 1024**3),
        "TENSORTRIM_MIN_FREE_BYTES": str(1024**3),
        "TENSORTRIM_WORKER_THREADS": str(min(4, os.cpu_count() or 1)),
        # One API key drives every request: lift the per-key limit (10/s by default) so that it never
        # refuses, while every request still pays for the check (a Redis script call in full mode).
        "TENSORTRIM_RATE_LIMIT_PER_S": "1000000",
        "TENSORTRIM_RATE_LIMIT_BURST": "10000000",
    }
    t_start = time.perf_counter()
    with full_stack(extra_env=extra_env, redis_db=args.redis_db, keep_dir=args.keep_dir,
                    uvicorn_args=uvicorn_args) as stack:
        rss_at_start = proc_status(stack.api_pid)["VmRSS"]
        model = stack.work_dir / "tiny.pt"
        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(TinyNet()), str(model))
        with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=300, trust_env=False) as client:
            t = time.perf_counter()
            r = check(client.post(f"{API}/models", params={"input_spec": INPUT_SPEC, "name": "tiny.pt"},
                                  content=model.read_bytes(), headers={"Content-Type": "application/octet-stream"}),
                      201)
            model_upload_s = round(time.perf_counter() - t, 3)
        model_id = str(r.json()["id"])
        print(f"uploaded the tiny model in {model_upload_s} s (with sandboxed inspection): {model_id}", flush=True)
        res["settings"] = {
            "quick": args.quick,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "serial_requests": args.serial_requests,
            "client_keepalive_expiry_s": 3.0,
            "jobs": args.jobs,
            "timed_jobs": args.timed_jobs,
            "settle_s": args.settle,
            "upload_mb": args.upload_mb,
            "chunk_kib": args.chunk_kib,
            "budget": BUDGET,
            "input_spec": INPUT_SPEC,
            "uvicorn": ["--factory", "app.main:create_app", "--host", "127.0.0.1", *uvicorn_args],
            "worker": "celery -A worker.celery_app worker -Q gpu,cpu --concurrency 1 --without-mingle "
                      "--without-gossip --without-heartbeat",
            "redis_db": stack.redis_db,
            "env": {k: v for k, v in stack.public_settings().items()
                    if k not in ("TENSORTRIM_DATA_DIR", "TENSORTRIM_DATABASE_URL")},
            "database": "postgresql 127.0.0.1:5432, a fresh database per run (dropped after)",
        }
        res["tiny_model_upload_s"] = model_upload_s
        res["api_rss_at_start"] = rss_at_start
        res["api_rss_after_model_upload"] = proc_status(stack.api_pid)["VmRSS"]
        res["reads"] = {}
        asyncio.run(read_latency(stack, model_id, args, res["reads"]))
        res["load_before_jobs"] = loadavg()
        res["jobs"] = job_latency(stack, model_id, args)
        stack.stop_worker()
        res["load_before_upload"] = loadavg()
        if args.upload_mb > 0:
            res["upload"] = upload(stack, model, args)
        else:
            res["upload"] = {"skipped": "--upload-mb 0"}
    res["load_end"] = loadavg()
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    md = render(res)
    print(md)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        stem = "service.quick" if args.quick else "service"
        (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        (RESULTS / f"{stem}.md").write_text(md)
        print(f"wrote {RESULTS / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
