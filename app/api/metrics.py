"""``/metrics``: Prometheus text format. Request counts and latency by route template
(not raw path, so ids do not explode the label set), and jobs by status, read from
the database at scrape time. Each app has its own registry (tests build many apps).

Served without an API key, like /healthz: keep it off the public ingress."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.models import Job, JobStatus


class _JobsByStatus(Collector):
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("tensortrim_jobs", "Jobs by status", labels=["status"])
        sessions = getattr(self.app.state, "sessions", None)
        if sessions is not None:
            with sessions() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            for status in JobStatus:
                gauge.add_metric([status.value], counts.get(status.value, 0))
        yield gauge


class _RequestMetrics:
    """Pure ASGI middleware (safe with streaming responses such as SSE)."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = {"method": scope["method"], "route": template, "status": str(status)}
            self.requests.labels(**labels).inc()
            self.latency.labels(method=scope["method"], route=template).observe(time.perf_counter() - start)


def install(app: FastAPI) -> None:
    registry = CollectorRegistry()
    requests = Counter(
        "tensortrim_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "tensortrim_http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry
    )
    registry.register(_JobsByStatus(app))
    app.add_middleware(_RequestMetrics, requests=requests, latency=latency)  # type: ignore[arg-type]

    @app.get("/metrics", include_in_schema=False)
    def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics_registry = registry


