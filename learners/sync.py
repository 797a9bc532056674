"""Learner state across restarts and replicas, through PostgreSQL.

* :meth:`LearnerSync.snapshot` saves the learned state by learner name and version;
  :meth:`LearnerSync.restore` loads the newest snapshot, folds in replica deltas newer than it,
  and replays from the audit log the outcomes reported after the snapshot, so no learning is
  lost on restart.
* :meth:`LearnerSync.sync` merges replicas: each writes the increments of its linear model's
  sufficient statistics made since its last sync (numbered per replica) and adds every other
  replica's new increments. Since ``A`` and ``b`` are sums, every replica converges to the model
  trained on all replicas' outcomes. :meth:`LearnerSync.start` runs it on an interval. A delta
  whose write fails stays in an outbox and is resent with the same seq (the insert is idempotent),
  so a failed or ambiguous write neither loses nor doubles it.

Replay is exact for a single replica. With several replicas, the increments of a replica that
crashed between syncs (at most one interval of its outcomes) are lost unless ``replay=True`` is
used, which would double-count the other replicas' outcomes of that window; the default for a
replica (``replica`` not empty) is therefore not to replay. Nor does a single instance replay a
history that is not only its own (a snapshot or newer deltas another replica wrote, e.g. after
``serve --workers N`` ran on the same database): it takes their deltas instead.

A replica id (the single instance's "" included) belongs to one live process at a time. Deltas
are keyed by it, so two processes under one id (``learner.replica`` in a config every pod reads)
would take the same seqs and one's learning would be dropped. Every write, and :meth:`LearnerSync.restore`
first of all, holds a PostgreSQL session advisory lock on the id (:meth:`LearnerStore.claim_replica`):
a second process is refused with :class:`learners.store.ReplicaInUse`, which says how to set the
id. The lock ends with its session, so a successor can start once the holder stopped or died.
Learners that write no deltas (``least-ttft``) take no id: their snapshots are whole states.

A process whose session was lost takes its id back on a new one. Another process may have held
the id meanwhile and written deltas under it: before writing again, the process merges those as
another replica's and numbers its own after them (:meth:`LearnerSync.sync` does this by itself),
so neither's learning is lost or counted twice. A session the server still keeps after a
connection broke on the client's side only is this store's own, and is ended to take the id back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from decision.contracts import Learner
from decision.trace_format import trace_arms
from learners._linear import FloatArray, LinearLearner
from learners.store import DamagedSnapshot, Delta, LearnerStore, ReplicaRetaken, Snapshot, feature_names_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestoreReport:
    snapshot_id: int | None
    deltas: int
    replayed: int


@dataclass(frozen=True, slots=True)
class SyncReport:
    pushed: int  # updates this replica contributed
    merged: int  # updates merged from other replicas


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A delta taken from the learner and not yet known to be stored (resent as is, same seq)."""

    seq: int
    dA: FloatArray
    db: FloatArray
    dn: int


