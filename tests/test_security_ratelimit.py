"""Per-API-key rate limits (token buckets: in-process in embedded mode, in Redis in full
mode) and the quotas, each a 429 problem detail with ``Retry-After`` and a clear message."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest

from app.services.rate_limit import MemoryLimiter, RedisLimiter
from tests.api_support import API, Api, assert_problem, make_api  # noqa: F401

REDIS_URL = os.environ.get("TENSORTRIM_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def test_memory_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = MemoryLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("k").allowed for _ in range(4)] == [True, True, True, False]
    denied = limiter.take("k")
    assert not denied.allowed and denied.retry_after_s == pytest.approx(0.5)
    assert limiter.take("other").allowed  # buckets are per key
    now[0] = 0.5
    assert limiter.take("k").allowed and not limiter.take("k").allowed
    now[0] = 100.0
    assert [limiter.take("k").allowed for _ in range(4)] == [True, True, True, False]  # capped at the burst


def test_redis_bucket_is_shared_between_limiters() -> None:
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.exceptions.ConnectionError as e:
        pytest.skip(f"Redis not reachable: {e}")
    key = uuid.uuid4().hex
    a, b = RedisLimiter(REDIS_URL, rate=0.5, burst=2), RedisLimiter(REDIS_URL, rate=0.5, burst=2)
    assert a.take(key).allowed and b.take(key).allowed  # two API replicas, one bucket
    denied = a.take(key)
    assert not denied.allowed and 0 < denied.retry_after_s <= 2.0
    down = RedisLimiter("redis://127.0.0.1:1/0", rate=0.5, burst=1)  # nothing listens there
    assert all(down.take(key).allowed for _ in range(3))  # fails open


def _burst(api: Api, headers: dict[str, str], n: int) -> list[int]:
    return [api.client.get(f"{API}/models", headers=headers).status_code for _ in range(n)]


def test_api_answers_429_with_retry_after_per_key(make_api: Callable[..., Api], engine: object) -> None:  # noqa: F811
    if getattr(engine, "url").get_backend_name() != "sqlite":  # noqa: B009
        pytest.skip("the limiter does not depend on the database backend")
    api = make_api(rate_limit_per_s=0.2, rate_limit_burst=3)
    alice, bob = api.user(), api.user()
    assert _burst(api, alice, 4) == [200, 200, 200, 429]
    r = api.client.get(f"{API}/models", headers=alice)
    body = assert_problem(r, 429, code="rate_limited")
    assert int(r.headers["Retry-After"]) >= 1 and "per second" in body["detail"] and "retry in" in body["detail"]
    assert _burst(api, bob, 3) == [200, 200, 200]  # another key has its own bucket
    assert api.client.get("/healthz").status_code == 200  # unauthenticated probes are not limited


def test_api_rate_limit_in_full_mode_lives_in_redis(make_api: Callable[..., Api], engine: object) -> None:  # noqa: F811
    redis = pytest.importorskip("redis")
    if getattr(engine, "url").get_backend_name() != "sqlite":  # noqa: B009
        pytest.skip("the limiter does not depend on the database backend")
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.exceptions.ConnectionError as e:
        pytest.skip(f"Redis not reachable: {e}")
    first = make_api(mode="full", broker_url=REDIS_URL, rate_limit_per_s=0.2, rate_limit_burst=2)
    second = make_api(mode="full", broker_url=REDIS_URL, rate_limit_per_s=0.2, rate_limit_burst=2)
    h = first.user()
    assert _burst(first, h, 1) == [200]
    assert isinstance(first.app.state.rate_limiter, RedisLimiter)
    assert _burst(second, h, 2) == [200, 429]  # the other replica sees the same bucket


def test_quota_429s_carry_retry_after(make_api: Callable[..., Api], engine: object) -> None:  # noqa: F811
    if getattr(engine, "url").get_backend_name() != "sqlite":  # noqa: B009
        pytest.skip("quotas are covered on both backends in test_api_jobs")
    from tests.api_support import model_bytes

    api = make_api(quota_concurrent_jobs=1, quota_storage_bytes=len(model_bytes()) + 10)
    h = api.user()
    model = api.upload_model(h)
    api.create_job(h, model["id"])
    r = api.client.post(f"{API}/jobs", headers=h,
                        json={"model_id": model["id"], "input_spec": "3,16,16", "budget": "flops:2x"})
    body = assert_problem(r, 429, code="too_many_jobs")
    assert int(r.headers["Retry-After"]) > 0 and "cancel" in body["detail"]
    r = api.client.post(f"{API}/models", headers=h, files={"file": ("m.pt", model_bytes())})
    body = assert_problem(r, 429, code="storage_quota_exceeded")
    assert int(r.headers["Retry-After"]) > 0 and "delete" in body["detail"]
