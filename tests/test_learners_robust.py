"""Learner robustness: failed delta writes, snapshot watermarks, overflow, the Thompson factor cache, foreign
snapshots (each a regression test of a reviewed bug)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
import pytest

from decision.domain import RequestContext
from learners._linear import FloatArray, LinearLearner, RidgeStats
from learners.features import FEATURE_NAMES
from learners.linucb import LinUCB
from learners.softmax import Softmax
from learners.store import LearnerStore
from learners.sync import LearnerSync
from learners.testing import toy_arms
from learners.thompson import LinearThompson
from tests.test_learners_support import insert_decision, insert_outcome, migrate
from tests.test_learners_sync import _engine, _traffic

D = len(FEATURE_NAMES)

StoreOpener = Callable[[], LearnerStore]


@pytest.fixture
def open_store(fresh_pg_url: str) -> Iterator[StoreOpener]:
    """Migrates the test's fresh database, then opens LearnerStores on it; all are closed at teardown."""
    migrate(fresh_pg_url)
    stores: list[LearnerStore] = []

    def opener() -> LearnerStore:
        store = LearnerStore(fresh_pg_url)
        stores.append(store)
        return store

    yield opener
    for store in stores:
        store.close()


def _sync_failing_once(store: LearnerStore, sync: LearnerSync, write: Callable[..., None]) -> None:
    """One ``sync()`` whose delta write goes through ``write(real, **kw)``, which raises; then the real one is back."""
    real = store.write_delta
    store.write_delta = lambda **kw: write(real, **kw)  # type: ignore[method-assign]
    with pytest.raises(psycopg.OperationalError):
        sync.sync()
    store.write_delta = real  # type: ignore[method-assign]


