"""``Service.stop`` closes what the service holds after its last use: the learner store's session (after
the final snapshot) and the Redis clients of the quota counters and outcome claims (after the audit
drain); a start that fails part way closes the Redis clients too."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from decision import heap
from decision.config import Settings, load_config
from decision.outcome_claims import RedisOutcomeClaims
from decision.service import Service
from policies.quota import RedisQuotaCounters
from tests.conftest import REDIS_URL, ROOT
from tests.test_audit_failed_start import _settled
from tests.test_learners_replica_cli import _hold_demo_learner_id
from tests.test_learners_support import migrate
from tests.test_service_failed_start import _new, _running, _sessions, _settled_sessions

CONFIG = ROOT / "deploy" / "demo" / "infermesh.yaml"
# The client names this process's Redis clients give their connections (see the two classes).
REDIS_NAMES = (f"infermesh-quota-{os.getpid()}", f"infermesh-claims-{os.getpid()}")


def _redis_connections() -> set[int]:
    """Ids of the Redis connections this process's quota counters and outcome claims hold."""
    with redis.Redis.from_url(REDIS_URL) as admin:
        return {int(c["id"]) for c in admin.client_list() if c.get("name") in REDIS_NAMES}


def _store_sessions(url: str, application_name: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
    assert row is not None
    return int(row[0])


def _snapshots(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM learner_snapshots").fetchone()
    assert row is not None
    return int(row[0])


def _use_redis(counters: list[RedisQuotaCounters], claims: list[RedisOutcomeClaims]) -> None:
    """Open a connection of each client (they connect on first use)."""
    for c in counters:
        c.read("infermesh-test-resources", time.time())
    for cl in claims:
        cl.claim(f"infermesh-test-resources-{time.monotonic_ns()}")


@pytest.fixture()
def redis_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[RedisQuotaCounters],
                                                                      list[RedisOutcomeClaims]]]:
    """The quota counters and outcome claims made from now on."""
    counters: list[RedisQuotaCounters] = []
    claims: list[RedisOutcomeClaims] = []
    for cls, made in ((RedisQuotaCounters, counters), (RedisOutcomeClaims, claims)):
        real_init = cls.__init__

        def init(self: Any, *args: Any, _real: Any = real_init, _made: list[Any] = made, **kwargs: Any) -> None:
            _real(self, *args, **kwargs)
            _made.append(self)

        monkeypatch.setattr(cls, "__init__", init)
    yield counters, claims


def _settings(url: str, data_dir: Path, replica: str) -> Settings:
    # Two routers (workers): outcome claims in Redis, beside the quota counters the bundle's rules use.
    return Settings(database_url=url, data_dir=data_dir, replica=replica, redis_url=REDIS_URL, workers=2)


def test_stop_closes_the_learner_store_session_and_the_redis_clients_after_their_last_use(
        fresh_pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        redis_clients: tuple[list[RedisQuotaCounters], list[RedisOutcomeClaims]]) -> None:
    migrate(fresh_pg_url)
    before_redis = _redis_connections()
    service = Service(load_config(CONFIG), _settings(fresh_pg_url, tmp_path, "stop-closes"))
    try:
        assert service.learner_sync is not None and service.engine is not None
        app_name = service.learner_sync.store._app_name
        assert app_name is not None and _store_sessions(fresh_pg_url, app_name) == 1
        counters, claims = redis_clients
        assert len(counters) == 1 and len(claims) == 1 and service.engine.claims is claims[0]
        assert "quota_counters" not in service.health()  # reads the shared counters: a connection
        _use_redis([], claims)
        assert _redis_connections() - before_redis  # the test's premise: both hold a connection
        snapshots = _snapshots(fresh_pg_url)
    except BaseException:
        service.stop(0)
        raise
    with caplog.at_level(logging.ERROR, logger="infermesh.service"):
        service.stop(0)
    assert _snapshots(fresh_pg_url) == snapshots + 1  # the final snapshot was taken before the store closed
    assert _settled(lambda: _store_sessions(fresh_pg_url, app_name) == 0)
    assert _settled(lambda: not _redis_connections() - before_redis), _redis_connections() - before_redis
    _hold_demo_learner_id(fresh_pg_url, "stop-closes").close()  # the replica id was given back
    with caplog.at_level(logging.ERROR, logger="infermesh.service"):
        service.stop(0)  # a second stop does nothing: no final snapshot on the closed store
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert _snapshots(fresh_pg_url) == snapshots + 1


def test_a_failed_start_closes_the_redis_clients(
        fresh_pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        redis_clients: tuple[list[RedisQuotaCounters], list[RedisOutcomeClaims]]) -> None:
    migrate(fresh_pg_url)
    before, before_redis, sessions = _running(), _redis_connections(), _sessions(fresh_pg_url)
    opened: set[int] = set()

    def last_step_fails() -> None:  # the start's last step: both clients exist by now
        _use_redis(*redis_clients)
        opened.update(_redis_connections() - before_redis)
        raise RuntimeError("a later step failed")

    monkeypatch.setattr(heap, "settle", last_step_fails)
    with pytest.raises(RuntimeError, match="a later step failed"):
        Service(load_config(CONFIG), _settings(fresh_pg_url, tmp_path, "failed-start-redis"))
    assert len(opened) >= 2  # the test's premise: the counters and the claims each held a connection
    assert _settled(lambda: not _redis_connections() - before_redis), _redis_connections() - before_redis
    assert _new(before) == []
    assert _settled_sessions(fresh_pg_url, sessions) == sessions
