"""The audit writer: bounded queue -> batched binary COPY -> PostgreSQL, with a durable spool.

Implements :class:`decision.contracts.AuditSink`. ``submit_*`` only masks and enqueues; one
writer thread validates, chains, encodes and compresses each event, then COPYs the batch. While
PostgreSQL is unreachable or failing, prepared batches go to the spool (fsynced per batch) and
are replayed in order when it returns; the database side is idempotent on decision_id, so a batch
whose commit was in doubt is written exactly once. A batch the spool's disk refuses too (full,
read-only, failing) is held in memory, in order, and tried again (PostgreSQL first, else the spool)
ahead of newer batches; it is lost only at the in-memory bound in fail-open mode, or at shutdown
with neither PostgreSQL nor the disk taking it.

Every event is chained before PostgreSQL sees it, so every chain link must be stored somewhere:
a decision submitted again (same ``decision_id`` and ``decided_at``, a new link) goes to
``decision_duplicates``, a second outcome to ``outcome_conflicts``; a row PostgreSQL refuses for
good (a data error, not an outage) is found by writing its batch in halves and set aside in
``<spool>/quarantine/rows`` alone, so the rest of its batch and of the spool still gets in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from audit import partitions
from audit.codec import (
    DECISION_COLUMNS,
    DECISION_TYPES,
    LEGACY_OUTCOME_WIDTH,
    OUTCOME_COLUMNS,
    OUTCOME_TYPES,
    day_of_us,
    decision_row,
    genesis,
    outcome_genesis,
    outcome_row,
)
from audit.events import DecisionEventV1, OutcomeEventV1, from_us, to_us
from audit.masking import Masker
from audit.settings import AuditSettings
from audit.spool import Spool
from audit.trace_store import STORED_TRACE, encode_trace
from decision.contracts import LIBPQ_KEEPALIVES
from decision.errors import Unavailable

log = logging.getLogger(__name__)
_DCOLS = ", ".join(DECISION_COLUMNS)
_OCOLS = ", ".join(OUTCOME_COLUMNS)


METRIC_NAMES = ("queue_depth", "last_batch_size", "rows_per_s", "spool_bytes", "rows_written", "outcomes_written",
                "duplicates_skipped", "decision_duplicates", "outcome_conflicts", "batches_written", "spooled_batches",
                "replayed_batches", "dropped", "refused", "invalid", "lost", "rejected_rows", "expired_rows",
                "spool_damaged_bytes", "spool_failing", "held_records", "db_up")
# What PostgreSQL (or the COPY encoder) raises for a row it will never take, however often it is
# retried: not an outage. (The staged write resolves duplicates itself; a UniqueViolation that still
# gets here, two writers racing to create a partition, succeeds when the halves are written.)
_ROW_ERRORS: tuple[type[Exception], ...] = (psycopg.DataError, psycopg.IntegrityError, OverflowError, UnicodeError)
_HELD_RETRY_MAX_S = 5.0  # the longest pause between tries of the batches held in memory


class AtBound:
    """What happens to a record when the audit log is at its bound (``on_spool_full``), for both
    writers: fail-closed refuses the decision (:class:`~decision.errors.Unavailable`), fail-open
    drops the record and counts it, loudly."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.dropped = 0
        self.refused = 0

    def apply(self, bound: str, tenant: str) -> None:
        """Refuse (raise) or count a drop; ``bound`` names what is full, for the error."""
        if self.mode == "fail_closed":
            self.refused += 1
            raise Unavailable(f"audit log unavailable: {bound} at their bound (fail-closed)")
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.error("audit log full: dropped %d events so far (fail-open, tenant %s)", self.dropped, tenant)


class AtBoundCounts:
    """``dropped`` and ``refused``: what a writer's :class:`AtBound` policy has counted."""

    at_bound: AtBound

    @property
    def dropped(self) -> int:
        return self.at_bound.dropped

    @property
    def refused(self) -> int:
        return self.at_bound.refused