def _updates(learner: LinearLearner, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        learner.update(rng.random(learner.n_features).tolist(), float(rng.random()))


def _model(learner: LinearLearner) -> dict[str, Any]:
    s = learner.stats
    return {"A": s.A.copy(), "b": s.b.copy(), "A_inv": s.A_inv.copy(), "theta": s.theta.copy(), "n": s.n,
            "dA": s.dA.copy(), "db": s.db.copy(), "dn": s.dn}


def _assert_same(before: dict[str, Any], learner: LinearLearner) -> None:
    after = _model(learner)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


# -- 1. a failed delta write is retried, not lost, and never counted twice --

def test_a_failed_delta_write_is_retried_not_lost(open_store: StoreOpener) -> None:
    a, b = LinUCB(D, seed=1), LinUCB(D, seed=2)
    sa, sb = open_store(), open_store()
    sync_a, sync_b = LearnerSync(a, sa, FEATURE_NAMES, replica="a"), LearnerSync(b, sb, FEATURE_NAMES, replica="b")
    _updates(a, 10)

    def down(real: Callable[..., None], **kw: Any) -> None:
        raise psycopg.OperationalError("connection lost (simulated)")

    _sync_failing_once(sa, sync_a, down)
    _updates(a, 5, seed=1)
    assert sync_a.sync().pushed == 15
    assert sync_b.sync().merged == 15
    assert b.n_updates == a.n_updates == 15
    np.testing.assert_allclose(a.stats.A, b.stats.A, rtol=1e-12)


def test_a_retry_after_an_ambiguous_commit_is_counted_once(open_store: StoreOpener) -> None:
    """The write committed but the client saw an error: the retry resends the same seq, a no-op."""
    a, b = LinUCB(D, seed=1), LinUCB(D, seed=2)
    sa, sb = open_store(), open_store()
    sync_a, sync_b = LearnerSync(a, sa, FEATURE_NAMES, replica="a"), LearnerSync(b, sb, FEATURE_NAMES, replica="b")
    _updates(a, 10)
    seqs: list[int] = []

    def committed_then_lost(real: Callable[..., None], **kw: Any) -> None:
        real(**kw)
        seqs.append(kw["seq"])
        raise psycopg.OperationalError("connection lost after commit (simulated)")

    _sync_failing_once(sa, sync_a, committed_then_lost)
    _updates(a, 5, seed=1)
    sync_a.sync()
    assert sync_b.sync().merged == 15
    assert b.n_updates == a.n_updates == 15
    assert seqs == [1] and sa.last_delta_seq(learner=sync_a.key[0], version=sync_a.key[1], replica="a") == 2


def test_the_store_reconnects_after_its_connection_broke(open_store: StoreOpener) -> None:
    a = LinUCB(D, seed=1)
    store = open_store()
    sync = LearnerSync(a, store, FEATURE_NAMES, replica="a")
    _updates(a, 3)
    store._conn.close()  # what a dropped connection leaves behind
    assert sync.sync().pushed == 3


# -- 2. the snapshot's state and watermark are taken together --

def _chosen(d: Any) -> list[float]:
    c = next(c for c in d.trace["stages"]["score"]["candidates"] if c["endpoint_id"] == d.route.endpoint_id)
    return [float(c["features"][n]) for n in FEATURE_NAMES]


def _log_rows(url: str, rows: list[tuple[Any, float, float]]) -> None:
    """(decision, reward, reported_at) rows into the audit log."""
    with psycopg.connect(url, autocommit=True) as conn:
        for i, (d, reward, reported_at) in enumerate(rows):
            insert_decision(conn, decision_id=d.decision_id, decided_at=900.0 + i, learner="linucb@1",
                            propensity=d.propensity, trace=dict(d.trace))
            insert_outcome(conn, decision_id=d.decision_id, reward=reward, reported_at=reported_at)


def test_an_update_racing_the_snapshot_is_counted_once_on_restore(fresh_pg_url: str, open_store: StoreOpener) -> None:
    """An outcome stamped after the watermark and learnt while the snapshot was being taken: it is either in
    the state or replayed, never both."""
    store = open_store()
    learner = LinUCB(D, seed=5)
    eng, rng = _engine(learner, 5)
    before = _traffic(eng, rng, 10)
    racing = eng.decide(RequestContext("race", "t", model="llama-3.1-8b", ttft_target_ms=400.0))
    learnt = threading.Event()
    reporters: list[threading.Thread] = []

    def report() -> None:  # the engine's order: reported_at (1000.5) is stamped, then the outcome learnt
        learner.update(_chosen(racing), 0.7)
        learnt.set()

    def clock() -> float:  # the sync reads its watermark; meanwhile the outcome is being learnt
        t = threading.Thread(target=report)
        t.start()
        reporters.append(t)
        learnt.wait(0.3)  # done at once, unless the snapshot holds the update lock
        return 1_000.0

    LearnerSync(learner, store, FEATURE_NAMES, clock=clock).snapshot()
    for t in reporters:
        t.join()
    rows = [(rec["decision"], float(rec["reward"]), 950.0 + 0.1 * i)  # type: ignore[arg-type]
            for i, rec in enumerate(before)]
    _log_rows(fresh_pg_url, [*rows, (racing, 0.7, 1_000.5)])
    restarted = LinUCB(D, seed=5)
    report_ = LearnerSync(restarted, store, FEATURE_NAMES).restore()
    assert restarted.n_updates == learner.n_updates == 11, report_
    np.testing.assert_allclose(restarted.stats.A, learner.stats.A, rtol=1e-3, atol=1e-3)


def test_with_a_barrier_an_outcome_stamped_before_the_watermark_is_in_the_snapshot(
        fresh_pg_url: str, open_store: StoreOpener) -> None:
    """Stamped, then learnt, under the barrier: the snapshot waits for the learning, so nothing stamped before
    its watermark is missing from its state (without it, that outcome would be neither in it nor replayed)."""
    store = open_store()
    learner = LinUCB(D, seed=5)
    eng, _ = _engine(learner, 5)
    racing = eng.decide(RequestContext("race", "t", model="llama-3.1-8b", ttft_target_ms=400.0))
    barrier = threading.Lock()
    stamped = threading.Event()
    stamps: list[float] = []

    def report() -> None:
        with barrier:
            stamps.append(time.time())
            stamped.set()
            time.sleep(0.1)  # the snapshot starts here
            learner.update(_chosen(racing), 0.7)

    t = threading.Thread(target=report)
    t.start()
    stamped.wait()
    sync = LearnerSync(learner, store, FEATURE_NAMES, barrier=barrier)
    snap_id = sync.snapshot()
    t.join()
    snap = store.latest_snapshot(learner=sync.key[0], version=sync.key[1])
    assert snap is not None and snap.id == snap_id
    assert snap.n_updates == 1 and stamps[0] <= snap.watermark
    _log_rows(fresh_pg_url, [(racing, 0.7, stamps[0])])
    restarted = LinUCB(D, seed=5)
    assert LearnerSync(restarted, store, FEATURE_NAMES).restore().replayed == 0
    assert restarted.n_updates == 1


def test_a_snapshot_pushes_what_it_holds_so_a_restore_neither_loses_nor_repeats_it(open_store: StoreOpener) -> None:
    a, b = LinUCB(D, seed=1), LinUCB(D, seed=2)
    sa, sb = open_store(), open_store()
    sync_a = LearnerSync(a, sa, FEATURE_NAMES, replica="a")
    _updates(a, 4)
    sync_a.snapshot()
    assert a.stats.dn == 0 and a.state_dict()["stats"]["dn"] == 0
    _updates(a, 3, seed=1)
    sync_a.sync()  # then "a" crashes; b starts from a's snapshot and folds in a's later delta
    report = LearnerSync(b, sb, FEATURE_NAMES, replica="b").restore()
    assert report.deltas == 1 and b.n_updates == 7
    np.testing.assert_allclose(b.stats.A, a.stats.A, rtol=1e-12)


# -- 3. overflow and corrupt input never reach the model --

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("cls", [LinUCB, Softmax, LinearThompson])
@pytest.mark.parametrize(("x", "r"), [((1e160, 1.0), 1.0), ((1e200, 0.0), 1e200), ((1.0, 1e10), 1e300)])
def test_an_overflowing_update_is_refused_and_changes_nothing(cls: type[LinearLearner], x: tuple[float, float],
                                                             r: float) -> None:
    learner = cls(2, seed=0, prior="none")
    learner.update((1.0, 0.0), 0.5)
    before = _model(learner)
    with pytest.raises(ValueError, match="not be finite"):
        learner.update(x, r)
    _assert_same(before, learner)
    for _ in range(20):
        learner.update((0.0, 1.0), 1.0)
    assert np.isfinite(learner.stats.theta).all() and learner.stats.theta[1] > 0.9
    c = learner.choose(RequestContext("r", "t"), toy_arms([100.0, 110.0], [(1.0, 0.0), (0.0, 1.0)]))
    assert np.isfinite(c.scores).all() and 0.0 < c.propensity <= 1.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_an_overflowing_update_on_the_exact_refresh_path_changes_nothing() -> None:
    stats = RidgeStats(2, 1.0, refresh_every=1)
    stats.update(np.array([1.0, 0.0]), 0.5)
    A, b, n = stats.A.copy(), stats.b.copy(), stats.n
    with pytest.raises(ValueError, match="not be finite"):
        stats.update(np.array([1e160, 1.0]), 1.0)
    np.testing.assert_array_equal(stats.A, A)
    np.testing.assert_array_equal(stats.b, b)
    assert stats.n == n and np.isfinite(stats.theta).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(("dA", "db", "dn", "match"), [
    (np.eye(3), np.zeros(2), 1, "shape"),
    (np.eye(2), np.zeros(3), 1, "shape"),
    (np.full((2, 2), np.nan), np.zeros(2), 1, "not finite"),
    (np.eye(2), np.array([np.inf, 0.0]), 1, "not finite"),
    (np.eye(2), np.zeros(2), -1, "dn"),
    (np.eye(2) * 1.7e308, np.zeros(2), 1, "not be finite"),  # finite, but A + dA overflows
])
def test_a_bad_merge_is_refused_and_changes_nothing(dA: FloatArray, db: FloatArray, dn: int, match: str) -> None:
    learner = LinUCB(2, seed=0, prior="none")
    learner.update((1.0, 0.0), 0.5)
    if match == "not be finite":  # a model already at the edge of the float range
        learner.merge(np.eye(2) * 1e308, np.zeros(2), 0)
    before = _model(learner)
    with pytest.raises(ValueError, match=match):
        learner.merge(dA, db, dn)
    _assert_same(before, learner)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("A", np.eye(3).tolist(), "shape"),
    ("b", [0.0, 0.0, 0.0], "shape"),
    ("A", [[float("nan"), 0.0], [0.0, 1.0]], "not finite"),
    ("A_inv", [[1.0, 0.0], [0.0, float("inf")]], "not finite"),
    ("dA", [[1.0]], "shape"),
    ("n", -3, "n must be"),
    ("A", "junk", "numeric"),
])
def test_a_bad_state_is_refused_and_changes_nothing(key: str, value: Any, match: str) -> None:
    source = LinUCB(2, seed=0, prior="none")
    source.update((1.0, 0.0), 0.5)
    state = source.state_dict()
    state["stats"][key] = value
    learner = LinUCB(2, seed=1, prior="none")
    learner.update((0.0, 1.0), 0.2)
    before = _model(learner)
    with pytest.raises(ValueError, match=match):
        learner.load_state(state)
    _assert_same(before, learner)


