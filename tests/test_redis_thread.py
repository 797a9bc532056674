"""Redis commands on each thread's own connection (decision.redis_thread), and the outcome claims on them."""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import pytest

from decision.outcome_claims import RedisOutcomeClaims
from decision.redis_thread import ThreadConnections


@pytest.fixture()
def admin(redis_url: str) -> Any:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - the machine runs Redis
        pytest.skip(f"no Redis at {redis_url}: {exc}")
    yield client
    client.close()


def _named(admin: Any, name: str) -> list[int]:
    return [int(c["id"]) for c in admin.client_list() if c["name"] == name]


def test_each_thread_keeps_one_connection_and_an_error_reply_keeps_it(redis_url: str, admin: Any) -> None:
    import redis

    name = f"infermesh-test-thread-{uuid.uuid4().hex[:8]}"
    conns = ThreadConnections(redis.Redis.from_url(redis_url, client_name=name), "the test's connections")
    key = f"infermesh-test:{uuid.uuid4().hex[:8]}"
    try:
        mine = conns.call("CLIENT", "ID")
        assert conns.call("CLIENT", "ID") == mine  # the same connection, call after call
        admin.set(key, "text")
        with pytest.raises(redis.ResponseError):
            conns.call("INCR", key)  # an error reply: Redis answered, the connection is fine
        assert conns.call("CLIENT", "ID") == mine
        other: list[int] = []
        t = threading.Thread(target=lambda: other.append(conns.call("CLIENT", "ID")))
        t.start()
        t.join(10)
        assert other and other[0] != mine  # another thread, its own connection
        assert sorted(_named(admin, name)) == sorted([mine, other[0]])
    finally:
        conns.close()
        admin.delete(key)
    assert _named(admin, name) == []  # close() closed every thread's connection
    with pytest.raises(redis.ConnectionError, match="the test's connections are closed"):
        conns.call("PING")
    assert _named(admin, name) == []  # and none was opened after it


def test_a_connection_redis_closed_in_steady_use_is_replaced_before_the_command(redis_url: str, admin: Any) -> None:
    import redis

    name = f"infermesh-test-thread-{uuid.uuid4().hex[:8]}"
    conns = ThreadConnections(redis.Redis.from_url(redis_url, client_name=name), "the test's connections")
    try:
        first = conns.call("CLIENT", "ID")
        for _ in range(3):  # milliseconds apart: no idle time to wait for before checking
            assert admin.client_kill_filter(_id=conns.call("CLIENT", "ID")) == 1
            time.sleep(0.02)
            assert conns.call("PING") == b"PONG"  # not "Connection closed by server"
        assert conns.call("CLIENT", "ID") != first
        assert len(_named(admin, name)) == 1
    finally:
        conns.close()


def test_a_lost_reply_raises_and_the_next_command_opens_a_new_connection(redis_url: str, admin: Any) -> None:
    import redis

    name = f"infermesh-test-thread-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url, client_name=name, socket_timeout=0.2)
    conns = ThreadConnections(client, "the test's connections")
    try:
        first = conns.call("CLIENT", "ID")
        with pytest.raises(redis.TimeoutError):
            conns.call("BLPOP", f"infermesh-test:{uuid.uuid4().hex}", 1)  # no reply within the socket timeout
        # Not reused: a reply still on its way would answer the next command.
        assert conns.call("CLIENT", "ID") != first
    finally:
        conns.close()


def test_outcome_claims_run_on_the_thread_connection_and_survive_a_killed_one(redis_url: str, admin: Any) -> None:
    claims = RedisOutcomeClaims(redis_url, ttl_s=60, prefix=f"infermesh-test-claims:{uuid.uuid4().hex[:8]}")
    name = f"infermesh-claims-{os.getpid()}"
    before = set(_named(admin, name))
    try:
        assert claims.claim("d1") and not claims.claim("d1")
        ours = set(_named(admin, name)) - before
        assert len(ours) == 1
        assert sum(admin.client_kill_filter(_id=i) for i in ours) == 1
        time.sleep(0.02)
        assert claims.claim("d2") and not claims.claim("d2")
        claims.release("d2")
        assert claims.claim("d2")
        assert claims.errors == 0  # nothing was granted for want of Redis
        assert admin.pttl(f"{claims.prefix}:d2") > 50_000  # kept for the ttl
    finally:
        claims.close()
        admin.delete(*(f"{claims.prefix}:{d}" for d in ("d1", "d2")))
    assert not set(_named(admin, name)) - before
    assert claims.claim("d3") and claims.errors == 1  # closed: granted and counted, as when Redis is away
