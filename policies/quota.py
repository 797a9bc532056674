"""Quota counters: requests and tokens per tenant and minute, in process or shared in Redis.

A decision holds its share before the guard stage and keeps it only if it is routed:
``PolicyGuard.prefetch`` *reserves* (one atomic add that answers the usage before it), the rules
judge that usage, and ``PolicyGuard.release`` gives the share back when the request is denied or
fails. Two concurrent decisions of one tenant therefore see distinct counts and cannot both take
the last unit of a limit, whichever replica they run in. The price is the other way round: a share
held by a request that is denied a moment later can make a concurrent one at the boundary be
denied too (the quota is never overshot; it may be under-used by the requests in flight).
Windows are fixed calendar minutes. A token quota holds a request's estimated tokens (prompt size
plus ``max_tokens``) at decision time; when its outcome says how many it used, ``PolicyGuard.settle``
trues the count up (a request that left ``max_tokens`` out is charged what it generated).

When the shared counters cannot be reached, the request is neither routed nor called over quota:
the service cannot decide (``UNAVAILABLE``). A reservation whose reply was lost (Redis slow, not
down) may have been applied; each share is named (a *hold*), so it is given back exactly once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from decision.redis_thread import ThreadConnections

log = logging.getLogger("infermesh.policies.quota")
WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    requests: int
    tokens: int

    def as_state(self) -> dict[str, int]:
        return {"requests": self.requests, "tokens": self.tokens, "window_s": WINDOW_S}


class QuotaCounters(Protocol):
    # Whether a call that raised may still have been applied (a remote store whose reply was lost).
    uncertain_failures: bool

    def read(self, tenant: str, now: float) -> QuotaUsage: ...

    def reserve(self, tenant: str, now: float, requests: int, tokens: int, hold: str = "") -> QuotaUsage:
        """Add atomically and answer the usage *before* this addition; ``hold`` names the share for
        :meth:`give_back`."""
        ...

    def give_back(self, tenant: str, now: float, requests: int, tokens: int, hold: str = "") -> None:
        """Give back a share :meth:`reserve` took at ``now``; with ``hold``, only if that share was taken
        and not given back already (idempotent, so it is safe after a reserve whose reply was lost)."""
        ...

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None:
        """Add (negative amounts give a reservation back)."""
        ...


def window_of(now: float) -> int:
    """The quota window (calendar minute) a time falls in."""
    return int(now // WINDOW_S)


class InMemoryQuotaCounters:
    """Per-process counters.

    >>> c = InMemoryQuotaCounters()
    >>> c.add("acme", 120.0, 1, 700); c.reserve("acme", 150.0, 1, 300)
    QuotaUsage(requests=1, tokens=700)
    >>> c.read("acme", 179.0), c.read("acme", 180.0)
    (QuotaUsage(requests=2, tokens=1000), QuotaUsage(requests=0, tokens=0))
    """

    uncertain_failures = False

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], list[int]] = {}
        self._lock = threading.Lock()
        self._swept = 0  # the window old entries were last dropped for

    def read(self, tenant: str, now: float) -> QuotaUsage:
        c = self._counts.get((tenant, window_of(now)))
        return QuotaUsage(c[0], c[1]) if c else QuotaUsage(0, 0)

    def reserve(self, tenant: str, now: float, requests: int, tokens: int, hold: str = "") -> QuotaUsage:
        w = window_of(now)
        with self._lock:
            c = self._counts.setdefault((tenant, w), [0, 0])
            before = QuotaUsage(c[0], c[1])
            c[0] = max(0, c[0] + requests)  # never below 0, as the Redis script
            c[1] = max(0, c[1] + tokens)
            if w > self._swept:  # drop windows that ended, once per window (not a scan per request)
                self._swept = w
                for key in [k for k in self._counts if k[1] < w - 1]:
                    del self._counts[key]
        return before

    def give_back(self, tenant: str, now: float, requests: int, tokens: int, hold: str = "") -> None:
        self.reserve(tenant, now, -requests, -tokens)  # in process, a reserve either happened or raised

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None:
        self.reserve(tenant, now, requests, tokens)


# Reserve: add to the window's counters and note the share under its hold key (value "<counter key>
# <requests> <tokens>"), in one atomic script. A counter never goes below 0: a give-back or true-up
# for a share that was never taken (a decision made under a policy without quota rules, settled by
# one with them) must not hand the tenant credit beyond its limit. Give back: only if the hold key is
# still there, so a give-back after a reserve whose reply was lost (applied or not) is exact, and a
# second one does nothing.
_RESERVE_LUA = """
local r = redis.call('HINCRBY', KEYS[1], 'requests', ARGV[1])
local t = redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[2])
if r < 0 then r = 0; redis.call('HSET', KEYS[1], 'requests', 0) end
if t < 0 then t = 0; redis.call('HSET', KEYS[1], 'tokens', 0) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if KEYS[2] ~= '' then
  redis.call('SET', KEYS[2], KEYS[1] .. ' ' .. ARGV[1] .. ' ' .. ARGV[2], 'EX', ARGV[4])
