"""The audit writer in a process of its own, so the service's interpreter only hands records over.

:class:`ProcessAuditWriter` is the :class:`~decision.contracts.AuditSink` the service uses by
default (``audit.writer: process``). ``submit_*`` masks a decision's top-level fields, turns the
record into messages (:class:`audit.shipping.Packer`: the trace as parts, shared objects as
handles), encodes them and appends the bytes to a bounded outbox; a shipper thread sends the
outbox in batches down a pipe. The child process (:func:`_child_main`) turns each record's trace
parts into the stored parts form (:mod:`audit.trace_store`) without decoding most of them: it
swaps the handles for their objects, encoded once each, and masks the trace's request. It writes
the records through an :class:`~audit.writer.AuditWriter` (batched COPY, spool, hash chain) and
reports back how many records are safely in PostgreSQL or the spool. The trace's request crosses
the pipe unmasked (memory to memory, as it sat in the in-process queue before); nothing reaches
PostgreSQL or the spool unmasked.

The child is started with ``spawn`` (a fork of a threaded gRPC server is unsafe), so a script
that builds one must guard its entry point with ``if __name__ == "__main__":``.

Nothing is lost if the child dies: the parent keeps every batch the child has not confirmed,
starts a new child (a new chain) and sends them again; the new child skips the decisions and
outcomes already in PostgreSQL or in the spool (the dead child's, replayed later) before
chaining, so each is stored exactly once. An outcome is skipped only if that same report is
stored (the decision's outcome, or a second one in ``outcome_conflicts``): a second, different
outcome is kept. :meth:`ProcessAuditWriter.close` replaces a child that died too, before it
drains. The parent controls the child's life: the child ignores SIGTERM and SIGINT (a signal to
the whole process group, a service stop or a terminal's ^C, would otherwise kill it before the
parent has shipped the rest); a parent that exits without :meth:`~ProcessAuditWriter.close`
closes it at exit.

The bound (``queue_max`` records not yet confirmed, or the child's spool at ``spool_max_bytes``)
applies ``on_spool_full`` here, on the request path: fail-closed raises
:class:`~decision.errors.Unavailable`, fail-open drops and counts. Records the child holds in
memory (PostgreSQL away and the spool's disk refusing writes) are not confirmed, so they count
against that bound and are sent again to a replacement; while the child holds any, fail-closed
refuses.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing import util as mp_util
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg

from audit.codec import OUTCOME_CONTENT_COLUMNS, outcome_content
from audit.events import DecisionEventV1, OutcomeEventV1, to_us
from audit.masking import Masker
from audit.settings import AuditSettings
from audit.shipping import Packer, Unpacker, decode_lazy, encode, encode_each, join
from audit.spool import Spool, check_spool_free
from audit.writer import METRIC_NAMES, AtBound, AtBoundCounts
from decision.trace_format import TraceParts

log = logging.getLogger(__name__)
_SHIP_EVERY_S = 0.01  # the writer flushes every flush_interval_s (0.2 s) anyway
_SHIP_MAX = 512
_FULL_EVERY = 64  # batches between the writer process's full collections
_SWITCH_INTERVAL_S = 0.0005  # the writer process's (default 5 ms: the copy thread would wait that long)
_CLOSE_RESTARTS = 3  # children close() starts to replace one that died (a crash loop must not hang the stop)


class ProcessAuditWriter(AtBoundCounts):
    """An audit sink whose writer runs in a child process (see the module docstring).

    Parameters
    ----------
    url : str
        PostgreSQL connection URL (migrated to head).
    settings : AuditSettings
        As for :class:`~audit.writer.AuditWriter`; the child uses the same settings.
    chain_id : str, optional
        Prefix of the child's hash-chain ids (each child gets its own chain).
    """

    def __init__(self, url: str, settings: AuditSettings | None = None, *, chain_id: str | None = None) -> None:
        self.url = url
        self.settings = settings or AuditSettings()
        self.masker = Masker(self.settings.mask_fields, mode=self.settings.mask_mode, key=self.settings.mask_key)
        self._chain_prefix = chain_id or secrets.token_hex(6)
        self._packer = Packer()
        self._lock = threading.Lock()  # outbox and counters
        self._outbox: list[bytes] = []  # encoded messages (see shipping.encode_each)
        self._outbox_records = 0
        self._shipped = 0  # records sent to the current child
        self._submitted = 0  # records accepted from the request path
        self._confirmed = 0  # records the child reports as in PostgreSQL or the spool
        # Batches the child has not confirmed: (records shipped up to and including it, its records, bytes).
        self._unconfirmed: deque[tuple[int, int, bytes]] = deque()
        self._status: dict[str, Any] = {}
        self._status_cv = threading.Condition()
        self.at_bound = AtBound(self.settings.on_spool_full)
        self.restarts = 0
        self._failed_starts = 0
        self._next_restart = 0.0
        self._closing = False
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._data: Connection | None = None
        self._reader: threading.Thread | None = None
        # Refused here, at start-up, rather than by every child it would restart in vain.
        check_spool_free(Path(self.settings.spool_dir))
        self._start_child(base=0)
        self._wake = threading.Event()
        self._shipper = threading.Thread(target=self._ship_loop, name="audit-shipper", daemon=True)
        self._shipper.start()
        # The child ignores SIGTERM, so multiprocessing's own exit handling (SIGTERM every daemon
        # child, then join it without a timeout) would wait forever on a writer nobody closed: close
        # it first (a finalizer with a priority runs before that; only in this process, not a fork).
        self._at_exit = mp_util.Finalize(None, self.close, exitpriority=5)

    # -- request path --------------------------------------------------------------------------
    def _full(self, tenant: str) -> bool:
        backlog = self._submitted - self._confirmed  # the records the child holds in memory among them
        if (backlog < self.settings.queue_max and self._metric("spool_bytes") < self.settings.spool_max_bytes
                # Records only in the child's memory (no durable place takes them now): fail-closed takes no more.
                and not (self._metric("held_records") and self.at_bound.mode == "fail_closed")):
            return False
        self.at_bound.apply("writer backlog and spool", tenant)
        return True

    def submit_decision(self, event: Mapping[str, Any]) -> None:
        """Mask and hand over; raises :class:`~decision.errors.Unavailable` when full and fail-closed."""
        if self._full(str(event.get("tenant", ""))):
            return
        trace = event.get("trace")
        gather = getattr(trace, "parts", None)
        parts: TraceParts | None = gather() if callable(gather) else None
        masked = self.masker.mask_event(event, trace=False)
        if parts is None:  # a trace built already: it crosses as it is
            masked["trace"] = dict(trace) if isinstance(trace, Mapping) else {}
        else:
            del masked["trace"]
        self._enqueue("d", masked, parts)

    def submit_outcome(self, event: Mapping[str, Any]) -> None:
        if self._full(""):
            return
        self._enqueue("o", dict(event), None)

    def _enqueue(self, kind: str, event: Mapping[str, Any], parts: TraceParts | None) -> None:
        # Packing and queueing are one step: a record must never reach the outbox before the
        # definitions another thread's record introduced for the handles it uses.
        with self._lock:
            self._outbox.extend(encode_each(self._packer.message(kind, event, parts)))
            self._outbox_records += 1
            self._submitted += 1
            full = self._outbox_records >= _SHIP_MAX
        if full:
            self._wake.set()

    # -- shipping ------------------------------------------------------------------------------
    def _ship_loop(self) -> None:
        while True:
            self._wake.wait(_SHIP_EVERY_S)
            self._wake.clear()
            stop = self._closing
            self._ship()
            if not self._proc.is_alive() and not self._closing and time.monotonic() >= self._next_restart:
                self._restart()
            if stop:
                return

    def _ship(self) -> None:
        with self._lock:
            if not self._outbox:
                return
            msgs, n = self._outbox, self._outbox_records
            self._outbox, self._outbox_records = [], 0
        blob = join(msgs)
        if n:
            with self._status_cv:
                self._shipped += n
                self._unconfirmed.append((self._shipped, n, blob))
        self._send(blob)

    def _send(self, blob: bytes) -> None:
        try:
            assert self._data is not None
            self._data.send_bytes(blob)
        except (OSError, EOFError, ValueError) as exc:  # the child is gone: the restart resends this batch
            log.error("audit: writer process unreachable (%s)", exc)

    # -- the child -----------------------------------------------------------------------------
    def _start_child(self, *, base: int) -> None:
        """Start a child; its reports count records handled after the first ``base`` ones."""
        parent_data, child_data = self._ctx.Pipe(duplex=False)
        child_status, parent_status = self._ctx.Pipe(duplex=False)
        chain = f"{self._chain_prefix}-{self.restarts}" if self.restarts else self._chain_prefix
        self._proc = self._ctx.Process(
            target=_child_main, name="infermesh-audit-writer", daemon=True,
            args=(self.url, self.settings.model_dump(), chain, parent_data, parent_status,
                  self.settings.writer_nice))
        self._proc.start()
        parent_data.close()
        parent_status.close()
        self._data = child_data
        self._reader = threading.Thread(target=self._read_status, args=(child_status, base), name="audit-status",
                                        daemon=True)
        self._reader.start()

    def _restart(self) -> None:
        """A new child, sent every definition and every batch the old one did not confirm."""
        self.restarts += 1
        # A child that dies before it ever reports (it cannot start at all) is retried with a growing
        # pause, not in a loop; meanwhile the bound applies to what piles up.
        self._failed_starts = 0 if self._status.get("pid") == self._proc.pid else self._failed_starts + 1
        self._next_restart = time.monotonic() + min(30.0, 0.25 * 2 ** self._failed_starts)
        log.error("audit: writer process exited (code %s); restarting it and resending %d unconfirmed batches",
                  self._proc.exitcode, len(self._unconfirmed))
        with self._status_cv:
            batches = list(self._unconfirmed)
            # The first unconfirmed batch may be partly handled: the new child handles all of it again
            # (skipping what is stored), so its count starts where that batch starts.
            base = batches[0][0] - batches[0][1] if batches else self._shipped
            self._confirmed = base
        if self._data is not None:
            self._data.close()  # the dead child's pipe (only this thread writes to it)
        self._start_child(base=base)
        self._send(encode([self._packer.all_definitions(), ("resend", True)]))
        for _, _, blob in batches:
            self._send(blob)
        self._send(encode([("resend", False)]))

    def _read_status(self, conn: Connection, base: int) -> None:
        while True:
            try:
                st = conn.recv()
            except (EOFError, OSError):
                conn.close()
                return
            with self._status_cv:
                self._status = st
                self._confirmed = max(self._confirmed, base + int(st["handled"]))
                while self._unconfirmed and self._unconfirmed[0][0] <= self._confirmed:
                    self._unconfirmed.popleft()
                self._status_cv.notify_all()

    # -- control -------------------------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted record is in PostgreSQL (child queue and spool empty)."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._status_cv:
            while self._confirmed < self._submitted or self._status.get("backlog", True):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._status_cv.wait(min(left, 0.05))
                if self._confirmed >= self._submitted:
                    self._ask_for_status()
        return True

    def _ask_for_status(self) -> None:
        """A fresh status from the child (its spool may have drained since the last one). It goes
        through the outbox: the shipper thread is the pipe's only writer while it runs."""
        with self._lock:
            self._outbox.extend(encode_each([("flush",)]))
        self._wake.set()

    def close(self) -> None:
        """Ship what is left, let the child drain its queue (to PostgreSQL, else the spool), stop it.

        A child that died (before the close or while draining) is replaced first, and sent what it
        had not confirmed: the shipper thread, which would have done that, is stopped by now.
        """
        if self._closing:
            return
        self._closing = True
        self._at_exit.cancel()
        self._wake.set()
        self._shipper.join(max(5.0, self.settings.drain_timeout_s))
        if self._shipper.is_alive():  # blocked sending to a child that stopped reading (wedged): end it,
            log.error("audit: writer process stopped reading; killing it")  # a new one gets what it held
            self._proc.kill()
            self._proc.join(5.0)
            self._shipper.join(10.0)  # the pipe's far end is gone: the send fails and the shipper ends
        self._ship()  # records submitted while the shipper made its last round
        restarts = 0
        while True:
            if not self._proc.is_alive():
                self._join_reader()  # the dead child's last reports: what it did confirm
                if self._unconfirmed_records() and restarts < _CLOSE_RESTARTS:
                    restarts += 1
                    self._restart()
            if not self._stop_child() or not self._unconfirmed_records() or restarts >= _CLOSE_RESTARTS:
                break  # stopped with everything confirmed, or killed (stuck: a new one would be too), or crash loop
        left = self._unconfirmed_records()
        if left:
            log.error("audit: %d records were never confirmed by a writer process (in neither PostgreSQL nor the "
                      "spool): they are lost", left)
        if self._data is not None:
            self._data.close()

    def _stop_child(self) -> bool:
        """Ask the child to drain and exit, and wait for it; False if it had to be killed."""
        killed = False
        if self._proc.is_alive():
            self._send(encode([("close",)]))
            self._proc.join(self.settings.drain_timeout_s + 30.0)
            if self._proc.is_alive():
                log.error("audit: writer process did not stop; killing it")
                self._proc.kill()  # not terminate(): the child ignores SIGTERM
                self._proc.join(5.0)
                killed = True
        self._join_reader()
        return not killed

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(5.0)  # it ends at the child's end of the pipe, after its last report

    def _unconfirmed_records(self) -> int:
        with self._status_cv:
            return self._submitted - self._confirmed

    # -- what /metrics and health read ---------------------------------------------------------
    def _metric(self, name: str) -> float:
        return float(self._status.get("metrics", {}).get(name, 0.0))

    @property
    def db_up(self) -> bool:
        return bool(self._metric("db_up"))

    @property
    def batches_written(self) -> int:
        return int(self._metric("batches_written"))

    @property
    def has_backlog(self) -> bool:
        return bool(self._status.get("spool_backlog", False))

    def metrics(self) -> dict[str, float]:
        """The child's writer metrics, plus the hand-over's own."""
        st = self._status
        out = dict.fromkeys(METRIC_NAMES, 0.0)
        out.update((k, float(v)) for k, v in st.get("metrics", {}).items())
        out.update({"queue_depth": float(self._submitted - self._confirmed), "dropped": float(self.dropped),
                    "refused": float(self.refused), "writer_restarts": float(self.restarts)})
        return out


