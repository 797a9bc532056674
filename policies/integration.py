"""The entry points the composition root (decision.service) calls."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from decision.contracts import Guard
from policies.bundle import compile_bundle
from policies.guard import PolicyGuard
from policies.quota import RedisQuotaCounters, counters_from_url
from policies.reload import PolicyReloader


def load_policy_guard(directory: Path) -> PolicyGuard:
    """A guard over a bundle folder, with in-process quota counters (benchmarks, ``decide``)."""
    return PolicyGuard(compile_bundle(directory))


def build_policy_parts(directory: Path, *, settings: Any, on_swap: Callable[[Guard], None],
                       on_failure: Callable[[str], None] | None = None) -> Any:
    """Guard, reload, health, stop (the file watcher) and close (the quota counters' Redis client, if
    any) for the service; quota shared in Redis if configured.
    ``on_failure`` hears of every rejected bundle (admin RPC, SIGHUP or the file watcher)."""
    from decision.service import PolicyParts

    counters = counters_from_url(str(getattr(settings, "redis_url", "") or ""))
    reloader = PolicyReloader(directory, on_swap, counters=counters, on_failure=on_failure)
    guard = reloader.load()
    reloader.start()

    def reload() -> tuple[bool, str, str]:
        r = reloader.reload(force=True)
        return r.ok, r.revision, r.error

    return PolicyParts(guard=guard, reload=reload, health=reloader.health, stop=reloader.stop,
                       close=counters.close if isinstance(counters, RedisQuotaCounters) else None)
