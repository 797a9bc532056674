"""Helpers of the learner tests: schema set-up and audit rows written the way the audit log stores them."""

from __future__ import annotations

import datetime as dt
import json
import zlib
from typing import Any

import psycopg

from audit.migrate import upgrade


def migrate(url: str) -> None:
    """Bring ``url`` to the head revision through Alembic."""
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
