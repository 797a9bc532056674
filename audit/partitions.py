"""Day partitions of ``decision_events``: created ahead, dropped by retention."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.rows import tuple_row

_NAME = re.compile(r"^decision_events_p(\d{8})$")


def partition_name(day: dt.date) -> str:
    return f"decision_events_p{day:%Y%m%d}"


def ensure_partition(conn: psycopg.Connection[Any], *, day: dt.date) -> None:
    """Create the partition of one UTC day if it does not exist.

    ``IF NOT EXISTS`` does not cover a race: two writers (workers, replicas) creating the same day
    at once, the loser fails with DuplicateTable (or a catalog UniqueViolation). In a savepoint, so
    that losing leaves the caller's transaction usable: the partition is there either way.
    """
    nxt = day + dt.timedelta(days=1)
    try:
        with conn.transaction():
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF decision_events "
                "FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(partition_name(day)), sql.Literal(f"{day.isoformat()} 00:00:00+00"),
                sql.Literal(f"{nxt.isoformat()} 00:00:00+00")))
    except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
        pass


def ensure_ahead(conn: psycopg.Connection[Any], *, today: dt.date, days_ahead: int) -> list[dt.date]:
    """Create today's partition and ``days_ahead`` more; returns the days ensured."""
    days = [today + dt.timedelta(days=i) for i in range(days_ahead + 1)]
    for d in days:
        ensure_partition(conn, day=d)
    return days


def list_partitions(conn: psycopg.Connection[Any]) -> list[dt.date]:
    # Tuple rows whatever the connection's row factory (the API's pool makes dict rows): unpacking a
    # dict row gives its key, so no partition was ever found and retention dropped none.
    rows = conn.cursor(row_factory=tuple_row).execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'decision_events'").fetchall()
    days = []
    for (name,) in rows:
        m = _NAME.match(str(name))
        if m:
            days.append(dt.datetime.strptime(m.group(1), "%Y%m%d").date())
    return sorted(days)


# Transaction-level advisory lock between retention's cutoff and the writers' new day partitions.
RETENTION_LOCK = 0x1F0A_0D18


def drop_before(conn: psycopg.Connection[Any], *, cutoff: dt.date) -> list[dt.date]:
    """Drop every day partition strictly older than ``cutoff``, and the other tables' rows of those days.

    The cutoff is recorded in ``audit_retention`` first, so a run cut short (a killed pod, a lost
    connection) still says which days are being retired: a spool replayed meanwhile does not bring
    them back (:mod:`audit.writer` refuses rows before the cutoff), and running again, as the
    service's next round does, finishes the work (every step is idempotent). Until then rows before
    the cutoff may still be there; what the readers see stays consistent because every day still
    held is whole (``audit verify`` walks its chains; :mod:`audit.checkpoint` takes the older of the
    cutoff and the oldest partition held as the retired bound):

    - the partitions are dropped oldest first, each on its own (a dropped partition locks the whole
      of ``decision_events``: not across the long deletes below), so the days kept are contiguous;
    - the outcomes, second outcomes and duplicate decisions of those days go in one transaction, as
      they are links of the same chains: a half-done delete would leave chains with holes.

    Parameters
    ----------
    conn : psycopg.Connection
        An autocommit connection (in a transaction, the whole run commits or rolls back with it).
    cutoff : datetime.date
        The first UTC day kept.

    Returns
    -------
    list of datetime.date
        The days whose partitions this run drops (logged up front as the run's ``dropped_days``).
    """
    with conn.transaction():
        # Waits for any writer creating a day partition (it holds the lock shared from its cutoff read
        # to its commit), so the partitions listed include its; once the cutoff is in, no writer
        # creates a day it retires.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (RETENTION_LOCK,))
        dropped = [d for d in list_partitions(conn) if d < cutoff]
        conn.execute("INSERT INTO audit_retention (cutoff, dropped_days) VALUES (%s, %s)", (cutoff, dropped))
    for d in dropped:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(partition_name(d))))
    start = dt.datetime.combine(cutoff, dt.time(), tzinfo=dt.UTC)
    with conn.transaction():
        for table in ("outcomes", "outcome_conflicts"):  # whole UTC days: the remaining chains stay whole
            conn.execute(sql.SQL("DELETE FROM {} WHERE reported_at < %s").format(sql.Identifier(table)), (start,))
        # A decision submitted again keeps its link in decision_duplicates (migration 0006), on its day.
        conn.execute("DELETE FROM decision_duplicates WHERE decided_at < %s", (start,))
    return dropped


def retired_before(conn: psycopg.Connection[Any]) -> dt.date | None:
    """The latest retention cutoff: days before it are dropped, or being dropped by a run not yet
    done (see :func:`drop_before`); None: retention never ran."""
    row = conn.cursor(row_factory=tuple_row).execute("SELECT max(cutoff) FROM audit_retention").fetchone()
    return row[0] if row else None


def apply_retention(conn: psycopg.Connection[Any], *, retention_days: int,
                    today: dt.date | None = None) -> list[dt.date]:
    """Keep ``retention_days`` days (today included) and drop older partitions.

    Fewer than one day would drop today's partition (and, below zero, those created ahead).
    """
    if retention_days < 1:
        raise ValueError(f"retention_days must be >= 1 (today is kept), got {retention_days}")
    today = today or dt.datetime.now(dt.UTC).date()
    return drop_before(conn, cutoff=today - dt.timedelta(days=retention_days - 1))
