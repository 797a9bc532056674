"""Checkpoints of the hash chains' heads, kept outside the database, to anchor ``audit verify``.

A hash chain proves that no stored row was altered or removed *between* rows, but on its own it
cannot show that the newest rows of a chain were deleted (the shorter chain still verifies), nor
that someone with write access rewrote a chain from its genesis and recomputed every hash (the
genesis is public). A checkpoint closes both gaps: ``infermesh audit checkpoint`` writes every
chain's current head (table, UTC day, chain id, seq, hash) as JSON lines; the auditor keeps the
file somewhere the database's administrators cannot write (a ticket, a WORM bucket, a signed
mail). ``infermesh audit verify --checkpoint FILE`` then also requires each head to still be in
the log with the same hash: a deleted tail or a rewritten chain fails there.

Retention drops whole UTC days, oldest first, and records its cutoff, so a head on a day before
the cutoff is reported as retired, not failed; a head on a day the log still holds must be there.

>>> h = ChainHead("decision_events", dt.date(2026, 11, 27), "a1b2", 7, "f" * 64)
>>> text = render([h], dt.datetime(2026, 11, 28, tzinfo=dt.UTC))
>>> text.splitlines()[0]
'# infermesh audit checkpoint taken 2026-11-28T00:00:00+00:00: 1 chain heads'
>>> parse_heads(text.splitlines(), "heads.jsonl") == [h]
True
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from audit import partitions
from audit.verify import after_day, day_start

_FIELDS = ("table", "day", "chain_id", "seq", "hash")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message starts with ``file:line:``."""


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last link of one chain when the checkpoint was taken."""

    table: str  # "decision_events" or "outcomes" (their chains include decision_duplicates / outcome_conflicts rows)
    day: dt.date
    chain_id: str
    seq: int
    hash: str

    def to_line(self) -> str:
        return json.dumps({"table": self.table, "day": self.day.isoformat(), "chain_id": self.chain_id,
                           "seq": self.seq, "hash": self.hash})


# Each table's chain links (a decision chain includes its decision_duplicates rows, an outcome chain
# its outcome_conflicts rows; unchained legacy outcomes have no hash): (table, the time that places
# a link on its UTC day, a condition or "").
_BRANCHES = {
    "decision_events": (("decision_events", "decided_at", ""), ("decision_duplicates", "decided_at", "")),
    "outcomes": (("outcomes", "reported_at", "hash IS NOT NULL"), ("outcome_conflicts", "reported_at", "")),
}


def _links(table: str, *, since: bool = False, before: bool = False) -> str:
    """``table``'s chain links as rows (at, chain_id, seq, hash). ``since`` / ``before`` bound every
    branch by ``at >= %(lo)s`` / ``at < %(hi)s``, so that a range reads only its days' partitions."""
    out = []
    for t, at, cond in _BRANCHES[table]:
        where = [c for c in (cond, f"{at} >= %(lo)s" if since else "", f"{at} < %(hi)s" if before else "") if c]
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        out.append(f"SELECT {at} AS at, chain_id, seq, hash FROM {t}{clause}")
    return " UNION ALL ".join(out)


def chain_heads(url: str, *, start: dt.date | None = None, end: dt.date | None = None) -> list[ChainHead]:
    """Every chain's head now, the highest seq of each (table, UTC day, chain id), on the UTC days
    ``start`` to ``end`` inclusive (either open when None). A range reads only its days' partitions:
    a daily checkpoint of the day before need not scan the whole log."""
    lo = None if start is None else day_start(start)
    hi = None if end is None else after_day(end)
    heads = []
    with psycopg.connect(url) as conn:
        for table in _BRANCHES:
            links = _links(table, since=lo is not None, before=hi is not None)
            rows = conn.execute(
                "SELECT DISTINCT ON (day, chain_id) day, chain_id, seq, hash FROM ("
                f"SELECT (l.at AT TIME ZONE 'UTC')::date AS day, l.chain_id, l.seq, l.hash FROM ({links}) l) d "
                "ORDER BY day, chain_id, seq DESC", {"lo": lo, "hi": hi}).fetchall()
            heads += [ChainHead(table, day, str(c), int(s), str(h)) for day, c, s, h in rows]
    return heads


def render(heads: Sequence[ChainHead], taken_at: dt.datetime) -> str:
    """A checkpoint file's text: a comment line, then one JSON line per head."""
    stamp = taken_at.isoformat(timespec="seconds")
    return "\n".join([f"# infermesh audit checkpoint taken {stamp}: {len(heads)} chain heads",
                      *(h.to_line() for h in heads)]) + "\n"


