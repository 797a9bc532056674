"""Recompute the hash chains of ``decision_events`` and report the first broken link."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from audit.codec import DECISION_COLUMNS, decompress_trace, genesis, link_hash, values_from_row


@dataclass(frozen=True, slots=True)
class BrokenLink:
    day: dt.date
    chain_id: str
    seq: int
    decision_id: str
    problem: str

    def __str__(self) -> str:
        return (f"broken link: day {self.day} chain {self.chain_id} seq {self.seq} "
                f"decision {self.decision_id}: {self.problem}")


@dataclass(slots=True)
class VerifyReport:
    rows: int = 0
    chains: int = 0
    broken: BrokenLink | None = None
    days: list[dt.date] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken is None


def verify(url: str, *, start: dt.date | None = None, end: dt.date | None = None) -> VerifyReport:
    """Check every chain of the UTC days ``start`` to ``end`` (inclusive); stop at the first break.

    A chain must start at seq 1 with :func:`~audit.codec.genesis`, be contiguous, link each
    ``prev_hash`` to the previous row's ``hash``, and every ``hash`` must match the row's content.
    """
    report = VerifyReport()
    clauses, params = [], []
    if start is not None:
        clauses.append("decided_at >= %s")
        params.append(dt.datetime.combine(start, dt.time(), tzinfo=dt.UTC))
    if end is not None:
        clauses.append("decided_at < %s")
        params.append(dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC))
    where = " AND ".join(clauses) or "TRUE"
    sql = (f"SELECT {', '.join(DECISION_COLUMNS)}, (decided_at AT TIME ZONE 'UTC')::date AS day "
           f"FROM decision_events WHERE {where} ORDER BY day, chain_id, seq")
    key: tuple[dt.date, str] | None = None
    expect_seq, prev = 1, ""
    with psycopg.connect(url, row_factory=dict_row) as conn, conn.cursor(name="audit_verify") as cur:
        cur.itersize = 2000
        cur.execute(sql, params)
        for row in cur:
            report.rows += 1
            k = (row["day"], row["chain_id"])
            if k != key:
                key, expect_seq, prev = k, 1, genesis(row["day"], row["chain_id"])
                report.chains += 1
                if row["day"] not in report.days:
                    report.days.append(row["day"])
            problem = _check(row, expect_seq, prev)
            if problem:
                report.broken = BrokenLink(row["day"], row["chain_id"], row["seq"], row["decision_id"], problem)
                return report
            expect_seq, prev = row["seq"] + 1, row["hash"]
    return report


def _check(row: dict[str, Any], expect_seq: int, prev: str) -> str:
    if row["seq"] != expect_seq:
        return f"expected seq {expect_seq}, found {row['seq']} (rows missing)"
    if row["prev_hash"] != prev:
        return "prev_hash does not match the previous row's hash"
    try:
        trace_json = decompress_trace(bytes(row["trace_z"]))
    except Exception as exc:
        return f"trace cannot be decoded: {exc}"
    if link_hash(prev, values_from_row(row), trace_json) != row["hash"]:
        return "hash does not match the row's content (altered)"
    return ""
