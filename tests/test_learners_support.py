"""Helpers of the learner tests: schema set-up and audit rows written the way the audit log stores them."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import zlib
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent


def _migration(name: str) -> Any:
    path = next((ROOT / "migrations" / "versions").glob(f"{name}_*.py"))
    spec = importlib.util.spec_from_file_location(f"_mig_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def migrate(url: str) -> None:
    """Bring ``url`` to the head revision through Alembic (the audit package's entry point)."""
    try:
        from audit.migrate import upgrade
    except ImportError:  # the audit package's migration runner is not there: run the DDL directly
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_migration("0001").UPGRADE)
            conn.execute(_migration("0002").UPGRADE)
        return
    upgrade(url)


def insert_decision(conn: psycopg.Connection[Any], *, decision_id: str, decided_at: float, learner: str,
                    propensity: float, trace: dict[str, Any]) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS decision_events_learners_test PARTITION OF decision_events DEFAULT")
    conn.execute(
        "INSERT INTO decision_events (decision_id, decided_at, chain_id, seq, status, request_id, tenant, user_tier,"
        " model, propensity, policy_revision, learner, reason, event_version, trace_z, prev_hash, hash)"
        " VALUES (%s, %s, 'test', 0, 'routed', %s, 't', 'standard', 'm', %s, 'rev', %s, '', 1, %s, '', '')",
        (decision_id, dt.datetime.fromtimestamp(decided_at, dt.UTC), decision_id, propensity, learner,
         zlib.compress(json.dumps(trace).encode())))


def insert_outcome(conn: psycopg.Connection[Any], *, decision_id: str, reward: float | None, reported_at: float,
                   status: str = "ok", ttft_ms: float = 100.0) -> None:
    conn.execute(
        "INSERT INTO outcomes (decision_id, status, ttft_ms, latency_ms, input_tokens, output_tokens, reward,"
        " reported_at, event_version) VALUES (%s, %s, %s, 0, 0, 0, %s, %s, 1)",
        (decision_id, status, ttft_ms, reward, dt.datetime.fromtimestamp(reported_at, dt.UTC)))
