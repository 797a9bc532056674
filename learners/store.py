"""Every SQL statement of the learners, in one repository (a schema rename is a one-place change).

Tables: ``learner_snapshots`` and ``learner_deltas`` (migration 0002, ours) and, read only, the
audit log's ``decision_events`` and ``outcomes`` (migration 0001). The decision trace is stored
compressed (``trace_z``) and decoded with :mod:`audit.codec`; inside it, each candidate's features
are ``stages.score.candidates[i].features`` (a ``{name: value}`` mapping) and the chosen endpoint is
``stages.choose.chosen``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import reprlib
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.abc import Params
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from decision.contracts import LIBPQ_KEEPALIVES
from learners._linear import FloatArray

log = logging.getLogger("infermesh.learners.store")

_MAX_SEQ = 2**63 - 1  # delta seqs are bigint; a mark past it would fail every later read of deltas
# Server-side TCP keepalives of the session that holds replica locks (seconds): a client whose host
# died holds nothing after about idle + interval * count (the default, 2 h, would keep the id taken).
_KEEPALIVES = {"tcp_keepalives_idle": 30, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 3}
_END_WAIT_MS = 5000  # how long pg_terminate_backend waits (at most) for such a session to be gone, its locks freed
_APP_NAME_MAX = 63  # PostgreSQL keeps the first NAMEDATALEN - 1 bytes of an application_name
DELTA_PAGE_ROWS = 1000  # the most deltas one page holds (the config's learner.delta_page_rows default)
DELTA_PAGE_BYTES = 8 << 20  # ... and, past the first, the most bytes of their arrays (learner.delta_page_bytes)


def _sized(page: str) -> str:
    """``page`` (deltas in (replica, seq) order, each with its arrays' ``size``) cut at ``%(bytes)s``.

    The byte bound is a running sum over the row-bounded page: the first row always comes (a page
    must progress), the rest only while what comes before them is under the bound.
    """
    return ("SELECT replica, seq, n_features, dn, da, db FROM ("
            " SELECT *, sum(size) OVER (ORDER BY replica, seq) - size AS bytes_before FROM (" + page + ") page"
            ") sized WHERE bytes_before < %(bytes)s::bigint ORDER BY replica, seq")


def _mark(alias: str) -> str:
    """The last seq merged of replica ``alias``.replica, from the reader's marks (none: 0)."""
    return f"coalesce((%(marks)s::jsonb ->> {alias}.replica)::bigint, 0)"


# Every statement below reaches rows through the primary key (learner, version, replica, seq) by
# seeks, never by reading a replica's merged history: deltas are never deleted, so a read that
# filtered the seqs at or below a mark would cost more with every delta ever written.
#
# The replicas with deltas past the reader's mark, in key order, found from their heads (migration
# 0009: one row per replica id with its last seq, kept by a trigger): an id that is caught up costs
# a row of that small table, not a seek into the deltas (one id per pod piles up across deploys).
# Each carries the unread deltas of the replicas before it (``ahead``, counted by a seek past the
# mark and capped by the page); the walk stops past the replica that fills the page, so a page
# visits the replicas it needs, not all those with news.
_NEWS = ("learner_replica_heads h WHERE h.learner = %(learner)s AND h.version = %(version)s"
         f" AND h.replica IS DISTINCT FROM %(exclude)s AND h.last_seq > {_mark('h')}")
_WALK = (
    "WITH RECURSIVE walk(replica, ahead) AS ("
    f" (SELECT h.replica, 0::bigint FROM {_NEWS} ORDER BY h.replica LIMIT 1)"
    " UNION ALL"
    " SELECT nxt.replica, w.ahead + ("
    "  SELECT count(*) FROM (SELECT FROM learner_deltas d WHERE d.learner = %(learner)s"
    f"   AND d.version = %(version)s AND d.replica = w.replica AND d.seq > {_mark('w')} LIMIT %(rows)s::bigint) u)"
    f" FROM walk w CROSS JOIN LATERAL (SELECT h.replica FROM {_NEWS} AND h.replica > w.replica"
    "  ORDER BY h.replica LIMIT 1) nxt"
    " WHERE w.ahead < %(rows)s::bigint) ")
# The next page of every replica's deltas past its mark: each replica's part is one index range from its mark.
_DELTA_PAGE = _WALK + _sized(
    "SELECT d.replica, d.seq, d.n_features, d.dn, d.da, d.db, octet_length(d.da) + octet_length(d.db) AS size"
    " FROM walk w CROSS JOIN LATERAL (SELECT * FROM learner_deltas d WHERE d.learner = %(learner)s"
    f"  AND d.version = %(version)s AND d.replica = w.replica AND d.seq > {_mark('w')}"
    "  ORDER BY d.seq LIMIT %(rows)s::bigint - w.ahead) d"
    " WHERE w.ahead < %(rows)s::bigint"
    " ORDER BY d.replica, d.seq LIMIT %(rows)s::bigint")
# The next page of one replica's deltas past a seq.
_REPLICA_PAGE = _sized(
    "SELECT replica, seq, n_features, dn, da, db, octet_length(da) + octet_length(db) AS size FROM learner_deltas"
    " WHERE learner = %(learner)s AND version = %(version)s AND replica = %(replica)s AND seq > %(after)s::bigint"
    " ORDER BY seq LIMIT %(rows)s::bigint")


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


class ReplicaInUse(ValueError):
    """Another live process writes this learner's state under the same replica id.

    A ValueError: the configured id (``INFERMESH_REPLICA`` or ``learner.replica``) is what must
    change, so ``serve`` reports it as a config it cannot start with.
    """


class DeltaConflict(ReplicaInUse):
    """A delta's (learner, version, replica, seq) is already stored with other contents: a process
    outside the replica lock (an older release) wrote under this replica id."""


class ReplicaRetaken(RuntimeError):
    """A write under a replica id this store took back on a new session, before its owner read what is stored.

    While the session that held the id was lost, another process may have held it and written
    deltas under it: the owner's next seq may be taken, and those deltas are learning it does not
    have. :meth:`LearnerStore.take_back` returns them, page by page, and lets writes under the id go
    on once a page comes empty; :class:`learners.sync.LearnerSync` does so by itself.
    """


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


def replica_lock_key(learner: str, version: str, replica: str) -> int:
    """The PostgreSQL advisory lock key (a signed bigint) of one replica id of one learner's state.

    >>> replica_lock_key("linucb", "1+f2-abc", "pod-a") == replica_lock_key("linucb", "1+f2-abc", "pod-a")
    True
    >>> replica_lock_key("linucb", "1+f2-abc", "pod-a") == replica_lock_key("linucb", "1+f2-abc", "pod-b")
    False
    """
    digest = hashlib.sha256("\x1f".join(("infermesh.learner-replica", learner, version, replica)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


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


class _Bounded:
    """A store connection whose every statement runs under its own answer deadline.

    Parameters
    ----------
    conn
        The connection.
    deadline
        :meth:`LearnerStore._deadline`.
    """

    __slots__ = ("conn", "deadline")

    def __init__(self, conn: psycopg.Connection[dict[str, Any]],
                 deadline: Callable[[psycopg.Connection[dict[str, Any]]], AbstractContextManager[None]]) -> None:
        self.conn = conn
        self.deadline = deadline

    def execute(self, query: str, params: Params | None = None) -> psycopg.Cursor[dict[str, Any]]:
        """``conn.execute``, its connection dropped if no answer comes in time (a client-side cursor
        has every row once this returns: fetching them waits on nothing)."""
        with self.deadline(self.conn):
            return self.conn.execute(query, params)


class LearnerStore:
    """The learners' repository over one PostgreSQL connection (thread-safe, autocommit).

    Every write under a replica id happens on a session that holds that id's advisory lock (see
    :meth:`claim_replica`), so two live processes can never write deltas under one id.

    Each of the store's sessions carries a random token of the store in its ``application_name``
    (after any name the URL or ``PGAPPNAME`` gives, cut to fit): the one sign by which the store
    knows an earlier session of its own, one its side alone saw break, and ends it. A backend's
    pid and start time are not that sign: behind a session pooler (pgbouncer) the backend of a
    session the store lost may be serving another client since.

    Every operation is bounded in time: connecting by ``connect_timeout_s``, a statement by the
    server's ``statement_timeout``, and the answer to each statement by a client-side deadline
    (the statement timeout plus 2 s) after which the connection is dropped, as a lost one is (the
    next call reconnects; the operation's later statements fail at once). So a database that stops
    answering makes a sync, and :meth:`LearnerSync.stop <learners.sync.LearnerSync.stop>` with the
    service's stop after it, fail instead of blocking.

    Parameters
    ----------
    url
        libpq connection URL.
    connect_timeout_s
        libpq's ``connect_timeout`` in seconds (at least 1, which libpq rounds up to 2; 0 would wait for ever).
    statement_timeout_s
        The session's ``statement_timeout``; the client gives up on an answer 2 s after it.
    delta_page_rows, delta_page_bytes
        The most deltas, and (past the first) the most bytes of their arrays, one
        :meth:`read_deltas` or :meth:`take_back` returns (``learner.delta_page_rows`` and
        ``learner.delta_page_bytes`` of the service config): 1,000 and 8 MiB read in well under
        the statement timeout.

    Raises
    ------
    ValueError
        ``delta_page_rows`` or ``delta_page_bytes`` is below 1 (the message names it).
    """

    def __init__(self, url: str, *, connect_timeout_s: int = 5, statement_timeout_s: float = 10.0,
                 delta_page_rows: int = DELTA_PAGE_ROWS, delta_page_bytes: int = DELTA_PAGE_BYTES) -> None:
        self.url = url
        self.connect_timeout_s = max(1, int(connect_timeout_s))
        self.statement_timeout_s = statement_timeout_s
        self.delta_page_rows = _at_least_one("delta_page_rows", delta_page_rows)
        self.delta_page_bytes = _at_least_one("delta_page_bytes", delta_page_bytes)
        self._answer_s = statement_timeout_s + 2.0  # the server's own timeout gets to answer first
        self._lock = threading.Lock()
        self._sever_lock = threading.Lock()  # a deadline's socket shutdown never meets a close of that socket
        self._closed = False
        self._claims: dict[int, tuple[str, str, str]] = {}  # lock key -> (learner, version, replica)
        self._retaken: set[int] = set()  # keys taken back on a new session, not yet read to the end by take_back()
        self._token = secrets.token_hex(8)  # in every session's application_name: how an own session is known
        self._app_name: str | None = None  # that application_name, once a session took it (None: none did)
        self._conn: psycopg.Connection[dict[str, Any]] = self._connect()

    def close(self) -> None:
        with self._sever_lock:
            self._closed = True
            self._conn.close()  # the session's replica locks go with it

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        # Client keepalives and a TCP user timeout end a connection whose packets vanish (a partition,
        # no reset) as an outage, instead of waiting as long as the kernel's retransmissions last.
        conn: psycopg.Connection[dict[str, Any]] = psycopg.connect(
            self.url, autocommit=True, row_factory=dict_row, connect_timeout=self.connect_timeout_s,
            tcp_user_timeout=int(self._answer_s * 1000), **LIBPQ_KEEPALIVES)
        bounded = _Bounded(conn, self._deadline)
        try:
            try:
                bounded.execute(f"SET statement_timeout = {max(1, int(self.statement_timeout_s * 1000))}")
                for name, value in _KEEPALIVES.items():
                    bounded.execute(f"SET {name} = {int(value)}")
            except psycopg.Error as exc:  # e.g. a pooler refusing SET: locks still work, a dead host's last longer
                if conn.closed:
                    raise
                log.warning("learner store: cannot set the session's statement timeout and TCP keepalives (%s); "
                            "a replica id whose host died stays taken until PostgreSQL notices", exc)
            self._mark_own(bounded)
        except BaseException:
            conn.close()
            raise
        return conn

    def _mark_own(self, conn: _Bounded) -> None:
        """Put the store's token in the new session's ``application_name``, to know it later as ours
        (see :meth:`_end_own_session`).

        A SET, not a connection parameter: a pooler's reset of a backend before it serves another
        client (pgbouncer's ``DISCARD ALL``) takes the name back to what the backend started with,
        so a backend this store used carries its token only while it serves this store.
        """
        wanted = self._app_name or _app_name(conn.conn.info.parameter_status("application_name") or "", self._token)
        row = conn.execute("SELECT set_config('application_name', %s, false) AS app", (wanted,)).fetchone()
        if row is not None and row["app"] == wanted:
            self._app_name = wanted
        else:
            log.warning("learner store: the database session did not take the application_name %r (it has %r); an "
                        "earlier session of this store whose connection broke on this side only is not recognised, and "
                        "its replica ids stay taken until PostgreSQL ends it", wanted, row and row["app"])

    @contextlib.contextmanager
    def _deadline(self, conn: psycopg.Connection[dict[str, Any]]) -> Iterator[None]:
        """Drop ``conn`` if the database has not answered what is sent in this block within the deadline.

        One block is one statement (:class:`_Bounded`): a deadline over several would cut a healthy
        session whose statements each kept within the statement timeout (a claim that waits up to
        5 s for an old session to end, then a read of up to 10 s, passes 12 s).

        Neither the server's statement timeout (the server may not even have the statement) nor TCP
        timeouts (a proxy or balancer on the way acknowledges the packets) end a wait for an answer
        that is not coming; libpq has no read timeout. Shutting the socket down ends it: the call
        fails as on a lost connection.
        """
        timer = threading.Timer(self._answer_s, self._sever, (conn,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _sever(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        with self._sever_lock:
            if conn.closed:
                return
            log.error("learner store: the database has not answered for %.0f s; dropping the connection "
                      "(the next call reconnects)", self._answer_s)
            try:
                # A duplicate of libpq's descriptor: shutdown acts on the socket both share, and closing the
                # duplicate leaves libpq's own descriptor open (psycopg closes it with the connection).
                with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except (OSError, psycopg.Error) as exc:
                log.warning("learner store: cannot drop the connection: %s", exc)

    @contextlib.contextmanager
    def _using(self) -> Iterator[_Bounded]:
        """The connection for one operation: under the lock, reconnected if broken, each statement under a deadline."""
        with self._lock:
            yield _Bounded(self._db(), self._deadline)

    def _db(self) -> psycopg.Connection[dict[str, Any]]:
        """The connection, reconnected if a failure broke it (call with the lock held): without this,
        one dropped connection would make every later sync, and so every retry, fail too.

        The replica ids this store held went with the broken session: they are taken again before
        the new one is used, and if another process took one meanwhile, nothing is written (the
        new session is closed, so the next call tries again). One taken again is not written under
        until :meth:`take_back` read what another process may have written under it meanwhile.
        """
        if self._conn.closed and not self._closed:
            conn = self._connect()
            try:
                for key, who in self._claims.items():
                    self._take(_Bounded(conn, self._deadline), key, *who, lost=True)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            if self._claims:
                self._retaken.update(self._claims)
                log.warning("learner store: the database session was lost; replica id(s) %s taken again on a new one",
                            ", ".join(sorted(repr(who[2]) for who in self._claims.values())))
        return self._conn

    # -- replica ids --
    def claim_replica(self, *, learner: str, version: str, replica: str) -> None:
        """Hold ``replica`` as this process's id for ``learner``'s state while this store's session lives.

        A PostgreSQL session advisory lock keyed on (learner, version, replica): it is freed by
        :meth:`release_replica`, :meth:`close`, or the end of the session, so a process that died
        without releasing it (its connection closed; or, if its host died, within about a minute
        through the session's TCP keepalives) leaves the id free for its successor. Writes under a
        replica id claim it themselves; calling this first (at start-up) refuses early. Claiming
        an id this store already holds is a no-op.

        Raises
        ------
        ReplicaInUse
            Another live session holds the id: naming that session and how to give each process
            its own id.
        """
        key = replica_lock_key(learner, version, replica)
        with self._using() as conn:
            self._hold(conn, key, learner, version, replica)

    def release_replica(self, *, learner: str, version: str, replica: str) -> None:
        """Give the id back (a no-op if this store does not hold it)."""
        key = replica_lock_key(learner, version, replica)
        with self._lock:
            self._retaken.discard(key)
            if self._claims.pop(key, None) is None or self._conn.closed:
                return  # a closed session holds no locks
            try:
                _Bounded(self._conn, self._deadline).execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg.Error as exc:  # a session broken now releases it as it ends
                log.warning("learner replica %r: releasing its lock failed: %s", replica, exc)

    def take_back(self, *, learner: str, version: str, replica: str, after: int) -> list[Delta]:
        """The next page of this replica's deltas with a seq above ``after``; once one comes empty,
        writes under its id may go on.

        Read on the session that holds the id, so nothing else can be written under it before the
        caller's next write. After the id was taken back on a new session (:class:`ReplicaRetaken`),
        the owner merges the deltas another process wrote under it meanwhile and numbers its own
        after them; the one it was sending when the session broke may be among them, stored.

        Paged as :meth:`read_deltas` is, so that however much another process wrote under the id
        meanwhile, each read fits in the statement timeout: the caller merges a page, asks again
        after its last seq, and is done when a page comes empty (only that one settles the id).

        Parameters
        ----------
        learner, version, replica
            The id, as for :meth:`claim_replica` (claimed if it is not held).
        after
            The last seq under the id the caller knows to be stored (or has merged from a page).

        Returns
        -------
        list of Delta
            In seq order: at most ``delta_page_rows``, and past the first only while their arrays
            fit in ``delta_page_bytes``. Empty: nothing is stored under the id past ``after``.
        """
        key = replica_lock_key(learner, version, replica)
        with self._using() as conn:
            self._hold(conn, key, learner, version, replica)
            rows = conn.execute(_REPLICA_PAGE, {
                "learner": learner, "version": version, "replica": replica, "after": after,
                "rows": self.delta_page_rows, "bytes": self.delta_page_bytes}).fetchall()
            if not rows:
                self._retaken.discard(key)
        return [_decoded(r) for r in rows]

    def _hold(self, conn: _Bounded, key: int, learner: str, version: str,
              replica: str) -> None:
        """Take the lock unless this session has it (call with the lock held, on ``self._db()``)."""
        if key not in self._claims:
            self._take(conn, key, learner, version, replica)
            self._claims[key] = (learner, version, replica)

    def _settled(self, key: int, replica: str) -> None:
        """Refuse a write under an id taken back on a new session before :meth:`take_back` (call with the lock held)."""
        if key in self._retaken:
            raise ReplicaRetaken(
                f"learner replica {replica!r} was taken back on a new database session after the last one was lost; "
                "another process may have written under it meanwhile, so nothing is written under it before "
                "take_back() has read what is stored")

    def _take(self, conn: _Bounded, key: int, learner: str, version: str,
              replica: str, *, lost: bool = False) -> None:
        if _try_lock(conn, key):
            return
        holder = _holder(conn, key)
        own = holder is not None and self._app_name is not None and holder["app"] == self._app_name
        if own and holder is not None and self._end_own_session(conn, holder) and _try_lock(conn, key):
            return
        who = f"learner replica {replica!r}" if replica else "the single instance (no learner replica id)"
        if own:
            raise ReplicaInUse(
                f"{who} of {learner} ({version}) is still held by this process's own earlier database session"
                f"{_described(holder)}, whose connection broke on this side only, and that session could not be "
                "ended (see the log); PostgreSQL ends it, and frees the id, once its TCP keepalives find the "
                "connection gone (about a minute)")
        when = ("this process's database session was lost, and meanwhile another live process took "
                if lost else "another live process already runs as ")
        raise ReplicaInUse(
            f"{when}{who} of {learner} ({version}) on this database{_described(holder)}. Two processes under "
            "one replica id overwrite each other's learner deltas, and what one of them learns is lost. Give "
            "each process its own id: set INFERMESH_REPLICA per process (e.g. the pod name; `serve --workers` "
            "appends -w<i>); it takes precedence over learner.replica, which, used without it, belongs only in a "
            "config file one process reads. A process that died frees its id when PostgreSQL ends its session.")

    def _end_own_session(self, conn: _Bounded, holder: Mapping[str, Any]) -> bool:
        """End ``holder``, one of this store's earlier sessions (a role may end its own); True if it is gone.

        A connection whose reset only the client saw (a flaky network, a proxy) leaves its server
        side alive and holding this store's replica ids: without this, the process would be locked
        out of its own id until the server's keepalives noticed, and refused as if another held it.
        The session is matched by the store's token in its ``application_name`` as it is ended, so
        neither a pid the server reused nor a backend a pooler gave another client is ended.
        """
        wait_ms = min(_END_WAIT_MS, int(self.statement_timeout_s * 500))  # within the statement timeout
        try:
            row = conn.execute(
                "SELECT pg_terminate_backend(pid, %s) AS ended FROM pg_stat_activity"
                " WHERE pid = %s AND application_name = %s",
                (max(1, wait_ms), holder["pid"], self._app_name)).fetchone()
        except psycopg.Error as exc:  # e.g. a role not allowed to signal backends
            log.warning("learner store: cannot end this process's earlier database session (backend pid %s) that "
                        "still holds its replica id(s): %s", holder["pid"], exc)
            return False
        ended = row is None or bool(row["ended"])  # no row: it ended by itself meanwhile
        log.warning("learner store: this process's earlier database session (backend pid %s), whose connection broke "
                    "on this side only, still held its replica id(s): %s", holder["pid"],
                    "ended it" if ended else f"it did not end within {wait_ms} ms")
        return ended

    # -- snapshots --
    def save_snapshot(self, *, learner: str, version: str, replica: str, watermark: float, n_updates: int,
                      delta_marks: Mapping[str, int], state: Mapping[str, Any], hold: bool = True) -> int:
        """Store a snapshot; claims ``replica`` first (:meth:`claim_replica`) unless ``hold`` is False.

        ``hold=False`` is for a learner that writes no deltas: its snapshots are whole states, keyed
        by no seq, so processes sharing its replica id cannot lose each other's writes.

        Raises
        ------
        ReplicaInUse
            Another live process holds ``replica``.
        ReplicaRetaken
            ``replica`` was taken back on a new session and not yet :meth:`take_back`-ed.
        """
        with self._using() as conn:
            if hold:
                key = replica_lock_key(learner, version, replica)
                self._hold(conn, key, learner, version, replica)
                self._settled(key, replica)
            row = conn.execute(
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
        with self._using() as conn:
            row = conn.execute(
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
        """Store one delta; idempotent on (learner, version, replica, seq). Claims ``replica`` first.

        A retry after an error that hid a successful commit sends the same seq again and is a
        no-op, so it cannot be counted twice. A stored row under that key with other contents is
        not this delta: it is reported, never taken as a success.

        Raises
        ------
        ReplicaInUse
            Another live process holds ``replica`` (:meth:`claim_replica`).
        ReplicaRetaken
            ``replica`` was taken back on a new session and not yet :meth:`take_back`-ed: ``seq``
            may be another process's now.
        DeltaConflict
            The key holds another delta (written by a process outside the lock).
        """
        n_features = int(db.shape[0])
        da_bytes = np.ascontiguousarray(dA, dtype="<f8").tobytes()
        db_bytes = np.ascontiguousarray(db, dtype="<f8").tobytes()
        with self._using() as conn:
            key = replica_lock_key(learner, version, replica)
            self._hold(conn, key, learner, version, replica)
            self._settled(key, replica)
            stored = conn.execute(
                "INSERT INTO learner_deltas (learner, version, replica, seq, n_features, dn, da, db)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (learner, version, replica, seq) DO NOTHING RETURNING seq",
                (learner, version, replica, seq, n_features, dn, da_bytes, db_bytes)).fetchone()
            if stored is not None:
                return
            row = conn.execute(
                "SELECT n_features, dn, da, db FROM learner_deltas"
                " WHERE learner = %s AND version = %s AND replica = %s AND seq = %s",
                (learner, version, replica, seq)).fetchone()
        if row is not None and (int(row["n_features"]), int(row["dn"]), bytes(row["da"]), bytes(row["db"])) == (
                n_features, dn, da_bytes, db_bytes):
            return  # the retry of a write that was committed
        raise DeltaConflict(
            f"learner delta {replica!r}/{seq} of {learner} ({version}) is already stored with other contents: "
            "another process writes under this replica id (one not holding its lock, e.g. an older release). "
            "This delta is kept and not counted as pushed; give each process its own INFERMESH_REPLICA.")

    def last_delta_seq(self, *, learner: str, version: str, replica: str) -> int:
        with self._using() as conn:
            row = conn.execute(
                "SELECT coalesce(max(seq), 0) AS seq FROM learner_deltas"
                " WHERE learner = %s AND version = %s AND replica = %s", (learner, version, replica)).fetchone()
        return int(row["seq"]) if row else 0

    def read_deltas(self, *, learner: str, version: str, after: Mapping[str, int],
                    exclude_replica: str | None = None) -> list[Delta]:
        """The next page of deltas of every replica (but ``exclude_replica``) with a seq above ``after``'s mark for it.

        A page is bounded, so that reading it fits in the statement timeout however far behind
        the caller is: a caller merges it, advances its marks past it, and asks again until a
        page comes empty. What it merged stays merged if a later page fails, so a backlog too
        large for one sync is caught up over several instead of failing every sync.

        Parameters
        ----------
        learner, version
            The learner's key.
        after
            The last seq already merged, by replica (none: 0).
        exclude_replica
            The reader's own replica id, left out (None: every replica's).

        Returns
        -------
        list of Delta
            In (replica, seq) order: at most ``delta_page_rows``, and past the first only while
            their arrays fit in ``delta_page_bytes``. Empty: nothing is left past ``after``.

        Notes
        -----
        Its cost follows the page and the replicas with deltas past ``after`` (a seek into the
        deltas each, their part one index range from the mark), plus one small row per replica id
        ever used (their heads, migration 0009); not the deltas stored, which are never deleted.
        """
        with self._using() as conn:
            rows = conn.execute(_DELTA_PAGE, {
                "learner": learner, "version": version, "exclude": exclude_replica, "marks": Jsonb(dict(after)),
                "rows": self.delta_page_rows, "bytes": self.delta_page_bytes}).fetchall()
        return [_decoded(r) for r in rows]

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
        # Bounded connect and client keepalives as on the store's own connection; no statement timeout, since a
        # replay may read for long.
        with psycopg.connect(self.url, row_factory=dict_row, connect_timeout=self.connect_timeout_s,
                             **LIBPQ_KEEPALIVES) as conn, \
                conn.cursor(name="learners_log") as cur:
            cur.itersize = 2000
            cur.execute(sql, params)
            for r in cur:
                yield LoggedDecision(
                    r["decision_id"], r["decided_at"].timestamp(), r["learner"], float(r["propensity"] or 0.0),
                    decode_trace(bytes(r["trace_z"])), r["status"],
                    None if r["reward"] is None else float(r["reward"]),
                    None if r["ttft_ms"] is None else float(r["ttft_ms"]),
                    None if r["reported_at"] is None else r["reported_at"].timestamp())


def _at_least_one(name: str, value: int) -> int:
    """``value`` as a page bound, refused below 1 with a message naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, not {value!r}")
    return value


def _app_name(prefix: str, token: str) -> str:
    """The ``application_name`` of a store's sessions: ``prefix`` (what the session was given, or
    ``infermesh``) kept readable in front, cut so that the token, last, always fits.

    >>> _app_name("", "0123456789abcdef")
    'infermesh learners#0123456789abcdef'
    >>> name = _app_name("x" * 80, "0123456789abcdef")
    >>> len(name), name.endswith(" learners#0123456789abcdef")
    (63, True)
    """
    tag = f" learners#{token}"
    # PostgreSQL would rewrite a character outside printable ASCII, and the name must come back as it was set.
    readable = "".join(c if " " <= c <= "~" else "?" for c in prefix.strip()) or "infermesh"
    return readable[:_APP_NAME_MAX - len(tag)] + tag


def _try_lock(conn: _Bounded, key: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s) AS got", (key,)).fetchone()
    return row is not None and bool(row["got"])


def _decoded(r: Mapping[str, Any]) -> Delta:
    """A ``learner_deltas`` row as a :class:`Delta`; a damaged one comes empty (a merge skips it, passing its mark)."""
    d = int(r["n_features"])
    try:
        dA = np.frombuffer(r["da"], dtype="<f8").reshape(d, d).astype(np.float64)
        db = np.frombuffer(r["db"], dtype="<f8").astype(np.float64)
    except ValueError as exc:
        log.error("learner delta %s/%s cannot be decoded (%s); it will be skipped", r["replica"], r["seq"], exc)
        dA, db = np.empty((0, 0)), np.empty(0)
    return Delta(r["replica"], int(r["seq"]), dA, db, int(r["dn"]))


def _holder(conn: _Bounded, key: int) -> dict[str, Any] | None:
    """The session holding advisory lock ``key`` in this database: its pid, client address, application
    name and start (None if no session holds it, or that cannot be read)."""
    unsigned = key & (2**64 - 1)  # pg_locks splits a bigint key into two oids
    try:
        row: dict[str, Any] | None = conn.execute(
            "SELECT l.pid, host(a.client_addr) AS addr, a.application_name AS app, a.backend_start"
            " FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid = %s::oid"
            " AND l.objid = %s::oid AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " LIMIT 1", (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
    except psycopg.Error:
        return None
    return row


def _described(holder: Mapping[str, Any] | None) -> str:
    """A holding session, for a message (empty if unknown)."""
    if holder is None:
        return ""
    where = f" from {holder['addr']}" if holder["addr"] else ""
    app = f" ({holder['app']})" if holder["app"] else ""
    since = f", connected since {holder['backend_start']:%Y-%m-%d %H:%M:%S %Z}" if holder["backend_start"] else ""
    return f" (its session: PostgreSQL backend pid {holder['pid']}{where}{app}{since})"


def feature_names_of(trace: Mapping[str, Any]) -> tuple[str, ...]:
    """The feature names a trace carries, in the builder's order (the trace JSON keeps key order)."""
    rows = trace["stages"]["score"]["candidates"]
    return tuple(rows[0]["features"]) if rows else ()
