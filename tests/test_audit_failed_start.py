"""``build_audit_parts`` failing part way (the partition upkeep, the auditors' router) stops what it had
started, newest first (the writer process and its threads, the reader's connection pool, the upkeep),
and re-raises: a caller that goes on keeps no writer, thread or database session."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import audit.integration
from audit.upkeep import Upkeep
from decision.config import Settings
from tests.test_learners_support import migrate
from tests.test_service_failed_start import _new, _running, _sessions, _settled_sessions


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _settled(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Whether ``check`` holds within ``timeout_s`` (a closed connection's other end ends a moment later)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("step", ["upkeep", "router"])
def test_an_audit_start_failing_after_its_writer_started_stops_what_it_had_started(
        step: str, fresh_pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    migrate(fresh_pg_url)
    before, threads, sessions = _running(), _threads(), _sessions(fresh_pg_url)
    running: list[str] = []

    def upkeep_start_fails(self: Upkeep) -> Upkeep:
        running.extend(_new(before))
        raise RuntimeError("a later step failed")

    def router_fails(*_args: Any, **_kwargs: Any) -> Any:
        running.extend(_new(before))
        raise RuntimeError("a later step failed")

    if step == "upkeep":  # after the writer and the reader's pool
        monkeypatch.setattr(Upkeep, "start", upkeep_start_fails)
    else:  # after the upkeep too
        monkeypatch.setattr(audit.integration, "build_router", router_fails)
    settings = Settings(database_url=fresh_pg_url, data_dir=tmp_path)
    with pytest.raises(RuntimeError, match="a later step failed"):
        audit.integration.build_audit_parts({"writer": "process"}, settings=settings)
    assert "infermesh-audit-writer" in running  # the test's premise: the writer process ran
    assert _new(before) == []
    assert _settled(lambda: not [t.name for t in _threads() - threads if t.is_alive()]), \
        [t.name for t in _threads() - threads]  # the writer's, the reader pool's and the upkeep's threads
    assert _settled_sessions(fresh_pg_url, sessions) == sessions  # the writer's and the reader pool's sessions
