"""A learner replica id is one live process's: a second one under it is refused, not silently merged away."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest

from learners.features import FEATURE_NAMES
from learners.least_ttft import LeastExpectedTtft
from learners.linucb import LinUCB
from learners.store import DeltaConflict, LearnerStore, ReplicaInUse
from learners.sync import LearnerSync
from tests.conftest import ROOT
from tests.pg_proxy import PgProxy
from tests.test_learners_support import migrate

D = len(FEATURE_NAMES)


def _learn(learner: LinUCB, n: int, x: float) -> None:
    for _ in range(n):
        learner.update(tuple(np.full(D, x)), 1.0)


def _restored_updates(url: str) -> int:
    """What a new replica restores from the database (snapshots and deltas, no replay)."""
    fresh = LinUCB(D, seed=9)
    store = LearnerStore(url)
    try:
        LearnerSync(fresh, store, FEATURE_NAMES, replica="newcomer").restore(replay=False)
    finally:
        store.close()
    return fresh.n_updates


def test_a_second_live_process_under_one_replica_id_is_refused_at_start_up(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    first, second = LearnerStore(fresh_pg_url), LearnerStore(fresh_pg_url)  # two processes' sessions
    try:
        LearnerSync(LinUCB(D, seed=1), first, FEATURE_NAMES, replica="prod-w0").restore()
        with pytest.raises(ReplicaInUse) as refused:
            LearnerSync(LinUCB(D, seed=2), second, FEATURE_NAMES, replica="prod-w0").restore()
        message = str(refused.value)
        assert "'prod-w0'" in message and "INFERMESH_REPLICA" in message and "learner.replica" in message
        assert "backend pid" in message  # names the session that holds it
        assert isinstance(refused.value, ValueError)  # `serve` reports it as a config it cannot start with
    finally:
        first.close()
        second.close()


def test_the_single_instance_id_is_one_process_s_too(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    first, second = LearnerStore(fresh_pg_url), LearnerStore(fresh_pg_url)
    try:
        LearnerSync(LinUCB(D, seed=1), first, FEATURE_NAMES).restore()
        with pytest.raises(ReplicaInUse, match=r"single instance .*INFERMESH_REPLICA"):
            LearnerSync(LinUCB(D, seed=2), second, FEATURE_NAMES).restore()
    finally:
        first.close()
        second.close()


def test_a_clashing_sync_pushes_nothing_and_reports_nothing_pushed(fresh_pg_url: str) -> None:
    """The reviewer's run: two processes as prod-w0; the second's sync said pushed=7 and lost them."""
    migrate(fresh_pg_url)
    p1, p2 = LinUCB(D, seed=1), LinUCB(D, seed=2)
    s1 = LearnerSync(p1, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="prod-w0")
    s2 = LearnerSync(p2, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="prod-w0")
    _learn(p1, 5, 0.1)
    _learn(p2, 7, 0.2)
    assert s1.sync().pushed == 5
    with pytest.raises(ReplicaInUse, match="'prod-w0'"):
        s2.sync()
    assert _restored_updates(fresh_pg_url) == 5  # and nothing claimed to be stored that was not


def test_distinct_replica_ids_merge_as_before(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    p1, p2 = LinUCB(D, seed=1), LinUCB(D, seed=2)
    s1 = LearnerSync(p1, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="pod-1-w0")
    s2 = LearnerSync(p2, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="pod-2-w0")
    s1.restore()
    s2.restore()
    _learn(p1, 5, 0.1)
    _learn(p2, 7, 0.2)
    assert s1.sync().pushed == 5
    r2 = s2.sync()
    assert (r2.pushed, r2.merged, p2.n_updates) == (7, 5, 12)
    assert s1.sync().merged == 7 and p1.n_updates == 12
    assert _restored_updates(fresh_pg_url) == 12


def test_a_replica_stopped_gives_its_id_to_its_successor(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    old_store = LearnerStore(fresh_pg_url)
    try:
        old = LinUCB(D, seed=1)
        old_sync = LearnerSync(old, old_store, FEATURE_NAMES, replica="pod-a")
        old_sync.restore()
        _learn(old, 4, 0.1)
        old_sync.stop(final_snapshot=True)  # its session stays open: the release is explicit
        new = LinUCB(D, seed=1)
        new_store = LearnerStore(fresh_pg_url)
        try:
            LearnerSync(new, new_store, FEATURE_NAMES, replica="pod-a").restore()
            assert new.n_updates == 4
        finally:
            new_store.close()
    finally:
        old_store.close()


def test_a_replica_whose_process_died_without_releasing_can_start_again(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    store = LearnerStore(fresh_pg_url)
    name, version = LearnerSync(LinUCB(D, seed=1), store, FEATURE_NAMES, replica="pod-a").key
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from learners.store import LearnerStore\n"
         "store = LearnerStore(sys.argv[1])  # referenced: its session lives until the kill\n"
         "store.claim_replica(learner=sys.argv[2], version=sys.argv[3], replica='pod-a')\n"
         "print('held', flush=True)\n"
         "time.sleep(120)\n", fresh_pg_url, name, version],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ReplicaInUse):
            LearnerSync(LinUCB(D, seed=1), store, FEATURE_NAMES, replica="pod-a").restore()
        holder.send_signal(signal.SIGKILL)  # no release, no goodbye to the server
        holder.wait(10)
        deadline = time.monotonic() + 15.0
        while True:  # the server ends the dead client's session as soon as it sees the socket close
            try:
                LearnerSync(LinUCB(D, seed=1), store, FEATURE_NAMES, replica="pod-a").restore()
                break
            except ReplicaInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        store.close()
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def _end_every_session(url: str) -> None:
    """What a PostgreSQL restart or a dropped connection does to every session of the test database."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE datname = current_database() AND pid <> pg_backend_pid()")