class AuditWriter(AtBoundCounts):
    """An :class:`~decision.contracts.AuditSink` writing to PostgreSQL, never losing an event.

    Parameters
    ----------
    url : str
        PostgreSQL connection URL (migrated to head).
    settings : AuditSettings
        Queue, batch, spool, masking and fail-mode settings.
    chain_id : str, optional
        Name of this writer's hash chains (default: random per session).

    Attributes
    ----------
    rows_written, outcomes_written, duplicates_skipped, batches_written : int
        Totals since start.
    decision_duplicates, outcome_conflicts : int
        Decisions submitted again and second outcomes, stored at their chain link in
        ``decision_duplicates`` and ``outcome_conflicts``.
    last_batch_size : int
        Events in the last batch written or spooled.
    rows_per_s : float
        Rows per second of the last database write.
    dropped, refused, invalid : int
        Events dropped (fail-open), refused (fail-closed) and rejected as malformed.
    lost : int
        Records neither PostgreSQL nor the spool took and that could not be held any longer: over
        the in-memory bound in fail-open mode, or at shutdown (``drain_timeout_s``) with neither
        the database nor the spool's disk back. Each loss is logged as an error.
    held_records : int
        Records held in memory, in order, because neither PostgreSQL nor the spool took their batch
        (the database away and the spool's disk refusing writes: full, read-only, failing). They
        are tried again with backoff, ahead of newer batches; fail-closed refuses new records while
        any are held, fail-open takes them within ``queue_max`` records not yet stored or spooled.
    rejected_rows : int
        Single rows PostgreSQL refused for good, set aside under ``<spool>/quarantine``.
    spool_damaged_bytes : int
        Bytes of spool segments that were not records (damage); such a segment's readable batches
        are stored and the segment is kept in ``<spool>/quarantine``.
    spool_failing : float
        1 from a write the spool's disk refused until a spool write succeeds again or PostgreSQL
        takes the held batches (see ``held_records``), else 0.
    expired_rows : int
        Rows of days retention had already dropped when they arrived (a spool replayed late):
        not written, so a dropped day is not recreated with a partial chain.
    db_up : bool
        Whether the last database write succeeded.
    """

    def __init__(self, url: str, settings: AuditSettings | None = None, *, chain_id: str | None = None,
                 start: bool = True) -> None:
        self.url = url
        self.settings = s = settings or AuditSettings()
        self.chain_id = chain_id or secrets.token_hex(6)
        self.masker = Masker(s.mask_fields, mode=s.mask_mode, key=s.mask_key)
        self.spool = Spool(Path(s.spool_dir), segment_bytes=s.spool_segment_bytes)
        self._q: queue.Queue[tuple[str, Mapping[str, Any]]] = queue.Queue(maxsize=s.queue_max)
        self._heads: dict[dt.date, tuple[int, str]] = {}
        self._oheads: dict[dt.date, tuple[int, str]] = {}  # the outcome chains' (seq, hash) per day
        self._days_ready: set[dt.date] = set()
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._enqueued = 0
        self._handled = 0
        self._next_retry = 0.0
        self.rows_written = 0
        self.outcomes_written = 0
        self.duplicates_skipped = 0
        self.decision_duplicates = 0  # decisions submitted again, kept in decision_duplicates
        self.outcome_conflicts = 0  # second outcomes of a decision, kept in outcome_conflicts
        self.batches_written = 0
        self.last_batch_size = 0
        self.rows_per_s = 0.0
        self.at_bound = AtBound(s.on_spool_full)
        self.invalid = 0
        self.lost = 0
        self._spool_error = ""  # the spool's last write failure; "" once a write succeeds again
        # Batches neither PostgreSQL nor the spool took, oldest first: (prepared, records). A
        # ``None`` batch only keeps the place of records counted already (lost, invalid, skipped),
        # so that ``handled`` still counts records in the order they came.
        self._held: deque[tuple[dict[str, Any] | None, int]] = deque()
        self.held_records = 0  # records of the held batches that are not None
        self._held_failures = 0
        self._held_retry_at = 0.0
        self.rejected_rows = 0
        self.expired_rows = 0
        self.spool_damaged_bytes = 0
        self._cutoff: dt.date | None = None  # retention's cutoff as last read (audit_retention)
        self._rejects: Spool | None = None  # quarantine/rows, opened at the first rejected row
        self.db_up = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        if start:
            self._thread.start()

    # -- request path --------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._q.qsize()

    @property
    def spool_bytes(self) -> int:
        return self.spool.size_bytes

    def _full(self, tenant: str) -> bool:
        if self.spool.size_bytes < self.settings.spool_max_bytes and not self._q.full() and not self._holding_full():
            return False
        self.at_bound.apply("spool and queue", tenant)
        return True

    def _holding_full(self) -> bool:
        """Whether batches held in memory close the door: always in fail-closed mode (no durable
        place takes records now), in fail-open mode at ``queue_max`` records taken and not yet
        stored or spooled (queued, in flight and held: memory stays bounded)."""
        if not self.held_records:
            return False
        return self.at_bound.mode == "fail_closed" or self._enqueued - self._handled >= self.settings.queue_max

    def _put(self, kind: str, event: Mapping[str, Any]) -> None:
        try:
            self._q.put_nowait((kind, event))
        except queue.Full:  # another thread took the last place since _full looked
            tenant = str(event.get("tenant", ""))
            if self._full(tenant):  # still full: the bound's policy applies (refuse, or count the drop)
                return
            try:
                self._q.put((kind, event), timeout=1.0)
            except queue.Full:
                self.at_bound.apply("spool and queue", tenant)
                return
        with self._idle:  # counted on every path that queued it: flush() waits for it
            self._enqueued += 1

    def submit_decision(self, event: Mapping[str, Any]) -> None:
        """Mask and enqueue; raises :class:`~decision.errors.Unavailable` when full and fail-closed."""
        if self._full(str(event.get("tenant", ""))):
            return
        self._put("d", self.masker.mask_event(event, trace=False))

    def submit_outcome(self, event: Mapping[str, Any]) -> None:
        if self._full(""):
            return
        self._put("o", event)

    @property
    def handled(self) -> int:
        """Records written, spooled or rejected, in the order they came."""
        return self._handled

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted event is in PostgreSQL (queue and spool empty)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._handled < self._enqueued or self.spool.has_backlog:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        """Drain the queue (to PostgreSQL, else to the spool) and stop the writer thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.spool.close()
        if self._rejects is not None:
            self._rejects.close()
        if self._conn is not None:
            self._conn.close()

    @property
    def has_backlog(self) -> bool:
        """Whether the spool, or memory (see ``held_records``), holds batches PostgreSQL has not taken yet."""
        return self.spool.has_backlog or bool(self._held)

    def metrics(self) -> dict[str, float]:
        """Plain numbers for ``/metrics`` (:data:`METRIC_NAMES`)."""
        return {"queue_depth": self.queue_depth, "last_batch_size": self.last_batch_size,
                "rows_per_s": self.rows_per_s, "spool_bytes": self.spool_bytes,
                "rows_written": self.rows_written, "outcomes_written": self.outcomes_written,
                "duplicates_skipped": self.duplicates_skipped, "decision_duplicates": self.decision_duplicates,
                "outcome_conflicts": self.outcome_conflicts, "batches_written": self.batches_written,
                "spooled_batches": self.spool.appended_records, "replayed_batches": self.spool.replayed_records,
                "dropped": self.dropped, "refused": self.refused, "invalid": self.invalid,
                "lost": self.lost, "rejected_rows": self.rejected_rows,
                "expired_rows": self.expired_rows, "spool_damaged_bytes": self.spool_damaged_bytes,
                "spool_failing": float(bool(self._spool_error)), "held_records": self.held_records,
                "db_up": float(self.db_up)}

    # -- writer thread -------------------------------------------------------------------------
    def _take(self) -> list[tuple[str, Mapping[str, Any]]]:
        s = self.settings
        try:
            first = self._q.get(timeout=s.flush_interval_s)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + s.flush_interval_s
        while len(batch) < s.batch_size:
            try:
                batch.append(self._q.get_nowait())
            except queue.Empty:
                if self._stop.is_set() or time.monotonic() >= deadline:
                    break
                try:
                    batch.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        return batch

    def _prepare(self, batch: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
        """Validate, chain and encode a batch into spool-able rows (times as µs ints)."""
        drows: list[list[Any]] = []
        orows: list[list[Any]] = []
        level, codec = self.settings.compress_level, self.settings.trace_codec
        for kind, ev in batch:
            try:
                if kind == "d":
                    # The writer process hands over the stored trace made already (masked); else it is made here.
                    stored = ev.get(STORED_TRACE)
                    e = DecisionEventV1.from_mapping(ev)
                    if stored is None:
                        stored = encode_trace(ev.get("trace"), self.masker)  # not `or {}`: that would build a lazy one
                    drows.append(self._link(self._heads, day_of_us(e.decided_at_us), genesis, decision_row, e,
                                            trace_bytes=stored, level=level, codec=codec))
                else:
                    o = OutcomeEventV1.from_mapping(ev)
                    orows.append(self._link(self._oheads, day_of_us(o.reported_at_us), outcome_genesis,
                                            outcome_row, o))
            except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: a time past year 9999
                with self._idle:  # deliver (maybe on another thread) counts here too
                    self.invalid += 1
                log.error("audit: rejected a malformed %s event %r: %s", kind, ev.get("decision_id"), exc)
        return {"d": drows, "o": orows}

    def _link(self, heads: dict[dt.date, tuple[int, str]], day: dt.date, genesis_of: Callable[[dt.date, str], str],
              make_row: Callable[..., tuple[Any, ...]], event: Any, **extra: Any) -> list[Any]:
        """``event``'s row as the next link of this writer's chain for ``day`` (a row ends with its hash)."""
        seq, prev = heads.get(day) or (0, genesis_of(day, self.chain_id))
        row = list(make_row(event, chain_id=self.chain_id, seq=seq + 1, prev_hash=prev, **extra))
        heads[day] = (seq + 1, row[-1])
        return row

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            s = self.settings
            # Keepalives and a TCP user timeout make a connection whose packets vanish (a network
            # partition, no reset) fail like an outage, so the batch is spooled, instead of waiting
            # on the socket for as long as the kernel's retransmissions last.
            self._conn = psycopg.connect(self.url, connect_timeout=s.connect_timeout_s,
                                         options=f"-c statement_timeout={s.statement_timeout_ms}",
                                         tcp_user_timeout=s.statement_timeout_ms + 5000, **LIBPQ_KEEPALIVES)
            self._conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS audit_stage_d (LIKE decision_events) ON COMMIT DELETE ROWS")
            self._conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS audit_stage_o (LIKE outcomes) ON COMMIT DELETE ROWS")
            self._conn.commit()
        return self._conn

    def _unexpired(self, conn: psycopg.Connection[Any], drows: list[list[Any]], orows: list[list[Any]]
                   ) -> tuple[list[list[Any]], list[list[Any]], int, set[dt.date]]:
        """``drows`` and ``orows`` without the rows of days retention has dropped, how many those were,
        and the days the kept decisions need that are not known to exist.

        The cutoff is read again whenever a batch needs such a day: a day retention dropped while
        this writer ran must not be recreated by a late replay (half a day's chain).
        """
        new_days = {day_of_us(r[1]) for r in drows} - self._days_ready
        if new_days:
            # Held shared until this transaction commits: a retention run records its cutoff either
            # before this read (seen here) or after the partitions made below exist (and drops them).
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (partitions.RETENTION_LOCK,))
            self._cutoff = partitions.retired_before(conn)
        if self._cutoff is None:
            return drows, orows, 0, new_days
        limit = to_us(dt.datetime.combine(self._cutoff, dt.time(), tzinfo=dt.UTC))
        keep_d = [r for r in drows if r[1] >= limit] if drows and min(r[1] for r in drows) < limit else drows
        keep_o = [r for r in orows if r[8] >= limit] if orows and min(r[8] for r in orows) < limit else orows
        expired = len(drows) - len(keep_d) + len(orows) - len(keep_o)
        if expired:
            log.warning("audit: %d rows from before retention's cutoff %s were not written (their days were "
                        "dropped)", expired, self._cutoff)
        return keep_d, keep_o, expired, {d for d in new_days if d >= self._cutoff}

    @staticmethod
    def _ensure_days(conn: psycopg.Connection[Any], days: set[dt.date]) -> set[dt.date]:
        """Create the partitions of ``days`` (not known to exist); returns them.

        The caller marks them ready only once its transaction commits: a partition created in a
        transaction that rolls back is gone, and a day cached anyway would fail every later row.
        """
        for day in days:
            partitions.ensure_partition(conn, day=day)
        return days

    def _copy(self, conn: psycopg.Connection[Any], table: str, cols: str, types: tuple[str, ...],
              rows: list[list[Any]], time_col: int) -> None:
        with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(list(types))
            for r in rows:
                r2 = list(r)
                r2[time_col] = from_us(r2[time_col])
                cp.write_row(r2)

    def _write(self, prepared: dict[str, Any], *, staged: bool) -> None:
        """One transaction. ``staged`` dedupes decisions through a temp table (replays)."""
        drows, orows = prepared["d"], prepared["o"]
        t0 = time.perf_counter()
        conn = self._connection()
        try:
            with conn.transaction():
                drows, orows, expired, needed = self._unexpired(conn, drows, orows)
                new_days = self._ensure_days(conn, needed)
                inserted = d_dups = 0
                if drows and not staged:
                    self._copy(conn, "decision_events", _DCOLS, DECISION_TYPES, drows, 1)
                    inserted = len(drows)
                elif drows:
                    self._copy(conn, "audit_stage_d", _DCOLS, DECISION_TYPES, drows, 1)
                    inserted = conn.execute(
                        f"INSERT INTO decision_events ({_DCOLS}) SELECT {_DCOLS} FROM audit_stage_d "
                        "ON CONFLICT (decision_id, decided_at) DO NOTHING").rowcount
                    if inserted < len(drows):
                        # A decision submitted again got a link of its own when it was chained: keep
                        # it (a replay of a stored row has the same hash and is skipped).
                        d_dups = conn.execute(
                            f"INSERT INTO decision_duplicates ({_DCOLS}) SELECT {_DCOLS} FROM audit_stage_d s "
                            "WHERE NOT EXISTS (SELECT 1 FROM decision_events e WHERE e.decision_id = s.decision_id "
                            "AND e.decided_at = s.decided_at AND e.hash = s.hash) "
                            "ON CONFLICT (chain_id, seq, decided_at) DO NOTHING").rowcount
                o_inserted = o_conflicts = 0
                if orows:
                    pad = [None] * (len(OUTCOME_COLUMNS) - LEGACY_OUTCOME_WIDTH)
                    orows = [r if len(r) != LEGACY_OUTCOME_WIDTH else [*r, *pad] for r in orows]  # an old spool's
                    self._copy(conn, "audit_stage_o", _OCOLS, OUTCOME_TYPES, orows, 8)
                    o_inserted = conn.execute(
                        f"INSERT INTO outcomes ({_OCOLS}) SELECT {_OCOLS} FROM audit_stage_o "
                        "ON CONFLICT (decision_id) DO NOTHING").rowcount
                    # A different outcome for a decision that has one keeps its chain link (a replay
                    # of a stored row has the same hash and is skipped).
                    o_conflicts = conn.execute(
                        f"INSERT INTO outcome_conflicts ({_OCOLS}) SELECT {_OCOLS} FROM audit_stage_o s "
                        "WHERE s.hash IS NOT NULL AND NOT EXISTS (SELECT 1 FROM outcomes o "
                        "WHERE o.decision_id = s.decision_id AND o.hash = s.hash) "
                        "ON CONFLICT (chain_id, seq, reported_at) DO NOTHING").rowcount
        except pgerrors.UniqueViolation:
            if staged:
                raise
            self._write(prepared, staged=True)
            return
        except psycopg.OperationalError:
            self._days_ready.clear()
            raise
        self._days_ready |= new_days  # committed: the partitions exist now
        self.expired_rows += expired
        elapsed = time.perf_counter() - t0
        self.rows_written += inserted
        self.outcomes_written += o_inserted
        self.decision_duplicates += d_dups
        self.outcome_conflicts += o_conflicts
        self.duplicates_skipped += len(drows) - inserted - d_dups + len(orows) - o_inserted - o_conflicts
        self.batches_written += 1
        self.rows_per_s = (len(drows) + len(orows)) / elapsed if elapsed > 0 else 0.0
        self.db_up = True

    def _mark_down(self, exc: BaseException) -> None:
        if self.db_up or self._next_retry == 0.0:
            log.warning("audit: PostgreSQL unavailable (%s); spooling to %s", exc, self.spool.directory)
        self.db_up = False
        self._next_retry = time.monotonic() + self.settings.retry_interval_s
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _write_isolating(self, prepared: dict[str, Any], exc: Exception) -> None:
        """Write a batch whose write failed with ``exc`` (one of :data:`_ROW_ERRORS`) in halves,
        down to single rows, and set aside each row PostgreSQL still refuses.

        Every half is written staged, so rows a failed attempt may have committed are not doubled.
        A refused row's chain link is missing from the log (``audit verify`` reports it there);
        the row itself is kept in ``<spool>/quarantine/rows``. Outages (any other
        :class:`psycopg.Error`) propagate: the caller spools or keeps the whole batch, and its
        replay skips the halves already stored.
        """
        # A cached day whose partition was dropped since (retention) fails every row: ensure again.
        self._days_ready.clear()
        rows = [("d", r) for r in prepared["d"]] + [("o", r) for r in prepared["o"]]
        if len(rows) == 1:
            self._reject(prepared, exc)
            return
        half = len(rows) // 2
        for part in (rows[:half], rows[half:]):  # in order: the first outcome of a decision stays first
            sub = {"d": [r for k, r in part if k == "d"], "o": [r for k, r in part if k == "o"]}
            try:
                self._write(sub, staged=True)
            except _ROW_ERRORS as sub_exc:
                self._write_isolating(sub, sub_exc)

    def _reject(self, prepared: dict[str, Any], exc: Exception) -> None:
        """Keep one refused row in ``<spool>/quarantine/rows`` (spool format), loudly."""
        if self._rejects is None:
            self._rejects = Spool(self.spool.directory / "quarantine" / "rows",
                                  segment_bytes=self.settings.spool_segment_bytes)
        self._rejects.append(prepared)
        self.rejected_rows += 1
        what, columns, rows = (("decision", DECISION_COLUMNS, prepared["d"]) if prepared["d"]
                               else ("outcome", OUTCOME_COLUMNS, prepared["o"]))
        link = dict(zip(columns, rows[0], strict=False))
        log.error("audit: PostgreSQL refused the %s of decision %r (chain %s seq %s): %s; kept in %s", what,
                  link.get("decision_id"), link.get("chain_id"), link.get("seq"), exc, self._rejects.directory)

    def _deliver(self, prepared: dict[str, Any]) -> bool:
        """Write a batch, else spool it; False if neither PostgreSQL nor the spool took it."""
        if not prepared["d"] and not prepared["o"]:
            return True
        self.last_batch_size = len(prepared["d"]) + len(prepared["o"])
        if self.spool.has_backlog or (not self.db_up and time.monotonic() < self._next_retry):
            return self._spool(prepared)
        try:
            try:
                self._write(prepared, staged=False)
            except _ROW_ERRORS as exc:  # PostgreSQL is up and refuses a row: not an outage
                self._write_isolating(prepared, exc)
            self._spool_error = ""
        except psycopg.Error as exc:
            self._mark_down(exc)
            return self._spool(prepared)  # its replay (or retry) skips what the isolation stored
        return True

    def _spool(self, prepared: dict[str, Any]) -> bool:
        """Append a batch to the spool; False (the caller holds the batch) when its disk refuses."""
        try:
            self.spool.append(prepared)
        except OSError as exc:
            if not self._spool_error:  # once per episode: the retries would repeat it every round
                log.error("audit: PostgreSQL is away and the spool %s refused a batch (%s): held in memory and "
                          "retried ahead of newer ones; fail-closed refuses new decisions meanwhile",
                          self.spool.directory, exc)
            self._spool_error = str(exc)
            return False
        if self._spool_error:
            log.warning("audit: the spool %s takes writes again", self.spool.directory)
        self._spool_error = ""
        return True

    def _store(self, prepared: dict[str, Any] | None, records: int) -> bool:
        """:meth:`_deliver` a batch; True also for a batch with nothing to store (``None``) and for one
        that failed unexpectedly (its records are counted invalid: the writer must survive anything)."""
        if prepared is None:
            return True
        try:
            return self._deliver(prepared)
        except Exception:
            log.exception("audit writer: unexpected error")
            with self._idle:  # deliver (maybe on another thread) counts here too
                self.invalid += records
            return True

    def _done(self, records: int) -> None:
        with self._idle:
            self._handled += records
            self._idle.notify_all()

    def _hold(self, prepared: dict[str, Any] | None, records: int) -> None:
        """Keep a batch behind those held already (``None``: only its place, for ``handled``).

        Fail-closed keeps every batch: its door is shut while any is held, so only what it had
        taken before can arrive. Fail-open takes records while held ones wait, so its held records
        are bounded by ``queue_max``: a batch past that is lost, loudly.
        """
        if prepared is not None and (self.at_bound.mode == "fail_closed"
                                     or self.held_records + records <= self.settings.queue_max):
            self._held.append((prepared, records))
            self.held_records += records
            return
        if prepared is not None:
            self._lose(prepared, f"{self.held_records} records are held in memory already, the bound "
                                 f"(queue_max {self.settings.queue_max}, fail-open)")
        self._handled_in_order(records)

    def _handled_in_order(self, records: int) -> None:
        """Count ``records`` handled, in order: once the batches held in memory before them are."""
        if self._held:
            self._held.append((None, records))
        else:
            self._done(records)

    def _lose(self, prepared: dict[str, Any], why: str) -> None:
        n = len(prepared["d"]) + len(prepared["o"])
        with self._idle:
            self.lost += n
        log.error("audit: %d records are lost: neither PostgreSQL nor the spool %s takes them (%s) and %s",
                  n, self.spool.directory, self._spool_error or "the spool refused them", why)

    def _back_off(self) -> None:
        self._held_failures += 1
        pause = self.settings.retry_interval_s * 2 ** min(self._held_failures - 1, 16)
        self._held_retry_at = time.monotonic() + min(_HELD_RETRY_MAX_S, pause)

    def _retry_held(self, deadline: float | None = None) -> None:
        """Try the held batches again, oldest first, once their backoff is over: after the spool's
        backlog (older than they are), to PostgreSQL, else to the spool. The first one refused
        again stops the round: the ones behind it must not overtake it."""
        if time.monotonic() < self._held_retry_at:
            return
        try:
            if self.spool.has_backlog:
                self._replay(deadline, interleave=False)
            while self._held:
                prepared, records = self._held[0]
                if not self._store(prepared, records):
                    self._back_off()
                    return
                self._held.popleft()
                if prepared is not None:
                    self.held_records -= records
                self._done(records)
        except Exception:  # e.g. the spool's disk failing a read: what is held stays held
            log.exception("audit writer: unexpected error while retrying the held batches")
            self._back_off()
            return
        self._held_failures = 0
        self._held_retry_at = 0.0
        log.warning("audit: the batches held in memory are stored now (%s)",
                    "in the spool" if self.spool.has_backlog else "in PostgreSQL")

    def _replay(self, deadline: float | None = None, *, interleave: bool = True) -> None:
        """Replay closed spool segments oldest first while PostgreSQL accepts them (``interleave``:
        stop after a segment when records are queued, to keep them moving)."""
        if time.monotonic() < self._next_retry:
            return
        while self.spool.has_backlog:
            if deadline is not None and time.monotonic() > deadline:
                return
            seg = self.spool.oldest_segment()
            if seg is None:
                return
            records, unreadable = self.spool.read_segment_checked(seg)
            try:
                for rec in records:
                    try:
                        self._write(rec, staged=True)
                    except _ROW_ERRORS as exc:  # one bad row must not take the segment with it
                        self._write_isolating(rec, exc)
            except psycopg.Error as exc:
                # Not a row's fault (those are set aside above, one by one): PostgreSQL is away, or up
                # but not taking writes (read-only after a failover), or a partition another writer is
                # creating. The segment stays and is replayed later; setting it aside would lose it.
                self._mark_down(exc)
                return
            if unreadable:  # its readable records are in; the rest is kept for a person to look at
                self.spool_damaged_bytes += unreadable
                moved = self.spool.quarantine_segment(seg)
                log.error("audit: spool segment %s had %d unreadable bytes; its %d readable batches are stored, "
                          "the segment is kept in %s", seg.name, unreadable, len(records), moved)
                continue
            self.spool.remove_segment(seg, len(records))
            if interleave and not self._q.empty():
                return  # interleave: keep the queue moving (into the spool) during a long replay
            log.info("audit: replayed spool segment %s (%d batches)", seg.name, len(records))

    def process(self, batch: list[tuple[str, Mapping[str, Any]]]) -> None:
        """Write one batch (else spool it), then replay the spool while PostgreSQL takes it.

        The writer thread's loop body: :meth:`prepare` then :meth:`deliver`.
        """
        self.deliver(self.prepare(batch), len(batch))

    def prepare(self, batch: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any] | None:
        """Validate, chain and encode a batch (CPU work; no I/O). Batches must be delivered in the
        order they were prepared: each continues the chains the one before it left."""
        if not batch:
            return None
        try:
            return self._prepare(batch)
        except Exception:  # the writer must survive anything; the events are counted
            log.exception("audit writer: unexpected error")
            with self._idle:
                self.invalid += len(batch)
            return None

    def deliver(self, prepared: dict[str, Any] | None, records: int) -> None:
        """Write a prepared batch of ``records`` records (else spool it, else hold it in memory),
        then try the held batches again and replay the spool while PostgreSQL takes it.
        ``audit.writer_process`` runs this on a thread of its own, overlapping PostgreSQL's work
        on one batch with the preparation of the next."""
        if records:
            if self._held:
                self._hold(prepared, records)  # behind the held batches: it must not overtake them
            elif self._store(prepared, records):
                self._done(records)
            else:
                self._hold(prepared, records)
                if self._held:
                    self._back_off()  # it was just refused: tried again next round, not at once
        if not self._held and not self.spool.has_backlog:
            return
        try:
            if self._held:
                self._retry_held()
            else:
                self._replay()
        except Exception:  # e.g. the spool's disk failing a read: the batches stay where they are
            log.exception("audit writer: unexpected error while retrying or replaying")
        with self._idle:
            self._idle.notify_all()

    def skip(self, records: int) -> None:
        """Count ``records`` handled without storing them (they are stored already: a resend's),
        in order: behind any batch held in memory."""
        self._handled_in_order(records)

    def finish(self) -> None:
        """After the last batch: replay what the spool holds and store the held batches (within
        ``drain_timeout_s``); held batches neither PostgreSQL nor the disk takes by then are lost, loudly."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        if self.spool.has_backlog or self._held:
            self._next_retry = self._held_retry_at = 0.0
            self._replay(deadline=deadline)
        while self._held:  # tried at least once, even with no time to drain
            self._retry_held(deadline)
            if not self._held or time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(self._held_retry_at, deadline) - time.monotonic()))
        if self._held:
            n = sum(len(p["d"]) + len(p["o"]) for p, _ in self._held if p is not None)
            with self._idle:
                self.lost += n
            log.error("audit: shutting down with PostgreSQL away and the spool %s refusing writes (%s) for %.0f s: "
                      "%d records held in memory are lost", self.spool.directory, self._spool_error,
                      self.settings.drain_timeout_s, n)
            while self._held:
                self._done(self._held.popleft()[1])
            self.held_records = 0
        if self.spool.has_backlog:
            log.warning("audit: %d bytes left in the spool %s; replayed on next start",
                        self.spool.size_bytes, self.spool.directory)

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self.process(self._take())
            if stopping and self._q.empty():
                break
        self.finish()


def make_writer(kind: str, url: str, settings: AuditSettings, chain_id: str | None = None) -> Any:
    """The audit sink of ``kind``: ``process`` (:class:`audit.writer_process.ProcessAuditWriter`,
    the service's default) or ``thread`` (:class:`AuditWriter`)."""
    if kind == "process":
        from audit.writer_process import ProcessAuditWriter

        return ProcessAuditWriter(url, settings, chain_id=chain_id)
    if kind == "thread":
        return AuditWriter(url, settings, chain_id=chain_id)
    raise ValueError(f"unknown audit writer kind {kind!r} (process or thread)")
