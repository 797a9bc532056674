"""A Service whose start fails part way stops what it had started (the audit writer process, the
bundle's file watcher, the learner store's session) and re-raises: an embedding caller keeps nothing."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import psycopg
import pytest

from decision import heap
from decision.config import Settings, load_config
from decision.service import Service
from learners.store import ReplicaInUse
from tests.conftest import ROOT
from tests.test_learners_replica_cli import _hold_demo_learner_id
from tests.test_learners_support import migrate

CONFIG = ROOT / "deploy" / "demo" / "infermesh.yaml"
# Threads a started Service runs until stopped (besides the writer process): none may outlive a failed start.
STARTED_THREADS = {"policy-watch", "audit-upkeep", "audit-shipper", "audit-status", "audit-writer"}


def _running() -> set[object]:
    """This process's audit writer processes and the threads a Service runs until stopped."""
    return ({p for p in multiprocessing.active_children() if p.name == "infermesh-audit-writer"}
            | {t for t in threading.enumerate() if t.name in STARTED_THREADS})


def _new(before: set[object]) -> list[str]:
    """What runs now that did not before (by name): another test's leftovers are not this test's."""
    return sorted(str(getattr(x, "name", x)) for x in _running() - before)


def _sessions(url: str) -> int:
    """Other sessions on the test's database (the writer's, the audit reader's, the learner store's...)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def _settled_sessions(url: str, expected: int, timeout_s: float = 10.0) -> int:
    """The session count once it reaches ``expected`` (a closed session's backend ends a moment later)."""
    deadline = time.monotonic() + timeout_s
    while (n := _sessions(url)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def test_a_step_failing_after_the_audit_writer_started_stops_what_had_started(
        fresh_pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    migrate(fresh_pg_url)
    before, sessions = _running(), _sessions(fresh_pg_url)
    running: list[str] = []

    def last_step_fails() -> None:  # the start's last step: everything else has started by now
        running.extend(_new(before))
        raise RuntimeError("a later step failed")

    monkeypatch.setattr(heap, "settle", last_step_fails)
    settings = Settings(database_url=fresh_pg_url, data_dir=tmp_path, replica="failed-start")
    with pytest.raises(RuntimeError, match="a later step failed") as failed:
        Service(load_config(CONFIG), settings)
    assert {"infermesh-audit-writer", "policy-watch"} <= set(running)  # the test's premise
    assert _new(before) == []
    assert _settled_sessions(fresh_pg_url, sessions) == sessions  # the learner's store session too
    # The replica id is free again, while the failed Service is still reachable (from the traceback).
    assert failed.value.__traceback__ is not None
    _hold_demo_learner_id(fresh_pg_url, "failed-start").close()


def test_a_start_refused_for_a_held_replica_id_stops_the_writer_and_ends_its_sessions(
        fresh_pg_url: str, tmp_path: Path) -> None:
    migrate(fresh_pg_url)
    holder = _hold_demo_learner_id(fresh_pg_url, "held")
    try:
        before, sessions = _running(), _sessions(fresh_pg_url)
        with pytest.raises(ReplicaInUse) as refused:
            Service(load_config(CONFIG), Settings(database_url=fresh_pg_url, data_dir=tmp_path, replica="held"))
        assert _new(before) == []
        # Closed, not left to the collector: the refused start's frames are still reachable (the traceback).
        assert refused.value.__traceback__ is not None
        assert _settled_sessions(fresh_pg_url, sessions) == sessions
    finally:
        holder.close()