def test_after_a_lost_session_the_id_is_held_again_before_anything_is_written(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    sa = LearnerSync(a, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="pod-a")
    sa.restore()
    _end_every_session(fresh_pg_url)  # the lock went with the session
    _learn(a, 3, 0.1)
    with pytest.raises(psycopg.OperationalError):
        sa.sync()  # the broken connection is found out; the delta stays in the outbox
    # Meanwhile a second process under the same id starts, and is refused only while it is held.
    taker_store = LearnerStore(fresh_pg_url)
    taker = LearnerSync(LinUCB(D, seed=2), taker_store, FEATURE_NAMES, replica="pod-a")
    taker.restore()
    with pytest.raises(ReplicaInUse, match="session was lost"):
        sa.sync()  # reconnected, but the id is another's now: nothing is written
    assert _restored_updates(fresh_pg_url) == 0
    taker_store.close()
    assert sa.sync().pushed == 3  # held again, and the outbox's delta goes out once
    with pytest.raises(ReplicaInUse):
        LearnerSync(LinUCB(D, seed=3), LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="pod-a").restore()
    assert _restored_updates(fresh_pg_url) == 3


def test_a_delta_another_writer_stored_under_the_same_key_is_a_conflict_not_a_push(fresh_pg_url: str) -> None:
    """A process outside the lock (an older release) already wrote seq 1 of this replica."""
    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    store = LearnerStore(fresh_pg_url)
    sa = LearnerSync(a, store, FEATURE_NAMES, replica="pod-a")
    name, version = sa.key
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO learner_deltas (learner, version, replica, seq, n_features, dn, da, db)"
                     " VALUES (%s, %s, 'pod-a', 1, %s, 1, %s, %s)",
                     (name, version, D, np.eye(D).tobytes(), np.ones(D).tobytes()))
    _learn(a, 2, 0.1)
    with pytest.raises(DeltaConflict, match="'pod-a'/1"):
        sa.sync()
    # The same delta written again (a retry after a commit the error hid) is still a no-op.
    dA, db = np.full((D, D), 0.5), np.full(D, 0.25)
    for _ in range(2):
        store.write_delta(learner=name, version=version, replica="pod-a", seq=2, dA=dA, db=db, dn=1)
    store.close()


