"""Every SQL statement of the learners, in one repository (a schema rename is a one-place change).

Tables: ``learner_snapshots`` and ``learner_deltas`` (migration 0002, ours) and, read only, the
audit log's ``decision_events`` and ``outcomes`` (migration 0001). The decision trace is stored
compressed (``trace_z``) and decoded with :mod:`audit.codec`; inside it, each candidate's features
are ``stages.score.candidates[i].features`` (a ``{name: value}`` mapping) and the chosen endpoint is
``stages.choose.chosen``.
"""

from __future__ import annotations

import datetime as dt
import logging
import reprlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from learners._linear import FloatArray

log = logging.getLogger("infermesh.learners.store")

_MAX_SEQ = 2**63 - 1  # delta seqs are bigint; a mark past it would fail every later read of deltas


class DamagedSnapshot(ValueError):
    """A ``learner_snapshots`` row whose JSON is not what :meth:`LearnerStore.save_snapshot` writes.

    Parameters
    ----------
    snapshot_id
        The row's id (a caller falls back to the newest snapshot below it).
    problem
        What is wrong with it.
    """

    def __init__(self, snapshot_id: int, problem: str) -> None:
        super().__init__(problem)
        self.snapshot_id = snapshot_id


def decode_trace(trace_z: bytes) -> dict[str, Any]:
    """The decision trace stored in ``decision_events.trace_z``."""
    from audit.codec import load_trace

    return load_trace(trace_z)