end
return {r, t}
"""
_GIVE_BACK_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
redis.call('DEL', KEYS[1])
local key, r, t = string.match(v, '^(.*) (%-?%d+) (%-?%d+)$')
if redis.call('EXISTS', key) == 0 then return 0 end  -- its window expired: nothing left to take from
if redis.call('HINCRBY', key, 'requests', -tonumber(r)) < 0 then redis.call('HSET', key, 'requests', 0) end
if redis.call('HINCRBY', key, 'tokens', -tonumber(t)) < 0 then redis.call('HSET', key, 'tokens', 0) end
return 1
"""
HOLD_TTL_S = 30  # a decision gives its share back (or keeps it) within milliseconds


class _Script:
    """A Lua script run by EVALSHA on the calling thread's own connection
    (:class:`~decision.redis_thread.ThreadConnections`: every decision reserves, on the thread that
    decides). A script Redis no longer holds (it restarted) is loaded through redis-py's own script
    object. Nothing is retried: a call whose reply was lost raises, the decision is UNAVAILABLE,
    and its share is given back by its hold.
    """

    def __init__(self, client: Any, source: str, conns: ThreadConnections) -> None:
        import redis

        self._no_script = redis.exceptions.NoScriptError  # looked up here, not on every reservation
        self._script = client.register_script(source)
        self._conns = conns

    def __call__(self, keys: list[str], args: tuple[int, ...] | list[int] = ()) -> Any:
        try:
            return self._conns.call("EVALSHA", self._script.sha, len(keys), *keys, *args)
        except self._no_script:
            return self._script(keys=keys, args=args)  # loads it, on a pooled connection


class RedisQuotaCounters:
    """Counters shared by every replica: one Redis hash per tenant and minute.

    ``reserve`` is one Lua script (HINCRBY requests, HINCRBY tokens, EXPIRE, and the share's hold
    key), so concurrent replicas never lose an update and each reservation answers the usage just
    before it; counter keys expire after two windows. A tenant's keys share a hash tag
    (``{tenant}``), so the script stays on one slot of a Redis Cluster. The scripts run on each
    thread's own connection (:class:`_Script`). The connections carry the client name
    ``infermesh-quota-<pid>`` (Redis ``CLIENT LIST``); :meth:`close` closes them.
    """

    uncertain_failures = True

    def __init__(self, url: str, *, prefix: str = "infermesh:quota", timeout_s: float = 0.25) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                client_name=f"infermesh-quota-{os.getpid()}")
        self._conns = ThreadConnections(self._redis, "the quota counters")  # one per thread, for both scripts
        self._reserve = _Script(self._redis, _RESERVE_LUA, self._conns)
        self._give_back = _Script(self._redis, _GIVE_BACK_LUA, self._conns)
        self.errors = 0

    def _key(self, tenant: str, now: float) -> str:
        return f"{self.prefix}:{{{tenant}}}:{window_of(now)}"

    def _hold_key(self, tenant: str, hold: str) -> str:
        return f"{self.prefix}:{{{tenant}}}:hold:{hold}" if hold else ""

    def read(self, tenant: str, now: float) -> QuotaUsage:
        req, tok = self._redis.hmget(self._key(tenant, now), "requests", "tokens")
        return QuotaUsage(int(req or 0), int(tok or 0))

    def reserve(self, tenant: str, now: float, requests: int, tokens: int, hold: str = "") -> QuotaUsage:
        req, tok = self._reserve(keys=[self._key(tenant, now), self._hold_key(tenant, hold)],
                                 args=[requests, tokens, 2 * WINDOW_S, HOLD_TTL_S])
        return QuotaUsage(int(req) - requests, int(tok) - tokens)

    def give_back(self, tenant: str, now: float, requests: int, tokens: int, hold: str = "") -> None:
        if hold:
            self._give_back(keys=[self._hold_key(tenant, hold)])
        else:
            self.reserve(tenant, now, -requests, -tokens)

    def add(self, tenant: str, now: float, requests: int, tokens: int) -> None:
        self.reserve(tenant, now, requests, tokens)

    def close(self) -> None:
        """Close the client's connections (the service's stop, after the last decision); a second call does nothing."""
        self._conns.close()
        self._redis.close()


def counters_from_url(redis_url: str) -> QuotaCounters:
    """Redis-shared counters when a URL is given, else in-process ones."""
    return RedisQuotaCounters(redis_url) if redis_url else InMemoryQuotaCounters()


Clock = Callable[[], float]
default_clock: Clock = time.time