def _lose_session(sync: LearnerSync) -> None:
    """End ``sync``'s database session from outside (a PostgreSQL restart, a partition the server saw)."""
    with psycopg.connect(sync.store.url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (sync.store._conn.info.backend_pid,))


def test_an_id_taken_back_after_a_lost_session_merges_what_another_process_wrote_under_it(
        fresh_pg_url: str) -> None:
    """The reviewer's sequence: A loses its session, B runs under A's id (seq 2), A takes the id back.
    A kept seq 2 for its own delta: every sync raised DeltaConflict, stop() raised, B's learning never
    reached A, and a newcomer restored 7 of 12 updates."""
    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    sa = LearnerSync(a, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="pod-a")
    sa.restore()
    _learn(a, 4, 0.1)
    assert sa.sync().pushed == 4  # seq 1
    _lose_session(sa)
    b_store = LearnerStore(fresh_pg_url)
    b = LinUCB(D, seed=2)
    sb = LearnerSync(b, b_store, FEATURE_NAMES, replica="pod-a")
    sb.restore(replay=False)
    _learn(b, 3, 0.9)
    assert sb.sync().pushed == 3  # seq 2, under A's id
    sb.stop(final_snapshot=True)
    b_store.close()
    _learn(a, 5, 0.2)
    with pytest.raises(psycopg.OperationalError):
        sa.sync()  # finds its session gone; the delta stays in the outbox
    report = sa.sync()  # takes the id back, merges B's seq 2, sends its own as seq 3
    assert (report.pushed, report.merged, a.n_updates) == (5, 3, 12)
    assert sa.sync() == type(report)(0, 0)
    sa.stop(final_snapshot=True)  # no DeltaConflict
    assert _restored_updates(fresh_pg_url) == 12
    with psycopg.connect(fresh_pg_url) as conn:
        seqs = conn.execute("SELECT seq, dn FROM learner_deltas WHERE replica = 'pod-a' ORDER BY seq").fetchall()
    assert seqs == [(1, 4), (2, 3), (3, 5)]


def test_a_snapshot_after_the_id_was_taken_back_holds_what_another_process_wrote_meanwhile(
        fresh_pg_url: str) -> None:
    """A has nothing new to push: its final snapshot is the first write after the id is taken back."""
    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    sa = LearnerSync(a, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="pod-a")
    sa.restore()
    _learn(a, 4, 0.1)
    sa.sync()
    _lose_session(sa)
    with pytest.raises(psycopg.OperationalError):
        sa.store.latest_snapshot(learner=sa.key[0], version=sa.key[1])  # a read finds the session gone
    b_store = LearnerStore(fresh_pg_url)
    b = LinUCB(D, seed=2)
    sb = LearnerSync(b, b_store, FEATURE_NAMES, replica="pod-a")
    sb.restore(replay=False)
    _learn(b, 3, 0.9)
    sb.sync()
    b_store.close()  # gone without a snapshot of its own
    sa.stop(final_snapshot=True)
    assert a.n_updates == 7
    assert _restored_updates(fresh_pg_url) == 7


