"""PostgreSQL away and the spool's disk refusing writes: the batch is held in memory, not lost.

The writer used to count such a batch ``lost`` at once and then treat the spool as full. Now it
keeps the batch (bounded, in order), tries it again with backoff (PostgreSQL first, else the
spool) ahead of newer batches, and counts records lost only when they cannot be kept: past the
in-memory bound in fail-open mode, or at shutdown with neither the database nor the disk back.

The outage is real (the database refuses connections). The refusing disk is simulated: a full or
failing disk cannot be had on demand here (and root ignores a read-only directory), so the
spool's segment files fail their fsync with a patched ``OSError(ENOSPC)`` (see
:func:`_refuse_spool_fsync`), and the spool's own failed-append handling runs as it would.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audit import database, writer_process
from audit.settings import AuditSettings
from audit.verify import verify
from audit.writer import AuditWriter
from audit.writer_process import ProcessAuditWriter
from decision.errors import Unavailable
from tests.test_audit_integrity import dev, oev, stored_ids, writer
from tests.test_writer_process import _db_down, _db_up, _decision, _outcome, _started, _stored_whole, _wait


@pytest.fixture()
def db(fresh_pg_url: str) -> str:
    database.prepare(fresh_pg_url)
    return fresh_pg_url


def _refuse_spool_fsync(spool_dir: Path, refusing: Callable[[], bool],
                        setattr_: Callable[[Any, str, Any], None] | None = None) -> None:
    """SIMULATED DISK FAULT: while ``refusing()``, an fsync of a spool segment file under
    ``spool_dir`` raises ``OSError(ENOSPC)`` (the disk is full), as a real full disk reports it.

    ``setattr_`` installs the patch (a test's ``monkeypatch.setattr``); without one it is set for
    good (in a writer child process, which ends with the test).
    """
    real = os.fsync
    where = str(spool_dir.resolve())

    def fsync(fd: int) -> None:
        if refusing():
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(where) and target.endswith(".spool"):
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        real(fd)

    (setattr_ or setattr)(os, "fsync", fsync)


def _until(w: AuditWriter, done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Run the writer's idle rounds (as its thread does every flush interval) until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        w.process([])
        time.sleep(0.02)


def _outcomes(db: str, table: str) -> list[tuple[str, str]]:
    with psycopg.connect(db) as conn:
        return [(str(r[0]), str(r[1])) for r in conn.execute(f"SELECT decision_id, status FROM {table} ORDER BY 1")]


def test_a_batch_the_spool_refuses_is_held_then_spooled_when_the_disk_recovers_and_stored_once(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(a) Database down and the disk refusing, then the disk recovers, then the database."""
    w = writer(db, tmp_path)
    refusing = [True]
    _refuse_spool_fsync(w.spool.directory, lambda: refusing[0], monkeypatch.setattr)
    _db_down(db)
    try:
        w.process([("d", dev(1)), ("o", oev(1))])
        w.process([("d", dev(2))])
        assert (w.held_records, w.lost, w.invalid, w.spool.has_backlog, w.has_backlog) == (3, 0, 0, False, True)
        m = w.metrics()
        assert (m["held_records"], m["spool_failing"], m["lost"]) == (3.0, 1.0, 0.0)
        with pytest.raises(Unavailable):  # fail-closed: nothing durable takes records now
            w.submit_decision(dev(3))
        time.sleep(0.5)
        w.process([])  # tried again, refused again: still held, nothing lost, no empty segments left behind
        assert (w.held_records, w.lost, w.spool.segments()) == (3, 0, [])
        refusing[0] = False  # the disk has room again
        _until(w, lambda: w.held_records == 0)
        m = w.metrics()
        assert w.spool.has_backlog and (m["spool_failing"], m["held_records"], m["lost"]) == (0.0, 0.0, 0.0)
        w.submit_decision(dev(3))  # the bound lifts: taken, and spooled behind the held batches
        w.process(w._take())
    finally:
        _db_up(db)
    _until(w, lambda: not w.has_backlog)
    w.close()
    assert (w.lost, w.refused, w.invalid) == (0, 1, 0)
    _stored_whole(db, decisions=3, outcomes=1, conflicts=0)  # each once, every chain link there
    assert stored_ids(db) == ["d-1", "d-2", "d-3"]


def test_when_postgresql_returns_before_the_disk_the_held_batches_go_straight_to_it_in_order(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(b) The spool's backlog is older than what is held: replayed first, then the held batches are
    written directly (the disk still refusing), oldest first. A decision's second, different outcome
    is held: stored before the first one (spooled earlier), it would take the first one's place."""
    w = writer(db, tmp_path)
    refusing = [False]
    _refuse_spool_fsync(w.spool.directory, lambda: refusing[0], monkeypatch.setattr)
    _db_down(db)
    try:
        w.process([("d", dev(1)), ("o", oev(1))])  # spooled: the disk still takes writes
        refusing[0] = True
        w.process([("o", oev(1, status="error", ttft_ms=0.0))])  # refused by both: held
        w.process([("d", dev(2)), ("o", oev(2))])  # held behind it
        assert (w.held_records, w.spool.appended_records, w.lost) == (3, 1, 0)
    finally:
        _db_up(db)
    _until(w, lambda: not w.has_backlog)  # the disk refuses throughout
    assert refusing[0] and w.spool.appended_records == 1 and w.spool.replayed_records == 1
    assert (w.lost, w.held_records, w.metrics()["spool_failing"]) == (0, 0, 0.0)
    w.close()
    assert _outcomes(db, "outcomes") == [("d-1", "ok"), ("d-2", "ok")]
    assert _outcomes(db, "outcome_conflicts") == [("d-1", "error")]
    _stored_whole(db, decisions=2, outcomes=2, conflicts=1)


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
def test_what_is_held_is_bounded_fail_open_counts_the_overflow_fail_closed_refuses(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """(c) Records queued when the disk failed (4 queued, 3 in flight) are more than ``queue_max``
    (4): fail-open keeps 4 and counts the batch past the bound lost, then drops what comes at the
    door; fail-closed keeps all 7 and refuses. Every record is stored, lost or dropped: none silently."""
    w = writer(db, tmp_path, on_spool_full=mode, queue_max=4, batch_size=3)
    refusing = [True]
    _refuse_spool_fsync(w.spool.directory, lambda: refusing[0], monkeypatch.setattr)
    _db_down(db)
    try:
        for i in range(1, 5):
            w.submit_decision(dev(i))
        in_flight = w._take()
        for i in range(5, 8):  # room in the queue again, and nothing held yet: taken
            w.submit_decision(dev(i))
        w.deliver(w.prepare(in_flight), len(in_flight))  # d-1..d-3: refused by both, held
        w.process(w._take())  # d-4..d-6
        w.process(w._take())  # d-7
        assert w._q.empty()
        if mode == "fail_open":
            assert (w.held_records, w.lost, w.metrics()["lost"]) == (4, 3, 3.0)
            w.submit_decision(dev(8))  # at the bound: dropped and counted, not queued
            assert (w.dropped, w._q.qsize()) == (1, 0)
        else:
            assert (w.held_records, w.lost) == (7, 0)
            with pytest.raises(Unavailable):
                w.submit_decision(dev(8))
            assert w.refused == 1
        refusing[0] = False
    finally:
        _db_up(db)
    _until(w, lambda: not w.has_backlog)
    w.close()
    stored = stored_ids(db)
    if mode == "fail_open":
        assert stored == ["d-1", "d-2", "d-3", "d-7"] and (w.lost, w.dropped) == (3, 1)
        assert len(stored) + w.lost + w.dropped == 8
        assert not verify(db).ok  # the lost records' chain links are missing, and verify says so
    else:
        assert stored == [f"d-{i}" for i in range(1, 8)] and (w.lost, w.refused) == (0, 1)
        assert verify(db).ok


def test_at_shutdown_with_neither_postgresql_nor_the_disk_the_held_records_are_lost_loudly(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    w = writer(db, tmp_path, drain_timeout_s=0.5)
    _refuse_spool_fsync(w.spool.directory, lambda: True, monkeypatch.setattr)
    _db_down(db)
    try:
        w.process([("d", dev(1)), ("o", oev(1))])
        assert (w.held_records, w.lost) == (2, 0)
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="audit.writer"):
            w.finish()  # tries again until drain_timeout_s, then gives up
        w.close()
        assert time.monotonic() - t0 < 10
    finally:
        _db_up(db)
    assert (w.lost, w.held_records, w.metrics()["lost"], w.handled) == (2, 0, 2.0, 2)
    assert "2 records held in memory are lost" in caplog.text
    assert stored_ids(db) == []


def _child_refusing_disk(url: str, settings: dict[str, Any], chain_id: str, data: Connection, status: Connection,
                         nice: int) -> None:
    """The writer child, its spool's disk refusing writes (SIMULATED, see :func:`_refuse_spool_fsync`)
    while the file ``disk-full`` exists beside the spool folder."""
    spool = Path(settings["spool_dir"])
    flag = spool.parent / "disk-full"
    _refuse_spool_fsync(spool, flag.exists)
    _REAL_CHILD_MAIN(url, settings, chain_id, data, status, nice)


_REAL_CHILD_MAIN = writer_process._child_main


def test_the_writer_process_holds_what_the_spool_refuses_and_fail_closed_refuses_meanwhile(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child holds the records (unconfirmed: the parent would send them again to a replacement);
    the parent refuses new decisions while it does, and takes them again once the disk recovers."""
    monkeypatch.setattr(writer_process, "_child_main", _child_refusing_disk)
    spool, flag = tmp_path / "spool", tmp_path / "disk-full"
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=spool, flush_interval_s=0.05, retry_interval_s=0.2,
                                             connect_timeout_s=1))
    at = time.time()
    try:
        _started(w)
        _db_down(db)
        flag.touch()
        try:
            for i in range(5):
                w.submit_decision(_decision(i, at))
            w.submit_outcome(_outcome(0, 40.0, at + 1))
            _wait(lambda: w.metrics()["held_records"] == 6)
            m = w.metrics()
            assert (m["spool_failing"], m["lost"], m["spool_bytes"], m["queue_depth"]) == (1.0, 0.0, 0.0, 6.0)
            assert w.has_backlog and not w.flush(0.2)
            with pytest.raises(Unavailable):
                w.submit_decision(_decision(9, at))
            flag.unlink()  # the disk has room again
            _wait(lambda: w.metrics()["held_records"] == 0 and w.metrics()["spool_bytes"] > 0)
            assert w.metrics()["spool_failing"] == 0.0
            w.submit_decision(_decision(5, at))  # taken again
        finally:
            _db_up(db)
        assert w.flush(60)
        assert (w.metrics()["lost"], w.refused, w.restarts) == (0.0, 1, 0)
    finally:
        w.close()
    _stored_whole(db, decisions=6, outcomes=1, conflicts=0)
