"""Per-API-key request rate limits: a token bucket per key.

``rate_limit_per_s`` tokens flow into a bucket of ``rate_limit_burst``; each request takes
one. In full mode the buckets live in Redis (one Lua script, Redis's clock, so every API
replica shares them); in embedded mode in this process. An empty bucket answers 429 with
``Retry-After``. If Redis is unreachable the request is let through: an outage of the
limiter must not become an outage of the API (the outage itself shows in /readyz).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from app.problems import Problem
from app.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "tensortrim:rl:"

# KEYS[1] bucket; ARGV rate (tokens/s), burst, cost. Returns {allowed, seconds to wait}.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed, wait = 0, 0
if tokens >= cost then tokens = tokens - cost; allowed = 1 else wait = (cost - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class RateLimited(Problem):
    status, code = 429, "rate_limited"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0


class Limiter(Protocol):
    def take(self, key: str, cost: float = 1.0) -> Decision: ...


class MemoryLimiter:
    """Buckets in this process (embedded mode: one API process)."""

    def __init__(self, rate: float, burst: int, clock: Any = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, cost: float = 1.0) -> Decision:
        with self._lock:
            now = self.clock()
            tokens, ts = self._buckets.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + max(0.0, now - ts) * self.rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return Decision(True)
            self._buckets[key] = (tokens, now)
            return Decision(False, (cost - tokens) / self.rate)


class RedisLimiter:
    """Buckets in Redis, shared by every API replica."""

    def __init__(self, url: str, rate: float, burst: int) -> None:
        import redis

        self.rate, self.burst = rate, burst
        self.client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self.script = self.client.register_script(_LUA)
        self._warned = 0.0

    def take(self, key: str, cost: float = 1.0) -> Decision:
        try:
            allowed, wait = self.script(keys=[KEY_PREFIX + key], args=[self.rate, self.burst, cost])
        except Exception as e:  # noqa: BLE001  (fail open, loudly but not on every request)
            if time.monotonic() - self._warned > 30:
                log.warning("rate limiter unavailable, letting requests through: %s", e)
                self._warned = time.monotonic()
            return Decision(True)
        return Decision(bool(int(allowed)), float(wait))


def make_limiter(settings: Settings) -> Limiter | None:
    if settings.rate_limit_per_s <= 0:
        return None
    if settings.mode == "full" and settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisLimiter(settings.broker_url, settings.rate_limit_per_s, settings.rate_limit_burst)
    return MemoryLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)


def enforce(limiter: Limiter | None, key: str, settings: Settings) -> None:
    """Take one token for ``key`` or raise 429 with ``Retry-After``."""
    if limiter is None:
        return
    decision = limiter.take(key)
    if not decision.allowed:
        wait = max(1, math.ceil(decision.retry_after_s))
        raise RateLimited(
            f"too many requests for this API key: the limit is {settings.rate_limit_per_s:g} per second with "
            f"bursts of {settings.rate_limit_burst}; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