def test_a_delta_committed_as_the_session_was_lost_is_found_stored_and_not_sent_twice(fresh_pg_url: str) -> None:
    """A's write went through but its session broke before the answer came; B (same id) restored that
    delta and wrote its own after it. A finds its delta stored, B's merged, and sends nothing twice."""
    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    store = LearnerStore(fresh_pg_url)
    sa = LearnerSync(a, store, FEATURE_NAMES, replica="pod-a")
    sa.restore()
    real_write = store.write_delta

    def write_then_lose_the_answer(**kw: object) -> None:
        real_write(**kw)  # type: ignore[arg-type]
        _lose_session(sa)
        store._conn.execute("SELECT 1")  # raises as the lost answer would have

    store.write_delta = write_then_lose_the_answer  # type: ignore[method-assign]
    _learn(a, 4, 0.1)
    with pytest.raises(psycopg.OperationalError):
        sa.sync()  # seq 1 is stored; A cannot know
    store.write_delta = real_write  # type: ignore[method-assign]
    b_store = LearnerStore(fresh_pg_url)
    b = LinUCB(D, seed=2)
    sb = LearnerSync(b, b_store, FEATURE_NAMES, replica="pod-a")
    sb.restore(replay=False)
    assert b.n_updates == 4  # A's seq 1
    _learn(b, 3, 0.9)
    sb.sync()  # seq 2
    b_store.close()
    _learn(a, 2, 0.3)
    report = sa.sync()
    assert (report.pushed, report.merged, a.n_updates) == (4 + 2, 3, 9)
    sa.stop(final_snapshot=True)
    assert _restored_updates(fresh_pg_url) == 9
    with psycopg.connect(fresh_pg_url) as conn:
        seqs = conn.execute("SELECT seq, dn FROM learner_deltas WHERE replica = 'pod-a' ORDER BY seq").fetchall()
    assert seqs == [(1, 4), (2, 3), (3, 2)]


def test_a_connection_reset_on_the_client_side_only_does_not_lock_the_process_out_of_its_id(
        fresh_pg_url: str) -> None:
    """The server keeps the old session (and the id's lock) after a reset only the client saw: the store
    ends that session, which is its own, instead of refusing itself as "another live process"."""
    migrate(fresh_pg_url)
    proxy = PgProxy(fresh_pg_url)
    try:
        a = LinUCB(D, seed=1)
        sa = LearnerSync(a, LearnerStore(proxy.url()), FEATURE_NAMES, replica="pod-a")
        sa.restore()
        _learn(a, 1, 0.1)
        assert sa.sync().pushed == 1
        old_pid = sa.store._conn.info.backend_pid
        proxy.reset_client_side()
        _learn(a, 2, 0.2)
        with pytest.raises(psycopg.OperationalError):
            sa.sync()
        assert sa.sync().pushed == 2  # the id is this process's again, at once
        with psycopg.connect(fresh_pg_url) as conn:
            alive = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (old_pid,)).fetchone()
        assert alive == (0,)
        # Only this store's own sessions are ended: another process's is not, and it is refused.
        other = LearnerStore(fresh_pg_url)
        try:
            with pytest.raises(ReplicaInUse, match="another live process"):
                LearnerSync(LinUCB(D, seed=2), other, FEATURE_NAMES, replica="pod-a").restore()
        finally:
            other.close()
        _learn(a, 1, 0.3)
        assert sa.sync().pushed == 1
        sa.stop(final_snapshot=True)
        assert _restored_updates(fresh_pg_url) == 4
    finally:
        proxy.close()


def test_a_learner_that_writes_no_deltas_takes_no_replica_id(fresh_pg_url: str) -> None:
    """least-ttft has no learned state: two single instances on one database both start, snapshot and stop."""
    migrate(fresh_pg_url)
    stores = [LearnerStore(fresh_pg_url), LearnerStore(fresh_pg_url)]
    try:
        syncs = [LearnerSync(LeastExpectedTtft(), s, FEATURE_NAMES) for s in stores]
        for sync in syncs:
            sync.restore()
        for sync in syncs:
            sync.snapshot()
            sync.stop(final_snapshot=True)
        # A linear learner on the same database still takes its id (the single instance's).
        LearnerSync(LinUCB(D, seed=1), stores[0], FEATURE_NAMES).restore()
        with pytest.raises(ReplicaInUse):
            LearnerSync(LinUCB(D, seed=2), stores[1], FEATURE_NAMES).restore()
    finally:
        for s in stores:
            s.close()