def _child_main(url: str, settings: dict[str, Any], chain_id: str, data: Connection, status: Connection,
                nice: int) -> None:
    """The writer process: receive records, store their traces as they came, write them in batches.

    The main thread receives, converts and prepares (chains, encodes) each batch; one copy
    thread delivers it (COPY, else spool) while the main thread prepares the next, so the
    writer's CPU work and PostgreSQL's work on the batch before overlap (PostgreSQL is on the
    other core; a COPY waited on it for a quarter of the writer's time). One batch is in flight
    at a time, so batches reach PostgreSQL in chain order, and "handled" counts only delivered
    records. A batch is cut at ``batch_size`` records even inside one message from the parent
    (which carries thousands when decisions come faster than the writer takes them): a whole
    message as one batch left PostgreSQL idle while it was prepared and the writer idle while
    it was copied. The interpreter's switch interval is short so the copy thread, woken from a socket
    wait, does not wait long for the interpreter lock.
    """
    from audit.trace_store import STORED_TRACE, stored_from_packed
    from audit.writer import AuditWriter

    # The parent decides when this process stops (close: drain, then exit; else the pipe's end). A
    # SIGTERM or ^C sent to the whole process group (a service stop, a terminal) would kill it
    # before the parent ships what is left, and the parent would have to start another to drain.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s audit-writer %(levelname)s %(message)s")
    # Batches of thousands of records are alive at once: automatic collections would walk all of
    # them again and again while a batch is built (~15% of the writer's time at a 50,000 threshold).
    # The collector runs between batches instead, when the batch is garbage already: the young
    # generations after every batch, everything every _FULL_EVERY batches (records hold no cycles;
    # this catches any a library makes).
    gc.freeze()
    gc.disable()
    batches = 0
    if nice:  # when CPU is short, decisions go first: the queue and the spool absorb the writer's lag
        os.nice(nice)
    s = AuditSettings(**settings)
    writer = AuditWriter(url, s, chain_id=chain_id, start=False)

    def collect() -> None:
        """The collector's turn, called once nothing of a batch is alive (collecting while one is
        would walk all of it: the cost this schedule avoids)."""
        nonlocal batches
        batches += 1
        gc.collect(2 if batches % _FULL_EVERY == 0 else 1)

    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    copier = ThreadPoolExecutor(1, thread_name_prefix="audit-copy")
    inflight: Future[None] | None = None

    def settle() -> None:
        """Wait for the batch in flight (its exceptions are the writer's to count, not ours)."""
        nonlocal inflight
        if inflight is not None:
            inflight.result()
            inflight = None

    def write(batch: list[tuple[str, Mapping[str, Any]]]) -> None:
        nonlocal inflight
        prepared = writer.prepare(batch)  # while the batch before is being written
        settle()
        inflight = copier.submit(writer.deliver, prepared, len(batch))

    unpacker = Unpacker()
    resent: _ResendFilter | None = None  # between ("resend", True) and ("resend", False): a dead predecessor's batches
    received = 0
    pending: list[tuple[str, Mapping[str, Any]]] = []
    due = 0.0  # when the oldest pending record must be written
    last_report = 0.0

    def report() -> None:
        handled = writer.handled
        status.send({"pid": os.getpid(), "handled": handled, "spool_backlog": writer.has_backlog,
                     "backlog": handled < received or writer.has_backlog, "metrics": writer.metrics()})

    closing = False
    wrote = False  # a batch went to the copy thread since the last collection
    try:
        while not closing:
            now = time.monotonic()
            wait = min(0.05, max(0.0, due - now)) if pending else 0.05
            while data.poll(wait):
                wait = 0.0
                try:
                    msgs = decode_lazy(data.recv_bytes())
                except EOFError:  # the service is gone: write what we have and stop
                    closing = True
                    break
                # Of a dead predecessor's batches, skip what it stored already, in PostgreSQL or the
                # spool (before chaining, so chains stay gapless); one lookup per batch.
                if ["resend", True] in msgs:
                    settle()  # the copy thread may be replaying the spool: read it at rest
                    resent = _ResendFilter(url, s, writer.spool)
                known = resent.known(msgs) if resent is not None else set()
                for msg in msgs:
                    if msg[0] == "resend":
                        if not msg[1]:
                            resent = None
                        continue
                    if msg[0] == "close":
                        closing = True
                        continue
                    if msg[0] == "flush":
                        last_report = 0.0
                        continue
                    if msg[0] != "r":
                        unpacker.feed(msg)  # definitions
                        continue
                    _, kind, event, packed = msg
                    received += 1
                    if known and _record_key(kind, event) in known:
                        if pending:  # keep "handled" in order: write what precedes it first
                            write(pending)
                            pending = []
                        settle()
                        # Counted through the writer: behind any batch it holds in memory, so that
                        # "handled" never confirms records the writer has not stored yet.
                        writer.skip(1)
                        continue
                    if packed is not None:  # stored as it came, with the shared objects put in
                        try:
                            event = {**event, STORED_TRACE: stored_from_packed(unpacker.stored_parts(packed),
                                                                               writer.masker)}
                        except Exception as exc:  # keep the decision and say what was lost; never crash-loop
                            log.exception("audit: the trace of decision %s could not be stored",
                                          event.get("decision_id"))
                            event = {**event, "trace": {"error": f"the trace could not be stored: {exc!r}"}}
                    if not pending:
                        due = time.monotonic() + s.flush_interval_s
                    pending.append((kind, event))
                    if len(pending) >= s.batch_size:  # a message may carry many batches' worth
                        write(pending)
                        pending = []
                        wrote = True
                if wrote or closing:
                    break
            if pending and (time.monotonic() >= due or closing):
                write(pending)
                pending = []
                wrote = True
            if wrote:
                wrote = False
                last_report = 0.0
                collect()
            elif inflight is not None:  # the copy thread owns the connection and the spool
                if not data.poll(0):  # nothing to prepare meanwhile: see it through
                    settle()
                    last_report = 0.0
            elif writer.has_backlog:
                writer.process([])  # replay (and retry what is held in memory) while idle
                if not pending:  # an outage's reconnect attempts must not pile up garbage either
                    collect()
            if time.monotonic() - last_report >= 0.05:
                report()
                last_report = time.monotonic()
    finally:
        settle()
        copier.shutdown()
        if pending:
            writer.process(pending)
        writer.finish()
        writer.close()
        report()
        status.close()


