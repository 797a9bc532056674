"""``infermesh bench learner-store``: its readings are of real pages, and it measures in a scratch database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg

from audit import database
from learners.bench import measure
from tests.conftest import ROOT


def test_each_size_reads_every_delta_once_from_a_cold_start(fresh_pg_url: str) -> None:
    database.prepare(fresh_pg_url)
    rows = measure(fresh_pg_url, [3, 40], deltas=2, repeat=1)
    assert [r["ids"] for r in rows] == [3, 40]
    assert [r["cold_start_deltas"] for r in rows] == [6, 80]  # each size its own learner key
    assert all(r["cold_start_pages"] >= 1 and r["caught_up_ms"] > 0 and r["one_new_ms"] > 0 for r in rows)


def test_the_command_prints_a_table_and_a_json_line_and_leaves_the_log_untouched(fresh_pg_url: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "decision.cli", "bench", "learner-store", "--ids", "5", "--ids", "50",
                           "--repeat", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "INFERMESH_DATABASE_URL": fresh_pg_url})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "replica ids" in proc.stdout and "caught up ms" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["ids"] for r in result["rows"]] == [5, 50] and result["caught_up_growth"] > 0
    with psycopg.connect(fresh_pg_url) as conn:  # not even migrated: the bench had a database of its own
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
