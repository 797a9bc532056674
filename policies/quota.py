"""Quota counters: requests and tokens per tenant and minute, in process or shared in Redis.

A decision holds its share before the guard stage and keeps it only if it is routed:
``PolicyGuard.prefetch`` *reserves* (one atomic add that answers the usage before it), the rules
judge that usage, and ``PolicyGuard.release`` gives the share back when the request is denied or
fails. Two concurrent decisions of one tenant therefore see distinct counts and cannot both take
the last unit of a limit, whichever replica they run in. The price is the other way round: a share
held by a request that is denied a moment later can make a concurrent one at the boundary be
denied too (the quota is never overshot; it may be under-used by the requests in flight).
Windows are fixed calendar minutes.
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

    def reserve(self, tenant: str, now: float, requests: int, tokens: int) -> QuotaUsage:
        """Add atomically and answer the usage *before* this addition."""
        ...

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None:
        """Add (negative amounts give a reservation back)."""
        ...


def _window(now: float) -> int:
    return int(now // WINDOW_S)


class InMemoryQuotaCounters:
    """Per-process counters.

    >>> c = InMemoryQuotaCounters()
    >>> c.add("acme", 120.0, 1, 700); c.reserve("acme", 150.0, 1, 300)
    QuotaUsage(requests=1, tokens=700)
    >>> c.read("acme", 179.0), c.read("acme", 180.0)
    (QuotaUsage(requests=2, tokens=1000), QuotaUsage(requests=0, tokens=0))
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], list[int]] = {}
        self._lock = threading.Lock()

    def read(self, tenant: str, now: float) -> QuotaUsage:
        c = self._counts.get((tenant, _window(now)))
        return QuotaUsage(c[0], c[1]) if c else QuotaUsage(0, 0)

    def reserve(self, tenant: str, now: float, requests: int, tokens: int) -> QuotaUsage:
        w = _window(now)
        with self._lock:
            c = self._counts.setdefault((tenant, w), [0, 0])
            before = QuotaUsage(c[0], c[1])
            c[0] += requests
            c[1] += tokens
            if len(self._counts) > 10_000:  # drop windows that ended
                for key in [k for k in self._counts if k[1] < w - 1]:
                    del self._counts[key]
        return before

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None:
        self.reserve(tenant, now, requests, tokens)


class RedisQuotaCounters:
    """Counters shared by every replica: one Redis hash per tenant and minute.

    ``reserve`` and ``add`` are one MULTI/EXEC transaction (HINCRBY requests, HINCRBY tokens,
    EXPIRE), so concurrent replicas never lose an update and each reservation answers the usage
    just before it; keys expire after two windows.
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

    def reserve(self, tenant: str, now: float, requests: int, tokens: int) -> QuotaUsage:
        key = self._key(tenant, now)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, "requests", requests)
        pipe.hincrby(key, "tokens", tokens)
        pipe.expire(key, 2 * WINDOW_S)
        req, tok, _ = pipe.execute()
        return QuotaUsage(int(req) - requests, int(tok) - tokens)

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None:
        self.reserve(tenant, now, requests, tokens)


def counters_from_url(redis_url: str) -> QuotaCounters:
    """Redis-shared counters when a URL is given, else in-process ones."""
    return RedisQuotaCounters(redis_url) if redis_url else InMemoryQuotaCounters()


Clock = Callable[[], float]
default_clock: Clock = time.time