# A record's identity as stored: ("d", decision_id, decided_at_us), or ("o", *outcome_content).
_Key = tuple[Any, ...]
_OUTCOME_CONTENT = ", ".join(OUTCOME_CONTENT_COLUMNS)


def _record_key(kind: str, event: Mapping[str, Any]) -> _Key | None:
    """What identifies a record as stored: a decision by its id and time (the table's key), an
    outcome by its content, so that a second, different outcome of a decision is not taken for the
    first (it is kept, in ``outcome_conflicts``). ``None`` for a malformed record (the writer
    rejects it)."""
    try:
        if kind == "d":
            e = DecisionEventV1.from_mapping(event)
            return ("d", e.decision_id, e.decided_at_us)
        return ("o", *outcome_content(OutcomeEventV1.from_mapping(event)))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


def _row_key(kind: str, row: Any) -> _Key:
    """:func:`_record_key` of a prepared row (as spooled: a decision row starts ``decision_id,
    decided_at_us``; an outcome row starts with its content, see :func:`~audit.codec.outcome_row`)."""
    return ("d", row[0], row[1]) if kind == "d" else ("o", *row[:len(OUTCOME_CONTENT_COLUMNS)])


def _spooled_keys(spool: Spool) -> set[_Key]:
    """The keys of every record in the spool's segments (the quarantine aside): a dead child's
    spooled batches, which the replay will store under that child's chain."""
    keys: set[_Key] = set()
    for seg in spool.segments():
        try:
            batches = spool.read_segment(seg)
        except FileNotFoundError:  # replayed meanwhile: in PostgreSQL, which is asked after this
            continue
        for batch in batches:
            for kind in ("d", "o"):
                keys.update(_row_key(kind, row) for row in batch.get(kind) or ())
    return keys


