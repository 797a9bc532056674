"""Stopping with the learners' database failing: the audit log still drains, and nothing waits forever."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import psycopg
import pytest

from decision.config import Settings, load_config
from decision.service import AuditParts, Service
from learners.features import FEATURE_NAMES
from learners.linucb import LinUCB
from learners.store import DeltaConflict, LearnerStore
from learners.sync import LearnerSync
from tests.conftest import ROOT
from tests.pg_proxy import PgProxy
from tests.test_learners_support import migrate

D = len(FEATURE_NAMES)


class _Store:
    """A learner store that only says whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _FailingSync:
    """A learner sync whose final snapshot raises, as a database fault or a clashing writer makes it."""

    def __init__(self) -> None:
        self.stopped = False
        self.store = _Store()

    def start(self, interval_s: float = 5.0, snapshot_every_s: float = 60.0) -> None:
        """Nothing to run."""

    def stop(self, *, final_snapshot: bool = True) -> None:
        self.stopped = True
        raise DeltaConflict("learner delta 'pod-a'/2 of linucb is already stored with other contents")


def test_service_stop_drains_the_audit_log_when_the_final_learner_snapshot_raises(
        caplog: pytest.LogCaptureFixture) -> None:
    service = Service(load_config(ROOT / "deploy" / "demo" / "infermesh.yaml"), Settings(), audit_enabled=False)
    drained: list[str] = []
    sync = _FailingSync()
    service.learner_sync = sync
    service.audit = AuditParts(close=lambda: drained.append("closed"))
    with caplog.at_level(logging.ERROR, logger="infermesh.service"):
        service.stop(0)
    assert sync.stopped and drained == ["closed"]
    assert sync.store.closed  # its session (and the replica id with it) ends all the same
    assert any("final snapshot" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_learner_stop_against_a_database_that_does_not_answer_returns_within_a_bound(fresh_pg_url: str) -> None:
    """The connection stays open and every packet is acknowledged (a proxy on the way), but no answer comes:
    neither the server's statement timeout nor TCP notices; stop() blocked until the network came back."""
    migrate(fresh_pg_url)
    proxy = PgProxy(fresh_pg_url)
    store = LearnerStore(proxy.url(), connect_timeout_s=2, statement_timeout_s=1.0)
    learner = LinUCB(D, seed=1)
    sync = LearnerSync(learner, store, FEATURE_NAMES, replica="pod-a")
    outcome: list[BaseException | None] = []

    def stop() -> None:
        try:
            sync.stop(final_snapshot=True)
            outcome.append(None)
        except BaseException as exc:  # reported to the test below
            outcome.append(exc)

    try:
        sync.restore()
        sync.start(interval_s=0.1, snapshot_every_s=60.0)
        learner.update(tuple(np.full(D, 0.1)), 1.0)
        time.sleep(0.5)
        with proxy.paused():
            learner.update(tuple(np.full(D, 0.2)), 1.0)
            started = time.monotonic()
            stopper = threading.Thread(target=stop, daemon=True)
            stopper.start()
            stopper.join(15.0)
            elapsed = time.monotonic() - started
            assert not stopper.is_alive(), "stop() still blocked"
        assert elapsed < 10.0  # the answer deadline (statement timeout + 2 s), then a bounded reconnect
        assert isinstance(outcome[0], psycopg.OperationalError)  # said, not swallowed: the snapshot is not stored
    finally:
        proxy.close()
        store.close()


def test_connecting_to_a_database_that_does_not_answer_gives_up_after_the_connect_timeout() -> None:
    """A listener that never answers the start-up packet; libpq's default would wait for ever."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    failed: list[BaseException] = []

    def connect() -> None:
        try:
            LearnerStore(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout_s=2).close()
        except BaseException as exc:  # reported to the test below
            failed.append(exc)

    try:
        started = time.monotonic()
        attempt = threading.Thread(target=connect, daemon=True)
        attempt.start()
        attempt.join(15.0)
        assert not attempt.is_alive(), "still connecting"
        assert time.monotonic() - started < 8.0
        assert failed and isinstance(failed[0], psycopg.OperationalError)
    finally:
        silent.close()
