"""Learner state across restarts and replicas, through PostgreSQL.

* :meth:`LearnerSync.snapshot` saves the learned state by learner name and version;
  :meth:`LearnerSync.restore` loads the newest snapshot, folds in replica deltas newer than it,
  and replays from the audit log the outcomes reported after the snapshot, so no learning is
  lost on restart.
* :meth:`LearnerSync.sync` merges replicas: each writes the increments of its linear model's
  sufficient statistics made since its last sync (numbered per replica) and adds every other
  replica's new increments. Since ``A`` and ``b`` are sums, every replica converges to the model
  trained on all replicas' outcomes. :meth:`LearnerSync.start` runs it on an interval.

Replay is exact for a single replica. With several replicas, the increments of a replica that
crashed between syncs (at most one interval of its outcomes) are lost unless ``replay=True`` is
used, which would double-count the other replicas' outcomes of that window; the default for a
replica (``replica`` not empty) is therefore not to replay.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from decision.contracts import Learner
from learners._linear import LinearLearner
from learners.store import LearnerStore, trace_arms

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
        This process's replica id ("" for a single instance).
    clock
        Wall clock (seconds since the epoch).
    """

    def __init__(self, learner: Learner, store: LearnerStore, feature_names: Sequence[str], *, replica: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.learner = learner
        self.store = store
        self.feature_names = tuple(feature_names)
        self.replica = replica
        self.clock = clock
        self._marks: dict[str, int] = {}  # replica -> last delta seq folded in (ours included)
        self._seq = 0
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
        """Newest snapshot, then newer deltas, then (optionally) the audit log's newer outcomes."""
        name, version = self.key
        with self._sync_lock:
            snap = self.store.latest_snapshot(learner=name, version=version)
            watermark = 0.0
            if snap is not None:
                self.learner.load_state(snap.state)  # type: ignore[attr-defined]
                self._marks = dict(snap.delta_marks)
                watermark = snap.watermark
            n_deltas = 0
            do_replay = replay if replay is not None else not self.replica
            lin = self._linear()
            if lin is not None:
                # Replaying the log re-learns this instance's own outcomes since the snapshot, which its
                # own deltas already hold: fold in only the other replicas' deltas then, or they count twice.
                for d in self.store.read_deltas(learner=name, version=version, after=self._marks,
                                                exclude_replica=self.replica if do_replay else None):
                    lin.merge(d.dA, d.db, d.dn)
                    self._marks[d.replica] = d.seq
                    n_deltas += 1
                self._seq = self.store.last_delta_seq(learner=name, version=version, replica=self.replica)
                self._marks[self.replica] = self._seq
            replayed = 0
            if do_replay:
                replayed = self._replay(watermark)
        return RestoreReport(None if snap is None else snap.id, n_deltas, replayed)

    def _replay(self, after: float) -> int:
        # The audit log names the learner as name@version (without the layout fingerprint).
        n = 0
        label = f"{self.learner.name}@{self.learner.version}"
        for rec in self.store.outcomes_after(learner=label, after=after):
            arms = trace_arms(rec.trace, self.feature_names)
            if arms.chosen < 0 or rec.reward is None:
                continue
            self.learner.update(tuple(arms.features[arms.chosen].tolist()), rec.reward)
            n += 1
        return n

    def snapshot(self) -> int:
        """Save the learned state now (after pushing this replica's pending delta)."""
        name, version = self.key
        with self._sync_lock:
            self._push()
            now = self.clock()
            state: dict[str, Any] = self.learner.state_dict()  # type: ignore[attr-defined]
            lin = self._linear()
            return self.store.save_snapshot(learner=name, version=version, replica=self.replica, watermark=now,
                                            n_updates=lin.n_updates if lin else 0, delta_marks=self._marks,
                                            state=state)

    # -- replicas --
    def _push(self) -> int:
        lin = self._linear()
        if lin is None:
            return 0
        dA, db, dn = lin.take_delta()
        if dn == 0 and not np.any(dA):
            return 0
        name, version = self.key
        self._seq += 1
        self.store.write_delta(learner=name, version=version, replica=self.replica, seq=self._seq, dA=dA, db=db,
                               dn=dn)
        self._marks[self.replica] = self._seq
        return dn

    def sync(self) -> SyncReport:
        """Write this replica's increments, then add every other replica's new ones."""
        lin = self._linear()
        if lin is None:
            return SyncReport(0, 0)
        name, version = self.key
        with self._sync_lock:
            pushed = self._push()
            merged = 0
            for d in self.store.read_deltas(learner=name, version=version, after=self._marks,
                                            exclude_replica=self.replica):
                lin.merge(d.dA, d.db, d.dn)
                self._marks[d.replica] = d.seq
                merged += d.dn
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
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if final_snapshot:
            self.snapshot()