def test_a_corrupt_delta_is_skipped_and_later_ones_still_merge(open_store: StoreOpener) -> None:
    a, b = LinUCB(D, seed=1), LinUCB(D, seed=2)
    sa, sb = open_store(), open_store()
    sync_a, sync_b = LearnerSync(a, sa, FEATURE_NAMES, replica="a"), LearnerSync(b, sb, FEATURE_NAMES, replica="b")
    name, version = sync_a.key
    sa.write_delta(learner=name, version=version, replica="a", seq=1, dA=np.full((D, D), np.nan), db=np.zeros(D),
                   dn=1)  # e.g. written by a replica running the unfixed code
    sync_a._seq = 1
    _updates(a, 4)
    sync_a.sync()
    assert sync_b.sync().merged == 4
    assert b.n_updates == 4 and np.isfinite(b.stats.theta).all()
    assert sync_b.sync().merged == 0  # skipped once, not retried forever


# -- 4. the Thompson sampler's cached factor is never stale --

def test_the_cached_cholesky_factor_is_never_older_than_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """An update landing while choose() factors A^-1: the factor stored is not the one of the older A^-1."""
    learner = LinearThompson(3, seed=0, prior="none")
    real = np.linalg.cholesky
    racing: list[threading.Thread] = []

    def cholesky_racing_an_update(a: FloatArray) -> FloatArray:
        out: FloatArray = np.asarray(real(a), dtype=np.float64)
        if not racing:  # once: an update from another thread, given the time to finish unless locked out
            t = threading.Thread(target=learner.update, args=((1.0, 2.0, 0.5), 1.0))
            t.start()
            racing.append(t)
            t.join(0.3)
        return out

    monkeypatch.setattr(np.linalg, "cholesky", cholesky_racing_an_update)
    learner.update((0.5, 0.0, 1.0), 0.3)
    learner.choose(RequestContext("r", "t"), toy_arms([100.0, 101.0], [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)]))
    racing[0].join()
    monkeypatch.setattr(np.linalg, "cholesky", real)
    assert learner.n_updates == 2
    factor = learner._factor()
    np.testing.assert_allclose(factor @ factor.T, learner.stats.A_inv, atol=1e-12)