class _ResendFilter:
    """Which records of a dead predecessor's resent batches are stored already: in PostgreSQL, or
    in the spool (batches it spooled while PostgreSQL was down and died before confirming; chained
    again, their replayed copies would leave a hole in this chain and store an outcome twice).

    The spool is read once, at the start of the resend (a record replayed from it later is in
    PostgreSQL before its segment goes); PostgreSQL is asked per batch. If PostgreSQL cannot be
    reached, the lookup retries for up to ``drain_timeout_s``; then (for the rest of this resend)
    only the spool is known, loudly: records the dead child stored in PostgreSQL are stored again.
    """

    def __init__(self, url: str, settings: AuditSettings, spool: Spool) -> None:
        self.url = url
        self.settings = settings
        self.spooled = _spooled_keys(spool)
        self.deadline = time.monotonic() + settings.drain_timeout_s
        self.db_given_up = False

    def known(self, msgs: list[Any]) -> set[_Key]:
        """The keys of ``msgs``' records that are stored already."""
        keys = {k for m in msgs if m[0] == "r" and (k := _record_key(m[1], m[2])) is not None}
        if not keys:
            return set()
        stored = None if self.db_given_up else self._stored(keys)
        if stored is None:
            if not self.db_given_up:
                log.error("audit: PostgreSQL unreachable for %.0f s while checking the records a dead writer "
                          "process left unconfirmed; skipping only those in the spool: any it stored in "
                          "PostgreSQL are stored a second time under this chain", self.settings.drain_timeout_s)
                self.db_given_up = True
            stored = set()
        return keys & (stored | self.spooled)

    def _stored(self, keys: set[_Key]) -> set[_Key] | None:
        """The keys among ``keys`` PostgreSQL holds, retried until the deadline; None if unreachable."""
        d_ids = list({k[1] for k in keys if k[0] == "d"})
        o_ids = list({k[1] for k in keys if k[0] == "o"})
        cols = _OUTCOME_CONTENT
        retrying = False
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=self.settings.connect_timeout_s) as conn:
                    found: set[_Key] = {("d", r[0], to_us(r[1])) for r in conn.execute(
                        "SELECT decision_id, decided_at FROM decision_events WHERE decision_id = ANY(%s)",
                        (d_ids,))}
                    found.update(("o", *r[:-1], to_us(r[-1])) for r in conn.execute(  # reported_at last
                        f"SELECT {cols} FROM outcomes WHERE decision_id = ANY(%s) "
                        f"UNION ALL SELECT {cols} FROM outcome_conflicts WHERE decision_id = ANY(%s)",
                        (o_ids, o_ids)))
                    return found
            except psycopg.Error as exc:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    log.warning("audit: could not check resent records (%s)", exc)
                    return None
                if not retrying:
                    log.warning("audit: could not check resent records (%s); retrying for up to %.0f s", exc, left)
                    retrying = True
                # Not an empty answer: each record chained again whose first copy is stored is a
                # second copy under this chain (an outcome twice, in outcome_conflicts).
                time.sleep(min(self.settings.retry_interval_s, left))
