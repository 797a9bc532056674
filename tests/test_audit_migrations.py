"""The audit log's schema migrations: a database a newer release migrated, downgrades under the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audit import database, migrate

ROOT = Path(__file__).resolve().parent.parent
NEWER = "9999"  # a revision no release of this one's knows
(HEAD,), _ = migrate.script_heads_and_revisions()


def _stored(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return migrate.stored_revisions(conn)


def _stamp(url: str, revision: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = %s", (revision,))


def test_a_database_a_newer_release_migrated_is_named_not_an_alembic_traceback(fresh_pg_url: str) -> None:
    """Alembic said "Can't locate revision identified by '9999'" (a CommandError) from ``prepare``."""
    migrate.upgrade(fresh_pg_url)
    _stamp(fresh_pg_url, NEWER)
    with pytest.raises(migrate.UnknownRevision, match=f"schema revision {NEWER} is not one this infermesh knows"):
        migrate.upgrade(fresh_pg_url)
    with pytest.raises(migrate.UnknownRevision):
        migrate.downgrade(fresh_pg_url, "0007")
    with pytest.raises(database.NewerSchema) as raised:
        database.prepare(fresh_pg_url)
    # serve and the readers say the same: what is stored, what this release reads, and why
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, database.NoAuditLog)
    assert f"has schema revision {NEWER}; this infermesh reads {HEAD}: a newer release wrote it: " in str(raised.value)
    with pytest.raises(database.NewerSchema, match=f"{HEAD}: a newer release wrote it: read it with that release"):
        database.check_schema(fresh_pg_url)
    assert _stored(fresh_pg_url) == {NEWER}  # left as it was
    with psycopg.connect(fresh_pg_url) as conn:  # and the migration lock released
        assert conn.execute("SELECT pg_try_advisory_lock(%s)", (migrate.MIGRATION_LOCK,)).fetchone() == (True,)


def test_serve_on_a_database_a_newer_release_migrated_exits_2_with_one_line(fresh_pg_url: str,
                                                                             tmp_path: Path) -> None:
    migrate.upgrade(fresh_pg_url)
    _stamp(fresh_pg_url, NEWER)
    env = {**os.environ, "INFERMESH_DATABASE_URL": fresh_pg_url, "INFERMESH_DATA_DIR": str(tmp_path / "var")}
    done = subprocess.run([sys.executable, "-m", "decision.cli", "serve", "--config",
                           str(ROOT / "deploy" / "demo" / "infermesh.yaml"), "--grpc-port", "0", "--http-port", "0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert f"has schema revision {NEWER}; this infermesh reads {HEAD}: a newer release wrote it" in done.stderr
    assert _stored(fresh_pg_url) == {NEWER}


def _second_outcome(conn: psycopg.Connection[Any], day: str, chain_id: str = "w", seq: int = 1) -> None:
    conn.execute("INSERT INTO outcome_conflicts (decision_id, status, ttft_ms, latency_ms, input_tokens, output_tokens,"
                 " reported_at, event_version, chain_id, seq, prev_hash, hash) VALUES"
                 " ('d1', 'ok', 1, 1, 1, 1, %s, 1, %s, %s, 'p', 'h')", (f"{day} 13:00+00", chain_id, seq))


def test_a_downgrade_below_0007_is_refused_while_two_days_share_a_second_outcomes_link(fresh_pg_url: str) -> None:
    """0006's index holds one row per (chain_id, seq): recreating it failed with a UniqueViolation."""
    migrate.upgrade(fresh_pg_url)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        for day in ("2024-03-09", "2024-03-10"):  # a long-lived writer's chains restart each day
            _second_outcome(conn, day)
    with pytest.raises(RuntimeError, match=r"cannot downgrade below revision 0007: outcome_conflicts holds 1 "
                                           r"\(chain_id, seq\) pair\(s\) on more than one day \(the first: chain w "
                                           r"seq 1, reported 2024-03-09 and 2024-03-10\)"):
        migrate.downgrade(fresh_pg_url, "0006")
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        # One transaction: the revisions above 0007 are not taken down either, and nothing is lost.
        assert migrate.stored_revisions(conn) == {HEAD}
        assert conn.execute("SELECT to_regclass('audit_retention') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT count(*) FROM outcome_conflicts").fetchone() == (2,)
        conn.execute("DELETE FROM outcome_conflicts WHERE reported_at >= '2024-03-10'")
        _second_outcome(conn, "2024-03-10", seq=2)
    migrate.downgrade(fresh_pg_url, "0006")  # nothing only 0007 allows: it goes down, and up again
    assert _stored(fresh_pg_url) == {"0006"}
    migrate.upgrade(fresh_pg_url)
    assert _stored(fresh_pg_url) == {HEAD}


def test_a_downgrade_waits_for_the_migration_lock_as_an_upgrade_does(fresh_pg_url: str) -> None:
    """A replica starting (and upgrading) meanwhile must not race the DDL of a downgrade."""
    migrate.upgrade(fresh_pg_url)
    errors: list[BaseException] = []

    def down() -> None:
        try:
            migrate.downgrade(fresh_pg_url, "0007")
        except BaseException as exc:
            errors.append(exc)

    with psycopg.connect(fresh_pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate.MIGRATION_LOCK,))
        thread = threading.Thread(target=down)
        thread.start()
        thread.join(3.0)
        assert thread.is_alive() and _stored(fresh_pg_url) == {HEAD}  # waiting for the lock
        holder.execute("SELECT pg_advisory_unlock(%s)", (migrate.MIGRATION_LOCK,))
        thread.join(60)
    assert not thread.is_alive() and errors == [] and _stored(fresh_pg_url) == {"0007"}