# -- 5. another replica's snapshot: not its pending delta, not its random stream --

def test_a_snapshot_of_another_replica_brings_neither_its_pending_delta_nor_its_random_stream(
        open_store: StoreOpener) -> None:
    store = open_store()
    a = LinUCB(D, seed=1)
    _updates(a, 6)
    sync_a = LearnerSync(a, store, FEATURE_NAMES, replica="a")
    name, version = sync_a.key
    # A state holding a pending delta (as snapshots written before this fix do).
    store.save_snapshot(learner=name, version=version, replica="a", watermark=1_000.0, n_updates=a.n_updates,
                        delta_marks={}, state=a.state_dict())

    def restored(replica: str) -> LinUCB:
        learner = LinUCB(D, seed=1)
        LearnerSync(learner, store, FEATURE_NAMES, replica=replica).restore()
        return learner

    b, b_again, own = restored("b"), restored("b"), restored("a")
    assert b.n_updates == 6 and b.stats.dn == 0 and not b.stats.dA.any()
    np.testing.assert_allclose(b.stats.A, a.stats.A)
    # Its own snapshot (nothing pushed since): the pending delta is still this replica's to push.
    assert own.stats.dn == 6
    np.testing.assert_array_equal(own.stats.dA, a.stats.dA)
    draws = {r: [float(x._rng.random()) for _ in range(4)] for r, x in (("a", a), ("own", own), ("b", b),
                                                                       ("b_again", b_again))}
    assert draws["own"] == draws["a"]  # its own generator state, restored exactly
    assert draws["b"] != draws["a"]  # another replica's stream is not replayed...
    assert draws["b"] == draws["b_again"]  # ...and the reseed is deterministic


def test_an_own_snapshot_whose_pending_delta_was_pushed_since_is_not_pushed_again(open_store: StoreOpener) -> None:
    store = open_store()
    a = LinUCB(D, seed=1)
    sync_a = LearnerSync(a, store, FEATURE_NAMES, replica="a")
    name, version = sync_a.key
    _updates(a, 6)
    store.save_snapshot(learner=name, version=version, replica="a", watermark=1_000.0, n_updates=a.n_updates,
                        delta_marks={}, state=a.state_dict())
    sync_a.sync()  # pushes those 6 as seq 1
    again = LinUCB(D, seed=1)
    LearnerSync(again, store, FEATURE_NAMES, replica="a").restore(replay=False)
    assert again.stats.dn == 0


def test_a_numerically_singular_model_keeps_learning_through_its_exact_refresh() -> None:
    # Collinear columns (one-hots that are always 1 on a uniform fleet) and a tiny ridge make A singular:
    # the periodic exact inverse must not raise out of update(), nor stop every later update.
    from learners.linucb import LinUCB

    learner = LinUCB(3, l2=1e-15, prior="none", seed=0)
    for _ in range(2 * 2000 + 10):
        learner.update((1.0, 1.0, 0.5), 0.5)
    assert learner.n_updates == 4010 and np.isfinite(learner.stats.theta).all()
