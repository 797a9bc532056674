"""``infermesh bench audit`` measures in a scratch database: the configured audit log never sees it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from audit.database import scratch_database
from tests.conftest import ADMIN_URL

ROOT = Path(__file__).resolve().parent.parent


def _databases(prefix: str) -> set[str]:
    with psycopg.connect(ADMIN_URL) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                            (prefix + "%",))}


def test_bench_audit_leaves_the_configured_audit_log_untouched(fresh_pg_url: str) -> None:
    before = _databases("infermesh_bench")
    proc = subprocess.run([sys.executable, "-m", "decision.cli", "bench", "audit", "--rows", "400", "--rounds", "2",
                           "--duration", "0.1", "--service", "--service-seconds", "0.5", "--service-rounds", "1",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "INFERMESH_DATABASE_URL": fresh_pg_url})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["writer_rows_per_s"] > 0 and result["ratio"] > 0
    # Through the service: both servers answered, and the auditing one logged every call it answered.
    assert result["service_rps_audit_off"] > 0 and result["service_rps_audit_on"] > 0
    assert result["service_errors"] == 0
    assert result["service_rows"] == result["service_calls_audited"] > 0
    with psycopg.connect(fresh_pg_url) as conn:  # not even migrated: nothing was written there
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
    assert _databases("infermesh_bench") == before  # and the scratch database is gone


def test_a_scratch_database_is_dropped_whatever_happens() -> None:
    with pytest.raises(RuntimeError), scratch_database(ADMIN_URL, "infermesh_scratchtest") as url:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT current_database()").fetchone()
            assert row is not None and row[0].startswith("infermesh_scratchtest_")
        raise RuntimeError("the work failed")
    assert _databases("infermesh_scratchtest") == set()


def test_bench_audit_runs_the_configured_writer_settings(fresh_pg_url: str) -> None:
    # The service's settings: the config's audit section under INFERMESH_AUDIT_*, not the bench's own.
    proc = subprocess.run([sys.executable, "-m", "decision.cli", "bench", "audit", "--rows", "300", "--rounds", "1",
                           "--duration", "0.1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "INFERMESH_DATABASE_URL": fresh_pg_url,
                               "INFERMESH_AUDIT_WRITER": "thread", "INFERMESH_AUDIT_BATCH_SIZE": "123"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "writer thread, batch 123," in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["writer_rows_per_s"] > 0
