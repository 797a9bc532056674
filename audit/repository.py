"""Reading the audit log: one decision, filtered pages, exports, stats. Every query is parameterised.

:class:`AuditRepository` also implements :class:`decision.contracts.TraceReader` for ``Explain``
and for outcomes reported after a restart.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from audit.codec import load_trace
from audit.events import from_us, to_us

SUMMARY_COLUMNS = (
    "decision_id", "decided_at", "status", "request_id", "tenant", "user_tier", "model", "endpoint_id",
    "site_id", "region", "tier", "gpu_type", "propensity", "policy_revision", "learner", "expected_ttft_ms",
    "expected_cost_per_1k_tokens", "deny_rules", "reason", "decision_us",
)
OUTCOME_FIELDS = ("status", "ttft_ms", "latency_ms", "input_tokens", "output_tokens", "error", "reward",
                  "reported_at")
_SELECT = ", ".join(f"e.{c}" for c in SUMMARY_COLUMNS) + (
    ", o.status AS outcome_status, o.ttft_ms AS outcome_ttft_ms, o.latency_ms AS outcome_latency_ms"
    # Second, different outcomes reported for the decision (kept in outcome_conflicts, evidence too).
    ", (SELECT count(*) FROM outcome_conflicts c WHERE c.decision_id = e.decision_id) AS conflicting_outcomes")


class BadCursor(ValueError):
    """A pagination cursor that was not issued by us."""


def encode_cursor(decided_at: dt.datetime, decision_id: str) -> str:
    return base64.urlsafe_b64encode(f"{to_us(decided_at)}|{decision_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        us, _, did = raw.partition("|")
        if not did or "\x00" in did:  # a NUL would reach PostgreSQL, which refuses it (a 500)
            raise BadCursor("cursor")
        return from_us(int(us)), did
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise BadCursor("cursor") from exc


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """What auditors filter on; ``None`` means no filter. ``outcome_status='none'``: no outcome yet."""

    start: dt.datetime | None = None
    end: dt.datetime | None = None
    tenant: str | None = None
    region: str | None = None
    site: str | None = None
    tier: str | None = None
    model: str | None = None
    endpoint: str | None = None
    rule: str | None = None
    status: str | None = None
    outcome_status: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        simple = (("e.tenant", self.tenant), ("e.region", self.region), ("e.site_id", self.site),
                  ("e.tier", self.tier), ("e.model", self.model), ("e.endpoint_id", self.endpoint),
                  ("e.status", self.status))
        for column, value in simple:
            if value is not None:
                clauses.append(f"{column} = %s")
                params.append(value)
        if self.start is not None:
            clauses.append("e.decided_at >= %s")
            params.append(self.start)
        if self.end is not None:
            clauses.append("e.decided_at < %s")
            params.append(self.end)
        if self.rule is not None:
            clauses.append("e.deny_rules @> ARRAY[%s]::text[]")
            params.append(self.rule)
        if self.outcome_status == "none":
            clauses.append("o.decision_id IS NULL")
        elif self.outcome_status is not None:
            clauses.append("o.status = %s")
            params.append(self.outcome_status)
        return (" AND ".join(clauses) or "TRUE"), params


def _time_hint(decision_id: str) -> dt.datetime | None:
    """The millisecond timestamp a UUIDv7-style decision id carries (partition pruning)."""
    h = decision_id.replace("-", "")
    if len(h) != 32 or h[12] != "7":
        return None
    try:
        hint = from_us(int(h[:12], 16) * 1000)
    except (ValueError, OverflowError):  # not hex, or a stamp past datetime's range
        return None
    return hint if hint.year < 9999 else None  # room for the +-1 s window around it


def _row_out(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["decided_at"] = row["decided_at"].isoformat()
    out["deny_rules"] = list(row.get("deny_rules") or [])
    return out


class AuditRepository:
    """Queries over the audit tables through a small connection pool."""

    def __init__(self, url: str, *, max_size: int = 4) -> None:
        self.url = url
        self.pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            url, min_size=1, max_size=max_size, open=True,
            connection_class=psycopg.Connection[DictRow],
            kwargs={"row_factory": dict_row, "autocommit": True})

    def close(self) -> None:
        self.pool.close()

    # -- TraceReader --------------------------------------------------------------------------
    def get_decision(self, decision_id: str) -> dict[str, Any] | None:
        """The stored event with its full trace, its outcome (``None`` if unknown) and any later,
        different outcomes reported for it (``conflicting_outcomes``, oldest first). A decision
        submitted twice is one decision (its second link sits in ``decision_duplicates``, for
        ``audit verify`` only)."""
        if "\x00" in decision_id:  # no stored id has one, and PostgreSQL would refuse the query
            return None
        hint = _time_hint(decision_id)
        sql = ("SELECT e.*, to_jsonb(o) AS outcome, (SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY c.reported_at), "
               "'[]'::jsonb) FROM outcome_conflicts c WHERE c.decision_id = e.decision_id) AS conflicting_outcomes "
               "FROM decision_events e "
               "LEFT JOIN outcomes o ON o.decision_id = e.decision_id WHERE e.decision_id = %s")
        with self.pool.connection() as conn:
            row = None
            if hint is not None:
                row = conn.execute(sql + " AND e.decided_at >= %s AND e.decided_at < %s",
                                   (decision_id, hint - dt.timedelta(seconds=1),
                                    hint + dt.timedelta(seconds=1))).fetchone()
            if row is None:
                row = conn.execute(sql, (decision_id,)).fetchone()
        if row is None:
            return None
        out = _row_out(row)
        out["trace"] = load_trace(bytes(out.pop("trace_z")))
        out["decided_at_us"] = to_us(row["decided_at"])
        return out

    def reported_among(self, decision_ids: Sequence[str]) -> set[str]:
        """Which of ``decision_ids`` have an outcome (``decision.contracts.OutcomeLookup``): a replica asks
        before it learns an expired decision as a timeout that another replica recorded."""
        ids = [d for d in decision_ids if "\x00" not in d]
        if not ids:
            return set()
        with self.pool.connection() as conn:
            rows = conn.execute("SELECT decision_id FROM outcomes WHERE decision_id = ANY(%s)", (ids,)).fetchall()
        return {r["decision_id"] for r in rows}

    # -- auditors' queries ----------------------------------------------------------------------
    def list_decisions(self, *, filters: DecisionFilter, cursor: str | None = None,
                       limit: int = 50) -> tuple[list[dict[str, Any]], str | None]:
        """One page, newest first, and the cursor of the next page (``None`` at the end)."""
        where, params = filters.where()
        if cursor:
            at, did = decode_cursor(cursor)
            where += " AND (e.decided_at, e.decision_id) < (%s, %s)"
            params += [at, did]
        sql = (f"SELECT {_SELECT} FROM decision_events e LEFT JOIN outcomes o ON o.decision_id = e.decision_id "
               f"WHERE {where} ORDER BY e.decided_at DESC, e.decision_id DESC LIMIT %s")
        with self.pool.connection() as conn:
            rows = conn.execute(sql, [*params, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = encode_cursor(rows[-1]["decided_at"], rows[-1]["decision_id"]) if more and rows else None
        return [_row_out(r) for r in rows], nxt

    def iter_decisions(self, *, filters: DecisionFilter, with_trace: bool = False,
                       chunk: int = 1000) -> Iterator[dict[str, Any]]:
        """Every matching decision, newest first, streamed with a server-side cursor."""
        where, params = filters.where()
        extra = ", e.trace_z" if with_trace else ""
        sql = (f"SELECT {_SELECT}{extra} FROM decision_events e "
               f"LEFT JOIN outcomes o ON o.decision_id = e.decision_id "
               f"WHERE {where} ORDER BY e.decided_at DESC, e.decision_id DESC")
        with psycopg.connect(self.url, row_factory=dict_row) as conn, conn.cursor(name="audit_export") as cur:
            cur.itersize = chunk
            cur.execute(sql, params)
            for row in cur:
                out = _row_out(row)
                if with_trace:
                    out["trace"] = load_trace(bytes(out.pop("trace_z")))
                yield out

    def stats(self, *, filters: DecisionFilter) -> dict[str, Any]:
        """Decisions by status, denials by rule, routes by tier, TTFT by route, and how many decisions
        had a second, different outcome reported."""
        where, params = filters.where()
        base = f"FROM decision_events e LEFT JOIN outcomes o ON o.decision_id = e.decision_id WHERE {where}"
        with self.pool.connection() as conn:
            by_status = conn.execute(f"SELECT e.status, count(*) AS n {base} GROUP BY 1 ORDER BY 1",
                                     params).fetchall()
            by_rule = conn.execute(
                "SELECT r.rule, count(*) AS n FROM decision_events e "
                "LEFT JOIN outcomes o ON o.decision_id = e.decision_id "
                f"CROSS JOIN LATERAL unnest(e.deny_rules) AS r(rule) WHERE {where} "
                "GROUP BY 1 ORDER BY 2 DESC, 1", params).fetchall()
            by_tier = conn.execute(
                f"SELECT e.tier, count(*) AS n {base} AND e.status = 'routed' GROUP BY 1 ORDER BY 2 DESC",
                params).fetchall()
            conflicted = conn.execute(
                f"SELECT count(*) AS n {base} AND EXISTS (SELECT 1 FROM outcome_conflicts c "
                "WHERE c.decision_id = e.decision_id)", params).fetchone()
            ttft = conn.execute(
                f"SELECT e.endpoint_id, count(o.ttft_ms) AS n, avg(o.ttft_ms) AS mean_ms, "
                f"percentile_cont(0.5) WITHIN GROUP (ORDER BY o.ttft_ms) AS p50_ms, "
                f"percentile_cont(0.99) WITHIN GROUP (ORDER BY o.ttft_ms) AS p99_ms "
                f"{base} AND o.status = 'ok' GROUP BY 1 ORDER BY 2 DESC", params).fetchall()
        return {
            "decisions": {r["status"]: r["n"] for r in by_status},
            "total": sum(r["n"] for r in by_status),
            "denials_by_rule": {r["rule"]: r["n"] for r in by_rule},
            "routes_by_tier": {r["tier"]: r["n"] for r in by_tier},
            "ttft_by_route": [dict(r) for r in ttft],
            "decisions_with_conflicting_outcomes": int(conflicted["n"]) if conflicted else 0,
        }

    def counts(self) -> dict[str, int]:
        """Rows, distinct decision ids and outcome rows (for the zero-loss checks)."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM decision_events) AS rows, "
                "(SELECT count(DISTINCT decision_id) FROM decision_events) AS decisions, "
                "(SELECT count(*) FROM outcomes) AS outcomes").fetchone()
        assert row is not None
        return {k: int(v) for k, v in row.items()}
