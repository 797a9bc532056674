"""The writer process across a child's death: what a replacement is sent again, and how it stops.

Real PostgreSQL and real (spawned) writer children. An outage is a database that refuses
connections (``ALLOW_CONNECTIONS false``). "Died before its report was read" is made exact by a
parent that never hears its first child (:class:`_FirstChildUnheard`): that child writes or
spools as usual, and everything it handled is sent again to its replacement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from audit import database
from audit.settings import AuditSettings
from audit.spool import Spool
from audit.verify import verify
from audit.writer_process import ProcessAuditWriter
from tests.conftest import ADMIN_URL, ROOT


@pytest.fixture()
def db(fresh_pg_url: str) -> str:
    database.prepare(fresh_pg_url)
    return fresh_pg_url


class _FirstChildUnheard(ProcessAuditWriter):
    """The first child's reports never reach the parent: as if it died right after writing or
    spooling its batches, before its report was read (the window a resend must cope with)."""

    def _read_status(self, conn: Connection, base: int) -> None:
        if self.restarts == 0:  # the first child's reader (a replacement's starts after restarts += 1)
            try:
                while True:
                    conn.recv()
            except (EOFError, OSError):
                return
        super()._read_status(conn, base)


def _db_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _db_down(url: str) -> None:
    """An outage: the database refuses new connections and loses the ones it had."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{_db_name(url)}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                     (_db_name(url),))


