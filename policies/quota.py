"""Quota counters: requests and tokens per tenant and minute, in process or shared in Redis.

Read before the guard stage (``PolicyGuard.prefetch``), added to after a decision
(``PolicyGuard.commit``). Windows are fixed calendar minutes. Updates are atomic; a read and
the later add are not one transaction, so concurrent decisions of one tenant may overshoot a
limit by at most the number in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("infermesh.policies.quota")
WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    requests: int
    tokens: int

    def as_state(self) -> dict[str, int]:
        return {"requests": self.requests, "tokens": self.tokens, "window_s": WINDOW_S}


class QuotaCounters(Protocol):
    def read(self, tenant: str, now: float) -> QuotaUsage: ...

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None: ...


def _window(now: float) -> int:
    return int(now // WINDOW_S)


class InMemoryQuotaCounters:
    """Per-process counters.

    >>> c = InMemoryQuotaCounters()
    >>> c.add("acme", 120.0, 1, 700); c.add("acme", 150.0, 1, 300)
    >>> c.read("acme", 179.0), c.read("acme", 180.0)
    (QuotaUsage(requests=2, tokens=1000), QuotaUsage(requests=0, tokens=0))
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], list[int]] = {}
        self._lock = threading.Lock()

    def read(self, tenant: str, now: float) -> QuotaUsage:
        c = self._counts.get((tenant, _window(now)))
        return QuotaUsage(c[0], c[1]) if c else QuotaUsage(0, 0)

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None:
        w = _window(now)
        with self._lock:
            c = self._counts.setdefault((tenant, w), [0, 0])
            c[0] += requests
            c[1] += tokens
            if len(self._counts) > 10_000:  # drop windows that ended
                for key in [k for k in self._counts if k[1] < w - 1]:
                    del self._counts[key]


class RedisQuotaCounters:
    """Counters shared by every replica: one Redis hash per tenant and minute.

    ``add`` is one MULTI/EXEC transaction (HINCRBY requests, HINCRBY tokens, EXPIRE), so
    concurrent replicas never lose an update; keys expire after two windows.
    """

    def __init__(self, url: str, *, prefix: str = "infermesh:quota", timeout_s: float = 0.25) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.errors = 0

    def _key(self, tenant: str, now: float) -> str:
        return f"{self.prefix}:{tenant}:{_window(now)}"

    def read(self, tenant: str, now: float) -> QuotaUsage:
        req, tok = self._redis.hmget(self._key(tenant, now), "requests", "tokens")
        return QuotaUsage(int(req or 0), int(tok or 0))

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None:
        key = self._key(tenant, now)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, "requests", requests)
        pipe.hincrby(key, "tokens", tokens)
        pipe.expire(key, 2 * WINDOW_S)
        pipe.execute()


def counters_from_url(redis_url: str) -> QuotaCounters:
    """Redis-shared counters when a URL is given, else in-process ones."""
    return RedisQuotaCounters(redis_url) if redis_url else InMemoryQuotaCounters()


Clock = Callable[[], float]
default_clock: Clock = time.time
