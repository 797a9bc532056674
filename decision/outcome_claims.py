"""One learner update per outcome across replicas: a shared claim on the decision id.

A client may send an outcome to any replica (a load balancer, a retry after a lost reply). The
replica that decided holds the decision in memory and learns from it; another one finds it in the
shared audit log and learns from that. Without a shared claim, an outcome that reached replica B
first and whose retry then reached replica A (still holding the decision) was learnt twice and
trued up against the tenant's token quota twice; and a replica timing a decision out while
another learnt its real outcome learnt both. Whoever claims the decision id first learns; the
others answer the outcome as a duplicate.

The claim is one Redis ``SET NX EX`` (the Redis the quota counters share). When Redis cannot be
reached the claim is granted (counted in ``errors``): learning an outcome twice is a smaller harm
than never learning it. A claim is released when recording the outcome fails (e.g. the audit log
refused it), so the caller's retry can take it again.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from decision.log_throttle import ThrottledWarnings
from decision.redis_thread import ThreadConnections

log = logging.getLogger("infermesh.claims")


class OutcomeClaims(Protocol):
    """Who records (and learns) a decision's outcome, among the replicas sharing a log."""

    def claim(self, decision_id: str) -> bool:
        """True when this replica is the first to record an outcome for ``decision_id``."""
        ...

    def release(self, decision_id: str) -> None:
        """Give a claim back: recording the outcome failed and the caller may retry it."""
        ...


class RedisOutcomeClaims:
    """Claims as Redis keys ``<prefix>:<decision id>``, kept ``ttl_s`` seconds.

    Parameters
    ----------
    url : str
        The Redis URL (``INFERMESH_REDIS_URL``).
    ttl_s : float
        How long a claim is kept: longer than any retry of the outcome may come (the service uses
        twice the outcome timeout).
    prefix : str
        Key prefix.
    timeout_s : float
        Socket timeout of each call.

    Its connections carry the client name ``infermesh-claims-<pid>`` (Redis ``CLIENT LIST``);
    :meth:`close` closes them.

    Examples
    --------
    >>> import uuid
    >>> claims = RedisOutcomeClaims("redis://127.0.0.1:6379/0", ttl_s=60, prefix=f"doctest:{uuid.uuid4().hex}")
    >>> claims.claim("d1"), claims.claim("d1"), claims.claim("d2")
    (True, False, True)
    >>> claims.release("d1"); claims.claim("d1")
    True
    >>> claims.close()
    """

    def __init__(self, url: str, *, ttl_s: float, prefix: str = "infermesh:outcome", timeout_s: float = 0.25) -> None:
        import redis

        self._redis: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                client_name=f"infermesh-claims-{os.getpid()}")
        self._conns = ThreadConnections(self._redis, "the outcome claims")  # each outcome claims on its thread
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.prefix = prefix
        self.errors = 0
        self._warn = ThrottledWarnings(log, interval_s=60.0)

    def claim(self, decision_id: str) -> bool:
        try:
            return self._conns.call("SET", f"{self.prefix}:{decision_id}", 1, "NX", "PX", self.ttl_ms) is not None
        except Exception as exc:  # granted: a duplicate update beats a lost one
            self.errors += 1
            self._warn.warning("claim", "outcome claims unavailable (%s): outcomes are learnt without them", exc)
            return True

    def release(self, decision_id: str) -> None:
        try:
            self._conns.call("DEL", f"{self.prefix}:{decision_id}")
        except Exception as exc:  # the claim expires with its ttl; a retry before then is answered duplicate
            self.errors += 1
            self._warn.warning("release", "could not release the outcome claim of %s: %s", decision_id, exc)

    def close(self) -> None:
        """Close the connections (the service's stop, after the last outcome); a second call does nothing.
        A claim after it is granted and counted in ``errors``, as when Redis cannot be reached."""
        self._conns.close()
        self._redis.close()
