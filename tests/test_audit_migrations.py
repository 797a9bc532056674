"""The audit log's schema migrations: a database a newer release migrated, downgrades under the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