class LearnerSync:
    """Snapshots, restore with replay, and replica merging for one learner.

    Parameters
    ----------
    learner
        The learner (linear learners merge across replicas; any learner with ``state_dict`` /
        ``load_state`` snapshots).
    store
        The repository.
    feature_names
        The feature builder's names, to read the replayed features from traces in order.
    replica
        This process's replica id ("" for a single instance): one live process's only, held from
        :meth:`restore` or the first write until :meth:`stop` or the end of the store's session.
    clock
        Wall clock (seconds since the epoch); the one that stamps the audit log's ``reported_at``.
    barrier
        Held while a snapshot takes its state and watermark (optional): the lock under which the
        engine stamps an outcome's ``reported_at`` and learns it, so an outcome is in a snapshot
        exactly when its ``reported_at`` is at or before the watermark (see :meth:`snapshot`).
    """

    def __init__(self, learner: Learner, store: LearnerStore, feature_names: Sequence[str], *, replica: str = "",
                 clock: Callable[[], float] = time.time,
                 barrier: AbstractContextManager[Any] | None = None) -> None:
        self.learner = learner
        self.store = store
        self.feature_names = tuple(feature_names)
        self.replica = replica
        self.clock = clock
        self.barrier = barrier
        self._marks: dict[str, int] = {}  # replica -> last delta seq folded in (ours included)
        self._seq = 0  # last seq of this replica known to be stored
        self._outbox: _Outgoing | None = None
        self._taken_back = 0  # updates another process wrote under our id that _take_back merged
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(learner name, version + feature-layout fingerprint) under which state is stored.

        The fingerprint keeps a snapshot or delta of one feature layout from ever being loaded
        into a learner built for another (a changed feature builder starts from its prior instead
        of failing, or worse, mixing coordinates).
        """
        layout = hashlib.sha256("\x1f".join(self.feature_names).encode()).hexdigest()[:10]
        return self.learner.name, f"{self.learner.version}+f{len(self.feature_names)}-{layout}"

    def _linear(self) -> LinearLearner | None:
        return self.learner if isinstance(self.learner, LinearLearner) else None

    # -- restart --
    def restore(self, *, replay: bool | None = None) -> RestoreReport:
        """Newest snapshot, then newer deltas, then (optionally) the audit log's newer outcomes.

        It first claims this replica id (:meth:`LearnerStore.claim_replica`), so a process started
        under an id another live process holds is refused before it loads anything. A learner
        that writes no deltas claims none.

        Raises
        ------
        learners.store.ReplicaInUse
            Another live process holds this replica id.
        """
        name, version = self.key
        lin = self._linear()
        if lin is not None:  # only deltas are keyed by replica and seq: a whole state has nothing to collide on
            self.store.claim_replica(learner=name, version=version, replica=self.replica)
        with self._sync_lock:
            self._outbox = None  # the model it came from is being replaced
            own_last = self.store.last_delta_seq(learner=name, version=version, replica=self.replica) if lin else 0
            snap = self._load_newest_good(lin, own_last)
            watermark = 0.0
            if snap is not None:
                self._marks = dict(snap.delta_marks)
                watermark = snap.watermark
            n_deltas = 0
            # Deltas come in pages (LearnerStore.read_deltas); the first page of the other replicas' says
            # whether any newer than the snapshot exist, before any of ours is folded in or skipped.
            page = self.store.read_deltas(learner=name, version=version, after=self._marks,
                                          exclude_replica=self.replica) if lin else []
            # The log holds every replica's outcomes; replaying it on top of another replica's state or
            # deltas would learn theirs twice. A single instance replays only a history that is its own.
            foreign = (snap is not None and snap.replica != self.replica) or bool(page)
            do_replay = replay if replay is not None else not self.replica and not foreign
            if lin is not None:
                own_seq = own_last
                while True:  # the first page (the others') may be empty while ours are not
                    for d in page:
                        if d.replica == self.replica:
                            own_seq = max(own_seq, d.seq)
                            if do_replay:
                                # Replaying the log re-learns this instance's own outcomes since the snapshot,
                                # which its own deltas already hold: they are passed, not folded in, or they
                                # would count twice (the mark moves past them, so the next page does too).
                                self._marks[self.replica] = d.seq
                                continue
                        self._merge(lin, d.replica, d.seq, d.dA, d.db, d.dn)
                        n_deltas += 1
                    page = self.store.read_deltas(learner=name, version=version, after=self._marks)
                    if not page:
                        break
                # Past every delta of ours read here too (one written in a lost session's window is in them).
                self._seq = own_seq
                self._marks[self.replica] = self._seq
                self._take_back()  # the id is settled on this session: writes under it may go on
            replayed = 0
            if do_replay:
                replayed = self._replay(watermark)
        if do_replay and replayed and lin is not None:
            self._settle_replay(lin)
        return RestoreReport(None if snap is None else snap.id, n_deltas, replayed)

    def _settle_replay(self, lin: LinearLearner) -> None:
        """After a replay the state is whole, but the replayed increments are outcomes this instance's
        own deltas after the snapshot may already hold: pushed as a new delta, they would count twice
        for whoever merges deltas later (a restore without replay, workers started on this history).
        Save the state now, with marks past every delta, and never push those increments."""
        lin.take_delta()
        try:
            self.snapshot()
        except Exception as exc:  # learning goes on; the next periodic snapshot closes the window
            log.warning("learner snapshot after a replay failed: %s", exc)

    def _load_newest_good(self, lin: LinearLearner | None, own_last: int) -> Snapshot | None:
        """Load the newest snapshot that loads; a damaged one is logged and the next older one tried
        (its delta marks still make the deltas merged after it exact), so one bad row cannot stop
        every replica from starting. None: no snapshot loads (the learner keeps its fresh state)."""
        name, version = self.key
        below: int | None = None
        while True:
            try:
                snap = self.store.latest_snapshot(learner=name, version=version, below_id=below)
            except DamagedSnapshot as exc:  # its marks or state are not JSON objects of the right kind
                log.error("learner snapshot %d of %s@%s cannot be loaded (%s); trying the one before it",
                          exc.snapshot_id, name, version, exc)
                below = exc.snapshot_id
                continue
            if snap is None:
                return None
            try:
                if lin is not None:
                    own = snap.replica == self.replica
                    # A pending delta in the state is this replica's to push only if the snapshot is its own
                    # and it pushed nothing since (a push after it already carried that delta; older
                    # snapshots held one). Another replica's generator state would repeat its draws.
                    lin.load_state(snap.state, keep_delta=own and own_last <= snap.delta_marks.get(self.replica, 0),
                                   reseed=None if own else self._stream())
                else:
                    self.learner.load_state(snap.state)  # type: ignore[attr-defined]
                return snap
            except Exception as exc:  # whatever a stored state makes a learner raise, the row is what is bad
                log.error("learner snapshot %d of %s@%s cannot be loaded (%s: %s); trying the one before it",
                          snap.id, name, version, type(exc).__name__, exc)
                below = snap.id

    def _stream(self) -> int:
        """This replica's random stream id (a snapshot's generator state is reseeded with it)."""
        return int.from_bytes(hashlib.sha256(self.replica.encode()).digest()[:8], "little")

    def _merge(self, lin: LinearLearner, replica: str, seq: int, dA: FloatArray, db: FloatArray, dn: int) -> bool:
        """Fold in one delta; a corrupt one (wrong shape, not finite) is skipped, not retried forever."""
        self._marks[replica] = seq
        try:
            lin.merge(dA, db, dn)
        except ValueError:
            log.exception("learner delta %s/%d skipped", replica, seq)
            return False
        return True

    def _replay(self, after: float) -> int:
        # The audit log names the learner as name@version (without the layout fingerprint).
        n = 0
        label = f"{self.learner.name}@{self.learner.version}"
        names = tuple(self.feature_names)
        foreign = 0
        for rec in self.store.outcomes_after(learner=label, after=after):
            if rec.reward is None:
                continue
            if feature_names_of(rec.trace) != names:  # another feature layout: its columns are not these
                foreign += 1
                continue
            arms = trace_arms(rec.trace, self.feature_names)
            if arms.chosen < 0:
                continue
            try:
                self.learner.update(tuple(arms.features[arms.chosen].tolist()), rec.reward)
            except ValueError:  # one unlearnable record (overflowing features) must not block every restart
                log.exception("replay: outcome of %s skipped", rec.decision_id)
                continue
            n += 1
        if foreign:
            log.info("replay: %d outcomes of decisions made with another feature layout left out", foreign)
        return n

    def snapshot(self) -> int:
        """Save the learned state now, with every update it holds pushed as this replica's delta first.

        The watermark (the audit-log time after which :meth:`restore` replays outcomes) is read in
        the same critical section of the learner's update lock that takes the state: every update
        in the state finished before the watermark was read, and every later one is not in it.
        An outcome is therefore counted once on restore provided its ``reported_at`` was read
        before it was learnt and, to close the gap between the two, both happen under ``barrier``
        (which this holds while taking the state).
        """
        with self._sync_lock:
            try:
                return self._snapshot()
            except ReplicaRetaken:
                # The id was lost and taken back after the state was taken: what another process wrote
                # under it meanwhile is merged, and the state taken again with it.
                self._take_back()
                return self._snapshot()

    def _snapshot(self) -> int:
        name, version = self.key
        self._flush()  # a delta left over by a failed push goes first, in order
        lin = self._linear()
        with self.barrier if self.barrier is not None else contextlib.nullcontext():
            if lin is not None:
                cp = lin.checkpoint(self.clock)
                state, watermark, n_updates = cp.state, cp.watermark, cp.n_updates
                self._stage(cp.dA, cp.db, cp.dn)
            else:
                watermark = self.clock()
                state = self.learner.state_dict()  # type: ignore[attr-defined]
                n_updates = 0
            if self.barrier is not None:
                _past(self.clock, watermark)
        # The state holds no pending delta: what it took is written as this replica's next seq
        # before the snapshot (whose marks include it), so a restore neither loses nor repeats it.
        self._flush()
        return self.store.save_snapshot(learner=name, version=version, replica=self.replica,
                                        watermark=watermark, n_updates=n_updates, delta_marks=self._marks,
                                        state=state, hold=lin is not None)

    # -- replicas --
    def _stage(self, dA: FloatArray, db: FloatArray, dn: int) -> None:
        """Put a delta just taken from the learner in the outbox, numbered after the last one."""
        assert self._outbox is None
        if dn == 0 and not np.any(dA) and not np.any(db):
            return
        self._outbox = _Outgoing(self._seq + 1, dA, db, dn)

    def _flush(self) -> int:
        """Write the outbox's delta (same seq on every retry); the marks move only once it is stored."""
        out = self._outbox
        if out is None:
            return 0
        name, version = self.key
        try:
            self.store.write_delta(learner=name, version=version, replica=self.replica, seq=out.seq, dA=out.dA,
                                   db=out.db, dn=out.dn)
        except ReplicaRetaken:
            self._take_back()  # finds it stored, or numbers it after what another process wrote
            if self._outbox is None:
                return out.dn
            out = self._outbox
            self.store.write_delta(learner=name, version=version, replica=self.replica, seq=out.seq, dA=out.dA,
                                   db=out.db, dn=out.dn)
        self._outbox = None
        self._seq = out.seq
        self._marks[self.replica] = out.seq
        return out.dn

    def _take_back(self) -> None:
        """Catch up with what is stored under this replica's id past the last seq known to be ours.

        After this process's session was lost and the id taken back on a new one, those rows are
        either the delta it was sending when the session broke (committed, the answer lost: the
        outbox, stored) or another process's, which held the id meanwhile: merged as another
        replica's deltas would be, so this process has that learning too, and the outbox is
        numbered after them, so its learning is not dropped as a conflict. Call with the sync lock held.

        The rows come in pages (:meth:`LearnerStore.take_back`), each merged before the next is read,
        until one comes empty: only then may writes under the id go on.
        """
        lin = self._linear()
        if lin is None:
            return
        name, version = self.key
        foreign = _Foreign()
        while page := self.store.take_back(learner=name, version=version, replica=self.replica, after=self._seq):
            for d in page:
                out = self._outbox
                if out is not None and d.seq == out.seq and _same(d, out):
                    self._outbox = None  # ours: the write went through though the session broke before saying so
                    self._seq = self._marks[self.replica] = d.seq
                    continue
                if self._merge(lin, self.replica, d.seq, d.dA, d.db, d.dn):
                    self._taken_back += d.dn
                self._seq = d.seq  # the next page starts past it
                foreign.add(d)
        if self._outbox is not None and self._outbox.seq <= self._seq:
            self._outbox = dataclasses.replace(self._outbox, seq=self._seq + 1)
        if foreign.deltas:
            log.warning("learner replica %r of %s: while this process's database session was lost, another process "
                        "held its id and wrote %d deltas (%d updates, seqs %d-%d) under it; merged them as another "
                        "replica's, and this process's deltas go on from seq %d. Give each process its own "
                        "INFERMESH_REPLICA.", self.replica, name, foreign.deltas, foreign.updates,
                        foreign.first_seq, foreign.last_seq, self._seq + 1)

    def _push(self) -> int:
        """Write a delta left over by a failed push, then the increments made since the last take.

        ``take_delta`` resets the learner's increments, so until a write succeeds they exist only
        in the outbox: a failure keeps them there for the next push (nothing is lost for the other
        replicas), and the insert is idempotent on its seq (nothing is counted twice).
        """
        lin = self._linear()
        if lin is None:
            return 0
        pushed = self._flush()
        self._stage(*lin.take_delta())
        return pushed + self._flush()

    def sync(self) -> SyncReport:
        """Write this replica's increments, then add every other replica's new ones."""
        lin = self._linear()
        if lin is None:
            return SyncReport(0, 0)
        name, version = self.key
        with self._sync_lock:
            self._taken_back = 0
            pushed = self._push()
            merged = self._taken_back  # another process's learning under our id, merged if the id was taken back
            # Page by page, each merged (its marks advanced) before the next is read: a backlog too large
            # for one statement is caught up over several, and a failed page keeps what came before it.
            while page := self.store.read_deltas(learner=name, version=version, after=self._marks,
                                                 exclude_replica=self.replica):
                for d in page:
                    if self._merge(lin, d.replica, d.seq, d.dA, d.db, d.dn):
                        merged += d.dn
                if self._stop.is_set():  # the rest waits for the next process; stop() is not held up by it
                    break
        return SyncReport(pushed, merged)

    def start(self, interval_s: float = 5.0, snapshot_every_s: float = 60.0) -> None:
        """Sync every ``interval_s`` and snapshot every ``snapshot_every_s`` in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            last_snap = time.monotonic()
            while not self._stop.wait(interval_s):
                try:
                    self.sync()
                    if time.monotonic() - last_snap >= snapshot_every_s:
                        self.snapshot()
                        last_snap = time.monotonic()
                except Exception:  # keep learning locally; the next interval retries
                    log.exception("learner sync failed")

        self._thread = threading.Thread(target=loop, name=f"learner-sync-{self.learner.name}", daemon=True)
        self._thread.start()

    def stop(self, *, final_snapshot: bool = True) -> None:
        """Stop the sync thread, save a last snapshot, and give the replica id back to a successor."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        try:
            if final_snapshot:
                self.snapshot()
        finally:
            name, version = self.key
            self.store.release_replica(learner=name, version=version, replica=self.replica)