def _ts(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def _json_kind(value: Any) -> str:
    """How a decoded JSON value reads in a message: ``null``, ``an array``, ``str 'x'``..."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _delta_marks(snapshot_id: int, raw: Any) -> dict[str, int]:
    """A snapshot's ``delta_marks``, checked: an object of replica id -> a delta seq in bigint range."""
    if not isinstance(raw, dict):
        raise DamagedSnapshot(snapshot_id, f"delta_marks is {_json_kind(raw)}, not a JSON object")
    for replica, seq in raw.items():
        # bool is an int to Python, and a float would be truncated: neither is a seq the writer stores.
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= _MAX_SEQ:
            raise DamagedSnapshot(snapshot_id, f"delta_marks[{replica!r}] is {_json_kind(seq)}, "
                                               f"not a delta seq (an integer from 0 to 2**63-1)")
    return dict(raw)


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    learner: str
    version: str
    replica: str
    taken_at: float
    watermark: float
    n_updates: int
    delta_marks: Mapping[str, int]
    state: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Delta:
    replica: str
    seq: int
    dA: FloatArray
    db: FloatArray
    dn: int


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """One routed decision from the audit log, with its outcome when one was reported."""

    decision_id: str
    decided_at: float
    learner: str
    propensity: float
    trace: Mapping[str, Any]
    status: str | None
    reward: float | None
    ttft_ms: float | None
    reported_at: float | None


class LearnerStore:
    """The learners' repository over one PostgreSQL connection (thread-safe, autocommit).

    Parameters
    ----------
    url
        libpq connection URL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[dict[str, Any]] = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._conn.close()

    def _db(self) -> psycopg.Connection[dict[str, Any]]:
        """The connection, reconnected if a failure broke it (call with the lock held): without this,
        one dropped connection would make every later sync, and so every retry, fail too."""
        if self._conn.closed and not self._closed:
            self._conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row)
        return self._conn

    # -- snapshots --
    def save_snapshot(self, *, learner: str, version: str, replica: str, watermark: float, n_updates: int,
                      delta_marks: Mapping[str, int], state: Mapping[str, Any]) -> int:
        with self._lock:
            row = self._db().execute(
                "INSERT INTO learner_snapshots (learner, version, replica, watermark, n_updates, delta_marks,"
                " state) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (learner, version, replica, _ts(watermark), n_updates, Jsonb(dict(delta_marks)),
                 Jsonb(dict(state)))).fetchone()
        assert row is not None
        return int(row["id"])

    def latest_snapshot(self, *, learner: str, version: str, below_id: int | None = None) -> Snapshot | None:
        """The newest snapshot (with ``below_id``: the newest older than that one, to fall back to).

        Raises
        ------
        DamagedSnapshot
            Its ``delta_marks`` or ``state`` is not what :meth:`save_snapshot` writes (its
            ``snapshot_id`` is the ``below_id`` to ask for next).
        """
        with self._lock:
            row = self._db().execute(
                "SELECT id, learner, version, replica, taken_at, watermark, n_updates, delta_marks, state"
                " FROM learner_snapshots WHERE learner = %s AND version = %s AND (%s::bigint IS NULL OR id < %s)"
                " ORDER BY id DESC LIMIT 1", (learner, version, below_id, below_id)).fetchone()
        if row is None:
            return None
        if not isinstance(row["state"], dict):
            raise DamagedSnapshot(int(row["id"]), f"state is {_json_kind(row['state'])}, not a JSON object")
        return Snapshot(int(row["id"]), row["learner"], row["version"], row["replica"],
                        row["taken_at"].timestamp(), row["watermark"].timestamp(), int(row["n_updates"]),
                        _delta_marks(int(row["id"]), row["delta_marks"]), row["state"])

    # -- replica deltas --
    def write_delta(self, *, learner: str, version: str, replica: str, seq: int, dA: FloatArray, db: FloatArray,
                    dn: int) -> None:
        """Store one delta; idempotent on (learner, version, replica, seq).

        A retry after an error that hid a successful commit sends the same seq again and is a
        no-op, so it cannot be counted twice.
        """
        with self._lock:
            self._db().execute(
                "INSERT INTO learner_deltas (learner, version, replica, seq, n_features, dn, da, db)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (learner, version, replica, seq) DO NOTHING",
                (learner, version, replica, seq, int(db.shape[0]), dn,
                 np.ascontiguousarray(dA, dtype="<f8").tobytes(), np.ascontiguousarray(db, dtype="<f8").tobytes()))

    def last_delta_seq(self, *, learner: str, version: str, replica: str) -> int:
        with self._lock:
            row = self._db().execute(
                "SELECT coalesce(max(seq), 0) AS seq FROM learner_deltas"
                " WHERE learner = %s AND version = %s AND replica = %s", (learner, version, replica)).fetchone()
        return int(row["seq"]) if row else 0

    def read_deltas(self, *, learner: str, version: str, after: Mapping[str, int],
                    exclude_replica: str | None = None) -> list[Delta]:
        """Deltas of every replica with a seq above what ``after`` says was already seen."""
        with self._lock:
            rows = self._db().execute(
                "SELECT replica, seq, n_features, dn, da, db FROM learner_deltas"
                " WHERE learner = %s AND version = %s AND replica IS DISTINCT FROM %s"
                " AND seq > coalesce((%s::jsonb ->> replica)::bigint, 0) ORDER BY replica, seq",
                (learner, version, exclude_replica, Jsonb(dict(after)))).fetchall()
        out = []
        for r in rows:
            d = int(r["n_features"])
            try:
                dA = np.frombuffer(r["da"], dtype="<f8").reshape(d, d).astype(np.float64)
                db = np.frombuffer(r["db"], dtype="<f8").astype(np.float64)
            except ValueError as exc:  # a damaged row: yielded empty, so the merge skips it and passes its mark
                log.error("learner delta %s/%s cannot be decoded (%s); it will be skipped", r["replica"], r["seq"], exc)
                dA, db = np.empty((0, 0)), np.empty(0)
            out.append(Delta(r["replica"], int(r["seq"]), dA, db, int(r["dn"])))
        return out

    # -- the audit log, read only --
    def outcomes_after(self, *, learner: str, after: float) -> Iterator[LoggedDecision]:
        """Decisions by ``learner`` (``name@version``) whose outcome was reported after ``after``,
        with a reward, in report order: what a restored learner must replay."""
        yield from self._logged(
            "SELECT d.decision_id, d.decided_at, d.learner, d.propensity, d.trace_z, o.status, o.reward,"
            " o.ttft_ms, o.reported_at FROM decision_events d JOIN outcomes o USING (decision_id)"
            " WHERE d.status = 'routed' AND d.learner = %s AND o.reported_at > %s AND o.reward IS NOT NULL"
            " ORDER BY o.reported_at, d.decision_id", (learner, _ts(after)))

    def decisions_between(self, *, start: float, end: float, learner: str | None = None) -> Iterator[LoggedDecision]:
        """Routed decisions made in ``[start, end)`` with their outcomes (if any), in decision order."""
        yield from self._logged(
            "SELECT d.decision_id, d.decided_at, d.learner, d.propensity, d.trace_z, o.status, o.reward,"
            " o.ttft_ms, o.reported_at FROM decision_events d LEFT JOIN outcomes o USING (decision_id)"
            " WHERE d.status = 'routed' AND d.decided_at >= %s AND d.decided_at < %s"
            " AND (%s::text IS NULL OR d.learner = %s) ORDER BY d.decided_at, d.decision_id",
            (_ts(start), _ts(end), learner, learner))

    def _logged(self, sql: str, params: Sequence[Any]) -> Iterator[LoggedDecision]:
        # A separate connection: a long read must not hold the lock the sync thread needs.
        with psycopg.connect(self.url, row_factory=dict_row) as conn, conn.cursor(name="learners_log") as cur:
            cur.itersize = 2000
            cur.execute(sql, params)
            for r in cur:
                yield LoggedDecision(
                    r["decision_id"], r["decided_at"].timestamp(), r["learner"], float(r["propensity"] or 0.0),
                    decode_trace(bytes(r["trace_z"])), r["status"],
                    None if r["reward"] is None else float(r["reward"]),
                    None if r["ttft_ms"] is None else float(r["ttft_ms"]),
                    None if r["reported_at"] is None else r["reported_at"].timestamp())


def feature_names_of(trace: Mapping[str, Any]) -> tuple[str, ...]:
    """The feature names a trace carries, in the builder's order (the trace JSON keeps key order)."""
    rows = trace["stages"]["score"]["candidates"]
    return tuple(rows[0]["features"]) if rows else ()
