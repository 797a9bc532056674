"""`infermesh demo`, the main job, end to end in a subprocess: it must finish in under a minute."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_finishes_in_under_a_minute_and_leaves_the_audit_log(fresh_pg_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "INFERMESH_DATABASE_URL": fresh_pg_url, "INFERMESH_DATA_DIR": str(tmp_path),
           "COLUMNS": "120"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "decision.cli", "demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=90)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 60, f"demo took {elapsed:.1f} s"
    out = proc.stdout
    for needle in ("decisions/s", "Decide latency p50 / p99", "routes by tier", "simulated TTFT",
                   "why this route", "chosen", "infermesh audit why"):
        assert needle in out, needle
    assert "embedded PostgreSQL stops" not in out  # the database is an external one here
    total, routed_shown, refused_shown = map(int, re.search(  # the progress bar's count: refusals too
        r"decisions \(routed \+ refused\)\D+(\d+) \((\d+) \+ (\d+)\)", out).groups())  # type: ignore[union-attr]
    assert total == routed_shown + refused_shown and routed_shown > 0
    with psycopg.connect(fresh_pg_url) as conn:
        decisions = conn.execute("select count(*) from decision_events").fetchone()
        routed = conn.execute("select count(*) from decision_events where status = 'routed'").fetchone()
        outcomes = conn.execute("select count(*) from outcomes").fetchone()
    assert decisions is not None and routed is not None and outcomes is not None
    assert decisions[0] > 1000  # "a few thousand requests", denials included
    assert outcomes[0] > 0.95 * routed[0]  # every routed decision's outcome is reported (a few may be in flight)