@dataclass(slots=True)
class _Foreign:
    """What :meth:`LearnerSync._take_back` merged of another process's deltas under this replica's id,
    for its one log line (counts, not the deltas: those may be many pages)."""

    deltas: int = 0
    updates: int = 0
    first_seq: int = 0
    last_seq: int = 0

    def add(self, d: Delta) -> None:
        if not self.deltas:
            self.first_seq = d.seq
        self.deltas += 1
        self.updates += d.dn
        self.last_seq = d.seq


def _same(stored: Delta, out: _Outgoing) -> bool:
    """Whether a stored delta is the outbox's, compared as :meth:`LearnerStore.write_delta` stores it."""
    def raw(x: FloatArray) -> bytes:
        return np.ascontiguousarray(x, dtype="<f8").tobytes()

    return (stored.dn, stored.dA.shape, stored.db.shape, raw(stored.dA), raw(stored.db)) == (
        out.dn, out.dA.shape, out.db.shape, raw(out.dA), raw(out.db))


def _past(clock: Callable[[], float], t: float) -> None:
    """Wait (at most 5 ms) for ``clock`` to pass ``t`` by 2 us: the log stores times to the microsecond, so a
    ``reported_at`` stamped after the watermark must not round to the watermark itself."""
    deadline = time.monotonic() + 0.005
    while clock() < t + 2e-6 and time.monotonic() < deadline:
        pass
