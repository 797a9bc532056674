"""The audit log's start in the service (``audit.integration``): the day partitions ahead are created once.

``database.prepare`` creates them at start-up, before the writer starts; the upkeep's first round,
run at once on its thread, used to create the same partitions a second time.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from audit import database, partitions
from audit.integration import build_audit_parts
from audit.upkeep import run_upkeep


def _count_ensure_ahead(monkeypatch: pytest.MonkeyPatch) -> list[dt.date]:
    """The ``today`` of every :func:`partitions.ensure_ahead` call from now on."""
    calls: list[dt.date] = []
    real = partitions.ensure_ahead

    def counting(conn: psycopg.Connection[Any], *, today: dt.date, days_ahead: int) -> list[dt.date]:
        calls.append(today)
        return real(conn, today=today, days_ahead=days_ahead)

    monkeypatch.setattr(partitions, "ensure_ahead", counting)
    return calls


def test_the_service_start_creates_the_partitions_ahead_once(fresh_pg_url: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_ensure_ahead(monkeypatch)
    first_round = threading.Event()
    real_retention = partitions.apply_retention

    def retention(conn: psycopg.Connection[Any], **kw: Any) -> list[dt.date]:
        try:
            return real_retention(conn, **kw)
        finally:
            first_round.set()  # the upkeep's round is over once retention has run

    monkeypatch.setattr(partitions, "apply_retention", retention)
    settings = SimpleNamespace(data_dir=tmp_path, database_url=fresh_pg_url, worker=None)
    parts = build_audit_parts({"writer": "thread", "spool_dir": str(tmp_path / "spool")}, settings=settings)
    try:
        assert first_round.wait(30)
    finally:
        assert parts.close is not None
        parts.close()
    today = dt.datetime.now(dt.UTC).date()
    assert calls == [today]
    with psycopg.connect(fresh_pg_url) as conn:
        have = set(partitions.list_partitions(conn))
    assert {today + dt.timedelta(days=i) for i in range(4)} <= have  # partitions_ahead_days 3, as before


def test_an_upkeep_round_on_another_day_than_the_one_ensured_still_creates_them(
        fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up just before midnight: the first round, after it, creates the new day's partitions."""
    ensured = database.prepare(fresh_pg_url)
    calls = _count_ensure_ahead(monkeypatch)
    assert run_upkeep(fresh_pg_url, retention_days=0, days_ahead=3, ahead_ensured=ensured,
                      today=lambda: ensured) == []
    assert calls == []
    nxt = ensured + dt.timedelta(days=1)
    run_upkeep(fresh_pg_url, retention_days=0, days_ahead=3, ahead_ensured=ensured, today=lambda: nxt)
    assert calls == [nxt]