def _db_up(url: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{_db_name(url)}" ALLOW_CONNECTIONS true')


def _wait(what: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _decision(i: int, at: float) -> dict[str, Any]:
    return {"decision_id": f"d-{i}", "decided_at": at + i * 0.001, "status": "routed", "request_id": f"r-{i}",
            "tenant": "acme", "model": "m", "trace": {"request": {"request_id": f"r-{i}"}}}


def _outcome(i: int, ttft_ms: float, at: float) -> dict[str, Any]:
    return {"decision_id": f"d-{i}", "status": "ok", "ttft_ms": ttft_ms, "latency_ms": 90.0, "reported_at": at}


def _submit_five_and_an_outcome(w: ProcessAuditWriter, at: float) -> None:
    for i in range(5):
        w.submit_decision(_decision(i, at))
    w.submit_outcome(_outcome(0, 40.0, at + 1))


@contextlib.contextmanager
def _children_stderr(path: Path) -> Iterator[Path]:
    """Within: the stderr of writer children spawned meanwhile goes to ``path``, only ever appended.

    Not ``capfd``: its every read truncates the file the children share, so a line a child writes
    between that read and the truncation is lost (a CI run waited 60 s for one that was). Not a
    fixture: pytest points fd 2 at its own capture again when the test's call begins.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    saved = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _stderr_says(path: Path, text: str) -> Callable[[], bool]:
    """A predicate for :func:`_wait`: whether ``text`` has been written to the children's stderr."""
    return lambda: text in path.read_text(errors="replace")


def _spooled_ids(spool_dir: Path) -> set[str]:
    spool = Spool(spool_dir, exclusive=False)
    return {row[0] for seg in spool_dir.glob("segment-*.spool") for batch in spool.read_segment(seg)
            for kind in ("d", "o") for row in batch[kind]}


def _counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        tables = ["decision_events", "outcomes", "outcome_conflicts"]
        row = conn.execute("SELECT to_regclass('decision_duplicates')").fetchone()
        if row is not None and row[0] is not None:  # a later migration's table, where it exists
            tables.append("decision_duplicates")
        out = {}
        for t in tables:
            n = conn.execute(f"SELECT count(*) FROM {t}").fetchone()
            assert n is not None
            out[t] = int(n[0])
        return out


def _stored_whole(url: str, decisions: int, outcomes: int, conflicts: int) -> None:
    """Each record once, no link of any chain missing."""
    c = _counts(url)
    assert c.pop("decision_events") == decisions and c.pop("outcomes") == outcomes
    assert c.pop("outcome_conflicts") == conflicts
    assert c.pop("decision_duplicates", 0) == 0
    report = verify(url)
    assert report.ok, report.broken


def test_records_a_dead_child_spooled_are_not_chained_again_by_its_replacement(db: str, tmp_path: Path) -> None:
    """The first child spools (PostgreSQL down) and dies before its report is read: its replacement
    is sent those records again and must leave them to the spool's replay, not chain them again
    (a second copy: a hole in its chain, the outcome stored twice as a "conflict")."""
    spool = tmp_path / "spool"
    # No retry within the test: the first child cannot replay its spool before it is killed.
    w = _FirstChildUnheard(db, AuditSettings(spool_dir=spool, flush_interval_s=0.05, retry_interval_s=60.0,
                                             connect_timeout_s=1))
    at = time.time()
    try:
        _db_down(db)
        try:
            _submit_five_and_an_outcome(w, at)
            _wait(lambda: _spooled_ids(spool) == {f"d-{i}" for i in range(5)})
        finally:
            _db_up(db)
        os.kill(w._proc.pid, signal.SIGKILL)
        assert w.flush(60)
        assert w.restarts == 1
    finally:
        w.close()
    _stored_whole(db, decisions=5, outcomes=1, conflicts=0)


def test_a_replacement_waits_for_postgresql_to_tell_what_its_predecessor_stored(
        db: str, tmp_path: Path) -> None:
    """The first child stored its records, PostgreSQL goes down and the child dies unheard: the
    replacement cannot ask what is stored. It retries (not "nothing is stored"): once PostgreSQL
    is back, the stored records are skipped."""
    with _children_stderr(tmp_path / "children-stderr.log") as child_stderr:
        w = _FirstChildUnheard(db, AuditSettings(spool_dir=tmp_path / "spool", flush_interval_s=0.05,
                                                 retry_interval_s=0.2, connect_timeout_s=1))
        at = time.time()
        try:
            _submit_five_and_an_outcome(w, at)
            _wait(lambda: _counts(db)["decision_events"] == 5 and _counts(db)["outcomes"] == 1)
            _db_down(db)
            try:
                os.kill(w._proc.pid, signal.SIGKILL)
                _wait(_stderr_says(child_stderr, "could not check resent records"))  # the replacement asks, and waits
                time.sleep(0.5)
            finally:
                _db_up(db)
            assert w.flush(60)
            assert w.restarts == 1
        finally:
            w.close()
    _stored_whole(db, decisions=5, outcomes=1, conflicts=0)


def test_while_postgresql_stays_down_a_replacement_still_skips_what_is_in_the_spool(
        db: str, tmp_path: Path) -> None:
    """PostgreSQL is down past the lookup's patience (``drain_timeout_s``): the replacement says so
    and skips what the spool holds (what it cannot know, it chains)."""
    with _children_stderr(tmp_path / "children-stderr.log") as child_stderr:
        spool = tmp_path / "spool"
        w = _FirstChildUnheard(db, AuditSettings(spool_dir=spool, flush_interval_s=0.05, retry_interval_s=0.2,
                                                 connect_timeout_s=1, drain_timeout_s=1.0))
        at = time.time()
        try:
            _db_down(db)
            try:
                _submit_five_and_an_outcome(w, at)
                _wait(lambda: _spooled_ids(spool) == {f"d-{i}" for i in range(5)})
                os.kill(w._proc.pid, signal.SIGKILL)
                _wait(_stderr_says(child_stderr, "skipping only those in the spool"))
                w.submit_decision(_decision(5, at))  # a new one, after the resend
                _wait(lambda: w._status.get("handled") == 7)
            finally:
                _db_up(db)
            assert w.flush(60)
        finally:
            w.close()
    _stored_whole(db, decisions=6, outcomes=1, conflicts=0)


def test_a_resent_second_different_outcome_is_kept_and_a_stored_one_is_not_stored_again(
        db: str, tmp_path: Path) -> None:
    """A decision's outcome is known by its content: a second, different report the dead child had
    not stored is kept (in outcome_conflicts), one it had stored (there) is not stored twice."""
    w = _FirstChildUnheard(db, AuditSettings(spool_dir=tmp_path / "spool", flush_interval_s=0.05))
    at = time.time()
    try:
        w.submit_decision(_decision(0, at))
        w.submit_decision(_decision(1, at))
        w.submit_outcome(_outcome(0, 40.0, at + 1))
        w.submit_outcome(_outcome(1, 41.0, at + 1))
        _wait(lambda: _counts(db)["outcomes"] == 2)
        w.submit_outcome(_outcome(0, 999.0, at + 2))  # a second report of d-0: stored, in outcome_conflicts
        _wait(lambda: _counts(db)["outcome_conflicts"] == 1)
        os.kill(w._proc.pid, signal.SIGSTOP)  # the child takes nothing more...
        w.submit_outcome(_outcome(1, 998.0, at + 2))  # ...so this second report of d-1 is never stored by it
        _wait(lambda: w._shipped == 6)
        os.kill(w._proc.pid, signal.SIGKILL)
        assert w.flush(60)
        assert w.restarts == 1
    finally:
        w.close()
    _stored_whole(db, decisions=2, outcomes=2, conflicts=2)
    with psycopg.connect(db) as conn:
        kept = conn.execute("SELECT decision_id, ttft_ms FROM outcome_conflicts ORDER BY decision_id").fetchall()
    assert kept == [("d-0", 999.0), ("d-1", 998.0)]


def _started(w: ProcessAuditWriter) -> None:
    _wait(lambda: w._status.get("pid") == w._proc.pid)  # the child runs its loop (and has set its signals)


def test_close_replaces_a_child_that_just_died_and_stores_what_it_held(db: str, tmp_path: Path) -> None:
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool", flush_interval_s=3.0))
    _started(w)
    at = time.time()
    for i in range(20):
        w.submit_decision(_decision(i, at))
    _wait(lambda: w._shipped == 20)  # the child holds them (it writes every 3 s)
    os.kill(w._proc.pid, signal.SIGKILL)
    w.close()  # before the shipper thread could replace it
    assert w.restarts == 1
    _stored_whole(db, decisions=20, outcomes=0, conflicts=0)


def test_close_does_not_hang_on_a_child_that_stopped_reading(db: str, tmp_path: Path) -> None:
    """A wedged child (here SIGSTOPped) left the shipper blocked on a full pipe and close() waiting on it forever."""
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool", flush_interval_s=0.05,
                                             drain_timeout_s=1.0))
    _started(w)
    os.kill(w._proc.pid, signal.SIGSTOP)
    at = time.time()
    padding = "x" * 4000  # a few hundred records fill the pipe's buffer
    for i in range(400):
        w.submit_decision({**_decision(i, at), "reason": padding})
    began = time.monotonic()
    w.close()
    assert time.monotonic() - began < 60 and w.restarts >= 1
    _stored_whole(db, decisions=400, outcomes=0, conflicts=0)


