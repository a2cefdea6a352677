"""The full-stack benchmarks (bench/service.py, bench/soak.py), run for real through their
``main(argv)`` at tiny scale: a few requests, a few jobs, a 1 MiB upload, a 16 s soak.

``bench._stack.full_stack`` starts what it always starts (a database of its own on the
suite's Postgres, an empty Redis database, migrations, a uvicorn and Celery worker
subprocesses; the soak adds a private redis-server it restarts and a worker it kills
with SIGKILL); the results are written under tmp_path. Wall-clock numbers are only
checked to be positive: the machine is shared.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bench import _stack, service, soak
from tests.conftest import PG_ADMIN_URL


def bench_databases() -> set[str]:
    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'tensortrim_bench_%'"))
                       .scalars())
    finally:
        engine.dispose()


@pytest.fixture
def bench_env(pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The stack on the suite's Postgres (skipped, as the suite's database tests are, when it is not
    reachable) and Redis; its working directories and the results under tmp_path. Afterwards: the
    stack dropped its database and removed its directories."""
    redis = pytest.importorskip("redis")
    client = redis.Redis(host=_stack.REDIS_HOST, port=_stack.REDIS_PORT, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        pytest.skip(f"Redis not reachable at {_stack.REDIS_HOST}:{_stack.REDIS_PORT}: {e}")
    finally:
        client.close()
    monkeypatch.setattr(_stack, "PG_ADMIN_URL", PG_ADMIN_URL)
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # full_stack's and the soak's mkdtemp
    results = tmp_path / "results"
    monkeypatch.setattr(service, "RESULTS", results)
    monkeypatch.setattr(soak, "RESULTS", results)
    before = bench_databases()
    yield results
    assert bench_databases() <= before, "the benchmark left its database behind"
    assert not list(work.iterdir()), "the benchmark left its working directory behind"


def test_service_benchmark_reads_runs_jobs_and_streams_an_upload(bench_env: Path) -> None:
    argv = ["--requests", "20", "--concurrency", "4", "--serial-requests", "10", "--jobs", "4", "--timed-jobs", "1",
            "--upload-mb", "1", "--settle", "0.2", "--job-timeout", "240"]
    assert service.main(argv) == 0
    res = json.loads((bench_env / "service.json").read_text())
    md = (bench_env / "service.md").read_text()

    s = res["settings"]
    assert (s["requests"], s["concurrency"], s["serial_requests"], s["jobs"], s["timed_jobs"], s["upload_mb"]) == (
        20, 4, 10, 4, 1, 1)
    assert not s["quick"] and s["env"]["TENSORTRIM_MODE"] == "full" and s["env"]["TENSORTRIM_SECRET_KEY"] == "***"
    reads = res["reads"]
    assert reads["create_jobs"]["jobs"] == 4 and reads["cancelled"] == {"cancelled": 4}
    for key, (n, clients) in {"get_job": (20, 4), "list_jobs": (20, 4), "get_job_serial": (10, 1),
                              "list_jobs_serial": (10, 1)}.items():
        r = reads[key]
        assert (r["requests"], r["ok"], r["errors"], r["concurrency"]) == (n, n, {}, clients), key
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"] and r["rps"] > 0, key
    for label in ("`GET /api/v1/jobs/{id}` | 4 | 20 |", "`GET /api/v1/jobs?limit=20` | 1 | 10 |"):
        assert label in md

    jobs = res["jobs"]
    assert (jobs["timed_jobs"], jobs["succeeded"]) == (1, 1)
    assert [(r["warmup"], r["status"]) for r in jobs["runs"]] == [(True, "succeeded"), (False, "succeeded")]
    for r in jobs["runs"]:
        assert 0 < r["submit_to_running_s"] <= r["submit_to_terminal_s"]
        assert r["server_queued_s"] >= 0 and r["server_run_s"] > 0
        assert r["server_total_s"] == pytest.approx(r["server_queued_s"] + r["server_run_s"], abs=0.01)
        assert {"convert", "ranks", "decompose", "export"} <= set(r["engine_s"])  # from the job's report.json
    assert jobs["median_submit_to_succeeded_s"] == jobs["runs"][1]["submit_to_terminal_s"]
    assert "| warm-up | succeeded |" in md and "| 1 | succeeded |" in md

    up = res["upload"]
    assert "skipped" not in up, up
    assert (up["status_code"], up["problem"]) == (201, None)
    assert 1024**2 <= up["bytes"] < 1024**2 + 64 * 1024  # padded to the requested size
    assert all(up[k] > 0 for k in ("rss_before", "rss_after", "rss_peak_sampled", "hwm_after"))
    assert up["end_to_end_mb_s"] > 0 and "## Large upload" in md and "| HTTP status / model status | 201 /" in md
    assert res["total_s"] > 0 and math.isfinite(res["total_s"])


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the soak restarts a private redis-server")
def test_soak_loses_no_job_and_every_stored_byte_matches_its_sha256(bench_env: Path) -> None:
    argv = ["--seconds", "16", "--clients", "1", "--max-in-flight", "2", "--drain-timeout", "300"]
    assert soak.main(argv) == 0  # 0: nothing lost, nothing stuck, no checksum mismatch
    res = json.loads((bench_env / "soak.json").read_text())
    md = (bench_env / "soak.md").read_text()

    assert res["ok"] is True and (res["seconds"], res["clients"], res["max_in_flight"]) == (16, 1, 2)
    assert [f["fault"] for f in res["faults"]] == ["kill -9 worker soak-a", "redis restart (messages lost)"]
    assert res["faults"][0]["at_s"] < res["faults"][1]["at_s"] <= 16
    assert res["lost_jobs"] == [] and res["non_terminal"] == []
    assert res["artifact_mismatches"] == [] and res["model_mismatches"] == []
    assert res["uploads"] >= 1 and res["models_in_db"] >= res["uploads"]  # (uploads are retried without a key)
    assert res["jobs_created"] >= 1 and res["jobs_in_db"] == res["jobs_created"]  # retried with one Idempotency-Key
    assert sum(res["status"].values()) == res["jobs_created"]
    succeeded = res["status"].get("succeeded", 0)
    assert succeeded >= 1 and res["downloads_checked"] == succeeded  # every compressed model.pt downloaded
    assert res["artifacts_checked"] > res["downloads_checked"]
    assert res["latency"]["upload"]["n"] >= res["uploads"] and res["latency"]["create_job"]["n"] >= 1
    assert "| verdict | OK |" in md and "| lost / stuck | 0 / 0 |" in md