def parse_heads(lines: Iterable[str], source: str) -> list[ChainHead]:
    """Heads from checkpoint lines (blank lines and ``#`` comments skipped); errors name file:line."""
    heads = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{source}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(doc, dict):
            raise CheckpointError(f"{source}:{n}: expected an object with {', '.join(_FIELDS)}")
        heads.append(_head(doc, f"{source}:{n}"))
    return heads


def _head(doc: dict[str, Any], where: str) -> ChainHead:
    missing = [f for f in _FIELDS if f not in doc]
    if missing:
        raise CheckpointError(f"{where}: {missing[0]}: required")
    if doc["table"] not in _BRANCHES:
        raise CheckpointError(f"{where}: table: must be one of {', '.join(_BRANCHES)}, not {doc['table']!r}")
    try:
        day = dt.date.fromisoformat(str(doc["day"]))
    except ValueError:
        raise CheckpointError(f"{where}: day: not an ISO date: {doc['day']!r}") from None
    seq = doc["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < 2**63:  # seq is a bigint
        raise CheckpointError(f"{where}: seq: must be a positive integer below 2^63, not {seq!r}")
    digest = doc["hash"]
    if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise CheckpointError(f"{where}: hash: must be a 64-character lowercase hex digest")
    if not isinstance(doc["chain_id"], str) or not doc["chain_id"] or "\0" in doc["chain_id"]:
        raise CheckpointError(f"{where}: chain_id: must be a non-empty string without NUL")
    return ChainHead(doc["table"], day, doc["chain_id"], seq, digest)


@dataclass(frozen=True, slots=True)
class HeadProblem:
    head: ChainHead
    problem: str

    def __str__(self) -> str:
        h = self.head
        return f"checkpoint head of {h.table} day {h.day} chain {h.chain_id} seq {h.seq}: {self.problem}"


@dataclass(slots=True)
class CheckpointReport:
    checked: int = 0  # heads found as recorded
    retired: int = 0  # heads on days retention has dropped
    problems: list[HeadProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_heads(url: str, heads: Sequence[ChainHead], *, start: dt.date | None = None,
                end: dt.date | None = None) -> CheckpointReport:
    """Whether each head (of the UTC days ``start`` to ``end``) is still in the log, unaltered."""
    report = CheckpointReport()
    wanted = [h for h in heads if (start is None or h.day >= start) and (end is None or h.day <= end)]
    with psycopg.connect(url) as conn:
        # Retention records its cutoff (migration 0008). Without a recorded run a head is never taken
        # for retired: the oldest partition's day cannot tell a day retention dropped from one dropped
        # by hand, so a log whose retention ran only before 0008 reports those heads, and says why.
        held = partitions.list_partitions(conn)
        retired = partitions.retired_before(conn)
        if retired is not None and held:
            # Retention drops the oldest days first, so a day still held was never dropped, whatever
            # audit_retention says: a cutoff past it (a forged row) must not retire its heads.
            retired = min(retired, held[0])
        stored = _stored(conn, wanted)
    for h in wanted:
        if retired is not None and h.day < retired:
            report.retired += 1
            continue
        found = stored.get((h.table, h.day, h.chain_id, h.seq))
        if found is None and retired is None and (not held or h.day < held[0]):
            report.problems.append(HeadProblem(h, "missing: its day is no longer in the log and no retention run "
                                                  "is recorded (dropped by hand, or by a retention run older than "
                                                  "the audit_retention table)"))
        elif found is None:
            report.problems.append(HeadProblem(h, "missing: rows at or after it were deleted after the checkpoint"))
        elif found != h.hash:
            report.problems.append(HeadProblem(h, "hash differs from the checkpoint's (the chain was rewritten)"))
        else:
            report.checked += 1
    return report


def _stored(conn: psycopg.Connection[Any], heads: Sequence[ChainHead]) -> dict[tuple[str, dt.date, str, int], str]:
    """The stored hash of each head's link, looked up by (chain id, seq) on the chain indexes."""
    out: dict[tuple[str, dt.date, str, int], str] = {}
    for table in _BRANCHES:
        mine = [h for h in heads if h.table == table]
        if not mine:
            continue
        sql = (f"SELECT (l.at AT TIME ZONE 'UTC')::date, l.chain_id, l.seq, l.hash FROM ({_links(table)}) l "
               "JOIN unnest(%s::text[], %s::int8[]) AS k(chain_id, seq) USING (chain_id, seq)")
        for day, chain_id, seq, digest in conn.execute(sql, ([h.chain_id for h in mine], [h.seq for h in mine])):
            out[(table, day, str(chain_id), int(seq))] = str(digest)
    return out