def test_the_child_ignores_sigterm_and_sigint_the_parent_stops_it(db: str, tmp_path: Path) -> None:
    """A stop signal to the whole process group (systemd, a terminal's ^C) reaches the writer
    child too: it keeps running until the parent, which handles the signal, closes it."""
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool", flush_interval_s=3.0))
    _started(w)
    at = time.time()
    for i in range(20):
        w.submit_decision(_decision(i, at))
    _wait(lambda: w._shipped == 20)
    pid = w._proc.pid
    try:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert w._proc.is_alive() and w._proc.pid == pid and w.restarts == 0
    finally:
        w.close()
    assert w._proc.exitcode == 0 and w.restarts == 0
    _stored_whole(db, decisions=20, outcomes=0, conflicts=0)


def test_close_says_how_many_records_no_child_could_take(db: str, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Every child dies at start (its spool cannot be made): close tries a few, then says what is lost."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=blocker / "spool"))
    at = time.time()
    for i in range(3):
        w.submit_decision(_decision(i, at))
    with caplog.at_level(logging.ERROR, logger="audit.writer_process"):
        t0 = time.monotonic()
        w.close()
    assert time.monotonic() - t0 < 60
    assert "3 records were never confirmed" in caplog.text


_NO_CLOSE = """
import sys, time
from pathlib import Path
from audit.settings import AuditSettings
from audit.writer_process import ProcessAuditWriter

if __name__ == "__main__":
    url, spool = sys.argv[1], Path(sys.argv[2])
    w = ProcessAuditWriter(url, AuditSettings(spool_dir=spool, flush_interval_s=3.0))
    at = time.time()
    for i in range(20):
        w.submit_decision({"decision_id": f"d-{i}", "decided_at": at + i * 0.001, "status": "routed",
                           "request_id": "r", "tenant": "acme", "trace": {}})
    while w._shipped < 20:
        time.sleep(0.01)
    # exits without close()
"""


def test_a_parent_that_exits_without_close_still_drains_the_child_and_does_not_hang(db: str,
                                                                                     tmp_path: Path) -> None:
    """multiprocessing's exit handling SIGTERMs daemon children and joins them without a timeout: a
    child that ignores SIGTERM must be closed first (else the exit hangs, or the records are lost)."""
    script = tmp_path / "no_close.py"
    script.write_text(_NO_CLOSE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), db, str(tmp_path / "spool")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _stored_whole(db, decisions=20, outcomes=0, conflicts=0)


def test_a_shipment_of_many_batches_is_written_in_batches_of_the_configured_size(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When decisions come faster than the writer takes them, one shipment down the pipe carries
    thousands of records. The child wrote each shipment as one transaction whatever its size (a
    19,475-row COPY in `bench audit`), so PostgreSQL's work on it did not overlap the writer's on
    the next one. Each transaction holds at most ``batch_size`` rows now."""
    monkeypatch.setattr("audit.writer_process._SHIP_EVERY_S", 0.5)  # the parent's shipper: one big shipment
    monkeypatch.setattr("audit.writer_process._SHIP_MAX", 100_000)
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool", batch_size=20, flush_interval_s=5.0))
    try:
        at = time.time()
        for i in range(300):
            w.submit_decision(_decision(i, at))
        assert w.flush(60)
    finally:
        w.close()
    with psycopg.connect(db) as conn:  # rows of one transaction share its xmin
        sizes = [n for (n,) in conn.execute("SELECT count(*) FROM decision_events GROUP BY xmin::text")]
    assert sum(sizes) == 300 and max(sizes) <= 20, sizes
    _stored_whole(db, decisions=300, outcomes=0, conflicts=0)
