"""Recompute the hash chains of ``decision_events`` and ``outcomes``; report the first broken link."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from audit import partitions
from audit.codec import (
    DECISION_COLUMNS,
    OUTCOME_COLUMNS,
    OUTCOME_HASHED_COLUMNS,
    decompress_trace,
    genesis,
    link_hash,
    outcome_genesis,
    values_from_row,
)


@dataclass(frozen=True, slots=True)
class BrokenLink:
    day: dt.date
    chain_id: str
    seq: int
    decision_id: str
    problem: str
    table: str = "decision_events"

    def __str__(self) -> str:
        what = "decision" if self.table == "decision_events" else "outcome of decision"
        return (f"broken link in {self.table}: day {self.day} chain {self.chain_id} seq {self.seq} "
                f"{what} {self.decision_id}: {self.problem}")


@dataclass(slots=True)
class VerifyReport:
    rows: int = 0  # decision rows (decision_events)
    chains: int = 0  # decision chains
    decision_duplicates: int = 0  # links of decisions submitted again (decision_duplicates), verified too
    broken: BrokenLink | None = None
    days: list[dt.date] = field(default_factory=list)
    outcome_rows: int = 0  # outcome_conflicts' rows included
    outcome_chains: int = 0
    outcome_conflicts: int = 0
    unchained_outcomes: int = 0  # stored before outcomes were chained (migration 0004)

    @property
    def ok(self) -> bool:
        return self.broken is None


def day_start(day: dt.date) -> dt.datetime:
    """Midnight UTC at the start of ``day``."""
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def after_day(day: dt.date) -> dt.datetime | None:
    """Midnight UTC after ``day`` (an exclusive bound that takes the whole day), or ``None`` for the
    last day a date can name (9999-12-31): nothing comes after it, so there is no upper bound."""
    return None if day == dt.date.max else day_start(day + dt.timedelta(days=1))


def _where(column: str, start: dt.date | None, end: dt.date | None) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if start is not None:
        clauses.append(f"{column} >= %s")
        params.append(day_start(start))
    bound = None if end is None else after_day(end)
    if bound is not None:
        clauses.append(f"{column} < %s")
        params.append(bound)
    return " AND ".join(clauses) or "TRUE", params


def verify(url: str, *, start: dt.date | None = None, end: dt.date | None = None) -> VerifyReport:
    """Check every chain of the UTC days ``start`` to ``end`` (inclusive); stop at the first break.

    A chain must start at seq 1 with its genesis (:func:`~audit.codec.genesis` for decisions,
    :func:`~audit.codec.outcome_genesis` for outcomes), be contiguous, link each ``prev_hash`` to
    the previous row's ``hash``, and every ``hash`` must match the row's content. Decisions are
    checked first, then outcomes. A decision submitted again sits in ``decision_duplicates`` and a
    second outcome in ``outcome_conflicts``, each at its place in its writer's chain.
    """
    report = VerifyReport()
    with psycopg.connect(url) as conn:  # tuple rows (audit.partitions); the walks' cursors make dicts
        where, params = _where("decided_at", start, end)
        dup_where, dup_params = _held_duplicates(conn, where, params)
        cols = ", ".join(DECISION_COLUMNS)
        # A duplicate must repeat a decision the log holds: the hash does not say which table a row is
        # in, so without this a decision moved into decision_duplicates would vanish with its chain intact.
        sql = (f"SELECT {cols}, (decided_at AT TIME ZONE 'UTC')::date AS day, duplicate, placed FROM ("
               f"SELECT {cols}, false AS duplicate, true AS placed FROM decision_events WHERE {where} UNION ALL "
               f"SELECT {cols}, true, EXISTS (SELECT 1 FROM decision_events e WHERE e.decision_id = x.decision_id) "
               f"FROM decision_duplicates x WHERE {dup_where}) AS d ORDER BY day, chain_id, seq")
        for row in _walk(conn, "audit_verify_d", sql, params + dup_params, "decision_events", genesis,
                         _check_decision, report):
            if row["duplicate"]:
                report.decision_duplicates += 1
            else:
                report.rows += 1
        if report.broken is not None:
            return report
        where, params = _where("reported_at", start, end)
        unchained = conn.execute(f"SELECT count(*) FROM outcomes WHERE {where} AND hash IS NULL", params).fetchone()
        report.unchained_outcomes = int(unchained[0]) if unchained else 0
        cols = ", ".join(OUTCOME_COLUMNS)
        # A decision's second outcome sits in outcome_conflicts at its place in its writer's chain.
        # ... and must follow a first outcome, unless retention took that one with its decision (an
        # outcome is reported after its decision, so a decision the log holds keeps its first outcome).
        sql = (f"SELECT {cols}, (reported_at AT TIME ZONE 'UTC')::date AS day, conflict, placed FROM ("
               f"SELECT {cols}, false AS conflict, true AS placed FROM outcomes WHERE {where} AND hash IS NOT NULL "
               f"UNION ALL SELECT {cols}, true, EXISTS (SELECT 1 FROM outcomes o WHERE o.decision_id = x.decision_id)"
               f" OR NOT EXISTS (SELECT 1 FROM decision_events e WHERE e.decision_id = x.decision_id) "
               f"FROM outcome_conflicts x WHERE {where}) AS o ORDER BY day, chain_id, seq")
        for row in _walk(conn, "audit_verify_o", sql, params + params, "outcomes", outcome_genesis, _check_outcome,
                         report):
            report.outcome_rows += 1
            report.outcome_conflicts += bool(row["conflict"])
        if report.broken is None and report.unchained_outcomes:
            # Unchained is legitimate only for outcomes from before chaining began: a later one had its
            # link stripped (its content is then unverifiable, and may have been altered).
            late = conn.execute(f"SELECT decision_id, reported_at FROM outcomes WHERE {where} AND hash IS NULL "
                                "AND reported_at >= (SELECT min(reported_at) FROM outcomes WHERE hash IS NOT NULL) "
                                "ORDER BY reported_at LIMIT 1", params).fetchone()
            if late is not None:
                report.broken = BrokenLink(late[1].astimezone(dt.UTC).date(), "(none)", 0, str(late[0]),
                                           "carries no chain link, yet outcomes were chained before it was reported: "
                                           "its link was removed (or a writer older than outcome chaining stored "
                                           "it); its content cannot be verified", "outcomes")
    return report


def _held_duplicates(conn: psycopg.Connection[Any], where: str, params: list[Any]) -> tuple[str, list[Any]]:
    """The filter on ``decision_duplicates``: ``where``, on the days the log still holds.

    Retention drops whole days of ``decision_events``; a duplicate left from such a day (a
    retention run that did not delete them too) would make a chain of its own that starts past
    seq 1, reported as broken. Such rows are retired with their day, as in :mod:`audit.checkpoint`.
    """
    held = partitions.list_partitions(conn)
    if not held:
        return where, params
    return f"{where} AND decided_at >= %s", [*params, dt.datetime.combine(held[0], dt.time(), tzinfo=dt.UTC)]


def _walk(conn: psycopg.Connection[Any], cursor_name: str, sql: str, params: list[Any], table: str,
          first: Callable[[dt.date, str], str], check: Callable[[dict[str, Any], str], str],
          report: VerifyReport) -> Iterator[dict[str, Any]]:
    """Yield each verified row of one table's chains in order; on a break, record it and stop."""
    key: tuple[dt.date, str] | None = None
    expect_seq, prev = 1, ""
    with conn.cursor(name=cursor_name, row_factory=dict_row) as cur:
        cur.itersize = 2000
        cur.execute(sql, params)
        for row in cur:
            k = (row["day"], row["chain_id"])
            if k != key:
                key, expect_seq, prev = k, 1, first(row["day"], row["chain_id"])
                if table == "decision_events":
                    report.chains += 1
                    if row["day"] not in report.days:
                        report.days.append(row["day"])
                else:
                    report.outcome_chains += 1
            problem = _link_problem(row, expect_seq, prev) or check(row, prev)
            if problem:
                report.broken = BrokenLink(row["day"], row["chain_id"], row["seq"], row["decision_id"], problem,
                                           table)
                return
            expect_seq, prev = row["seq"] + 1, row["hash"]
            yield row


def _link_problem(row: dict[str, Any], expect_seq: int, prev: str) -> str:
    if row["seq"] != expect_seq:
        return f"expected seq {expect_seq}, found {row['seq']} (rows missing)"
    if row["prev_hash"] != prev:
        return "prev_hash does not match the previous row's hash"
    return ""


def _check_decision(row: dict[str, Any], prev: str) -> str:
    if not row["placed"]:
        return "a duplicate of a decision that is not in decision_events (removed, or moved here)"
    try:
        trace_bytes = decompress_trace(bytes(row["trace_z"]))
    except Exception as exc:
        return f"trace cannot be decoded: {exc}"
    if link_hash(prev, values_from_row(row), trace_bytes) != row["hash"]:
        return "hash does not match the row's content (altered)"
    return ""


def _check_outcome(row: dict[str, Any], prev: str) -> str:
    if not row["placed"]:
        return "a second outcome of a decision whose first outcome is not in outcomes (removed, or moved here)"
    if link_hash(prev, values_from_row(row, OUTCOME_HASHED_COLUMNS)) != row["hash"]:
        return "hash does not match the row's content (altered)"
    return ""
