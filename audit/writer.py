"""The audit writer: bounded queue -> batched binary COPY -> PostgreSQL, with a durable spool.

Implements :class:`decision.contracts.AuditSink`. ``submit_*`` only masks and enqueues; one
writer thread validates, chains, encodes and compresses each event, then COPYs the batch. While
PostgreSQL is unreachable or failing, prepared batches go to the spool (fsynced per batch) and
are replayed in order when it returns; the database side is idempotent on decision_id, so a batch
whose commit was in doubt is written exactly once.

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
from decision.errors import Unavailable

log = logging.getLogger(__name__)
_DCOLS = ", ".join(DECISION_COLUMNS)
_OCOLS = ", ".join(OUTCOME_COLUMNS)


METRIC_NAMES = ("queue_depth", "last_batch_size", "rows_per_s", "spool_bytes", "rows_written", "outcomes_written",
                "duplicates_skipped", "decision_duplicates", "outcome_conflicts", "batches_written", "spooled_batches",
                "replayed_batches", "dropped", "refused", "invalid", "lost", "rejected_rows", "expired_rows",
                "spool_damaged_bytes", "spool_failing", "db_up")
# What PostgreSQL (or the COPY encoder) raises for a row it will never take, however often it is
# retried: not an outage. (The staged write resolves duplicates itself; a UniqueViolation that still
# gets here, two writers racing to create a partition, succeeds when the halves are written.)
_ROW_ERRORS: tuple[type[Exception], ...] = (psycopg.DataError, psycopg.IntegrityError, OverflowError, UnicodeError)


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
        Records neither PostgreSQL nor the spool took (the database away and the spool's disk
        refusing writes: full, read-only); each is logged, and the spool counts as full until a
        write succeeds again, so the bound's policy applies to what comes next.
    rejected_rows : int
        Single rows PostgreSQL refused for good, set aside under ``<spool>/quarantine``.
    spool_damaged_bytes : int
        Bytes of spool segments that were not records (damage); such a segment's readable batches
        are stored and the segment is kept in ``<spool>/quarantine``.
    spool_failing : float
        1 while the spool's disk refuses writes (see ``lost``), else 0.
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
        if self.spool.size_bytes < self.settings.spool_max_bytes and not self._q.full() and not self._spool_error:
            return False
        self.at_bound.apply("spool and queue", tenant)
        return True

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
        """Whether the spool holds batches PostgreSQL has not taken yet."""
        return self.spool.has_backlog

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
                "spool_failing": float(bool(self._spool_error)),
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
                                         keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                                         tcp_user_timeout=s.statement_timeout_ms + 5000)
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

    def _deliver(self, prepared: dict[str, Any]) -> None:
        if not prepared["d"] and not prepared["o"]:
            return
        self.last_batch_size = len(prepared["d"]) + len(prepared["o"])
        if self.spool.has_backlog or (not self.db_up and time.monotonic() < self._next_retry):
            self._spool(prepared)
            return
        try:
            try:
                self._write(prepared, staged=False)
            except _ROW_ERRORS as exc:  # PostgreSQL is up and refuses a row: not an outage
                self._write_isolating(prepared, exc)
            self._spool_error = ""
        except psycopg.Error as exc:
            self._mark_down(exc)
            self._spool(prepared)  # its replay skips what the isolation stored

    def _spool(self, prepared: dict[str, Any]) -> None:
        """Append a batch to the spool; when its disk refuses, count the records lost, loudly (not as
        malformed), and let the spool count as full until a write succeeds again."""
        try:
            self.spool.append(prepared)
        except OSError as exc:
            n = len(prepared["d"]) + len(prepared["o"])
            with self._idle:
                self.lost += n
            self._spool_error = str(exc)
            log.error("audit: PostgreSQL is away and the spool %s refused %d records (%s): they are lost",
                      self.spool.directory, n, exc)
            return
        self._spool_error = ""

    def _replay(self, deadline: float | None = None) -> None:
        """Replay closed spool segments oldest first while PostgreSQL accepts them."""
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
            if not self._q.empty():
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
        """Write a prepared batch of ``records`` records (else spool it), then replay the spool while
        PostgreSQL takes it. ``audit.writer_process`` runs this on a thread of its own, overlapping
        PostgreSQL's work on one batch with the preparation of the next."""
        if records:
            try:
                if prepared is not None:
                    self._deliver(prepared)
            except Exception:  # the writer must survive anything; the events are counted
                log.exception("audit writer: unexpected error")
                with self._idle:
                    self.invalid += records
            with self._idle:
                self._handled += records
                self._idle.notify_all()
        if self.spool.has_backlog:
            self._replay()
            with self._idle:
                self._idle.notify_all()

    def finish(self) -> None:
        """After the last batch: replay what the spool holds (within ``drain_timeout_s``)."""
        if self.spool.has_backlog:
            self._next_retry = 0.0
            self._replay(deadline=time.monotonic() + self.settings.drain_timeout_s)
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
