"""Learner state through PostgreSQL: restore with audit-log replay, and replicas converging."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from decision.domain import Outcome, OutcomeStatus, RequestContext
from decision.engine import DecisionEngine
from decision.fleet import Fleet
from decision.fleetgen import demo_fleet
from decision.health_guard import BuiltinHealthGuard
from decision.telemetry import QUEUE_RUNNING, QUEUE_WAITING, TelemetryStore
from learners.features import FEATURE_NAMES, RouteFeatures
from learners.linucb import LinUCB
from learners.store import LearnerStore
from learners.sync import LearnerSync
from tests.test_learners_support import insert_decision, insert_outcome, migrate

D = len(FEATURE_NAMES)


def _engine(learner: LinUCB, seed: int) -> tuple[DecisionEngine, np.random.Generator]:
    fleet = Fleet.from_mapping(demo_fleet())
    tel = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints})
    rng = np.random.default_rng(seed)
    for e in fleet.endpoints:
        tel.update_endpoint(e.endpoint_id, {QUEUE_RUNNING: float(rng.integers(0, 8)),
                                            QUEUE_WAITING: float(rng.integers(0, 3))})
    return DecisionEngine(fleet, tel, BuiltinHealthGuard(), learner, features=RouteFeatures()), rng


def _traffic(engine: DecisionEngine, rng: np.random.Generator, n: int) -> list[dict[str, object]]:
    """Decide and report n requests; returns what the audit log would hold."""
    logged: list[dict[str, object]] = []
    for i in range(n):
        ctx = RequestContext(f"r{i}", "t", model="llama-3.1-8b", client_region=str(rng.choice(["eu-west", "us-east"])),
                             estimated_input_tokens=int(rng.integers(50, 900)), ttft_target_ms=400.0)
        d = engine.decide(ctx)
        slow = 3.0 if d.route.site_id.endswith("edge1") else 1.0
        res = engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=d.expected_ttft_ms * slow))
        logged.append({"decision": d, "reward": res.reward})
    return logged


def _A(learner: LinUCB) -> np.ndarray:
    return learner.stats.A.copy()


def test_two_engines_converge_through_postgresql(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    a, b = LinUCB(D, seed=1), LinUCB(D, seed=2)
    store_a, store_b = LearnerStore(fresh_pg_url), LearnerStore(fresh_pg_url)
    sync_a = LearnerSync(a, store_a, FEATURE_NAMES, replica="a")
    sync_b = LearnerSync(b, store_b, FEATURE_NAMES, replica="b")
    eng_a, rng_a = _engine(a, 1)
    eng_b, rng_b = _engine(b, 2)
    reference = LinUCB(D)  # a single learner that sees every outcome of both
    for _round in range(3):
        for eng, rng in ((eng_a, rng_a), (eng_b, rng_b)):
            for rec in _traffic(eng, rng, 60):
                d = rec["decision"]
                chosen = next(c for c in d.trace["stages"]["score"]["candidates"]  # type: ignore[attr-defined]
                              if c["endpoint_id"] == d.route.endpoint_id)  # type: ignore[attr-defined]
                reference.update([chosen["features"][n] for n in FEATURE_NAMES], float(rec["reward"]))  # type: ignore[arg-type]
        assert not np.allclose(_A(a), _A(b))  # diverged between syncs
        ra, rb, ra2 = sync_a.sync(), sync_b.sync(), sync_a.sync()
        assert ra.pushed == 60 and rb.pushed == 60 and rb.merged == 60 and ra2.merged == 60
        # Both replicas now hold the statistics of all outcomes (trace features are rounded to 5 places).
        np.testing.assert_allclose(_A(a), _A(b), rtol=1e-9)
        np.testing.assert_allclose(a.stats.b, b.stats.b, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(_A(a), reference.stats.A, rtol=1e-3, atol=1e-3)
        assert a.n_updates == b.n_updates == reference.n_updates
    # Converged models predict the same rewards, hence make the same greedy choices.
    X = np.random.default_rng(9).random((32, D))
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-7, atol=1e-9)
    assert int(np.argmax(a.predict(X))) == int(np.argmax(b.predict(X)))


def _log(url: str, before: list[dict[str, object]], after: list[dict[str, object]]) -> None:
    """What the audit log holds: ``before`` reported before the snapshot (t=1000), ``after`` after it."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for i, rec in enumerate(before + after):
            d = rec["decision"]
            insert_decision(conn, decision_id=d.decision_id, decided_at=900.0 + i,  # type: ignore[attr-defined]
                            learner="linucb@1", propensity=d.propensity, trace=dict(d.trace))  # type: ignore[attr-defined]
            insert_outcome(conn, decision_id=d.decision_id, reward=rec["reward"],  # type: ignore[attr-defined, arg-type]
                           reported_at=950.0 + 0.1 * i if i < len(before) else 1_001.0 + i)


def test_restore_replays_outcomes_after_the_snapshot(fresh_pg_url: str) -> None:

    migrate(fresh_pg_url)
    store = LearnerStore(fresh_pg_url)
    learner = LinUCB(D, seed=5)
    sync = LearnerSync(learner, store, FEATURE_NAMES, clock=lambda: 1_000.0)
    eng, rng = _engine(learner, 5)
    before = _traffic(eng, rng, 40)
    snap_id = sync.snapshot()  # watermark t=1000
    after = _traffic(eng, rng, 25)  # learned in memory, then the process "crashes"
    expected_A = _A(learner)
    _log(fresh_pg_url, before, after)
    # Without the replay the 25 post-snapshot outcomes would be lost.
    lossy = LinUCB(D, seed=5)
    assert LearnerSync(lossy, store, FEATURE_NAMES).restore(replay=False).replayed == 0
    assert lossy.n_updates == 40
    restarted = LinUCB(D, seed=5)
    report = LearnerSync(restarted, store, FEATURE_NAMES).restore()
    assert report.snapshot_id == snap_id and report.replayed == len(after)
    assert restarted.n_updates == learner.n_updates == 65
    np.testing.assert_allclose(_A(restarted), expected_A, rtol=1e-3, atol=1e-3)


def test_restore_counts_outcomes_once_when_own_deltas_were_synced_before_the_crash(fresh_pg_url: str) -> None:

    migrate(fresh_pg_url)
    store = LearnerStore(fresh_pg_url)
    learner = LinUCB(D, seed=5)
    sync = LearnerSync(learner, store, FEATURE_NAMES, clock=lambda: 1_000.0)  # a single instance (replica "")
    eng, rng = _engine(learner, 5)
    before = _traffic(eng, rng, 40)
    sync.snapshot()
    after = _traffic(eng, rng, 25)
    sync.sync()  # the service's periodic sync stored these 25 as this instance's delta, then it crashed
    _log(fresh_pg_url, before, after)
    # Without the replay, the own delta is what brings them back.
    no_replay = LinUCB(D, seed=5)
    assert LearnerSync(no_replay, store, FEATURE_NAMES).restore(replay=False).deltas == 1
    assert no_replay.n_updates == 65
    restarted = LinUCB(D, seed=5)
    restarted_sync = LearnerSync(restarted, store, FEATURE_NAMES)
    report = restarted_sync.restore()
    assert report.replayed == len(after) and report.deltas == 0  # the log replays them; the own delta is not added
    assert restarted.n_updates == learner.n_updates == 65
    np.testing.assert_allclose(_A(restarted), _A(learner), rtol=1e-3, atol=1e-3)
    # The replayed outcomes are not pushed again as a new delta: anyone merging deltas later (a
    # restore without replay, workers started on this history) used to count those 25 twice.
    assert restarted_sync.sync().pushed == 0
    for replica, replay in (("", False), ("host-w0", None)):
        later = LinUCB(D, seed=5)
        LearnerSync(later, store, FEATURE_NAMES, replica=replica).restore(replay=replay)
        assert later.n_updates == 65, (replica, later.n_updates)


def test_state_of_another_feature_layout_is_never_loaded(fresh_pg_url: str) -> None:
    """A service restarted with a different feature builder starts from its prior, not a crash."""
    migrate(fresh_pg_url)
    store = LearnerStore(fresh_pg_url)
    try:
        old = LinUCB(2, seed=1)
        old.update((1.0, 0.5), 1.0)
        LearnerSync(old, store, ("bias", "x")).snapshot()
        new = LinUCB(3, seed=1)
        report = LearnerSync(new, store, ("bias", "x", "y")).restore()
        assert report.snapshot_id is None
        assert new.n_updates == 0
        again = LinUCB(2, seed=1)
        assert LearnerSync(again, store, ("bias", "x")).restore().snapshot_id is not None
        assert again.n_updates == 1
    finally:
        store.close()


def test_outcomes_of_another_feature_layout_are_not_replayed(fresh_pg_url: str) -> None:
    """A new layout starts from its prior: the old traces' features, read by name with zeros for the
    columns they lack, would fit the new model on vectors that are mostly zeros."""
    from decision.scoring import BasicFeatures

    migrate(fresh_pg_url)
    eng, rng = _engine(LinUCB(len(FEATURE_NAMES), seed=3), 3)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        for i in range(20):
            d = eng.decide(RequestContext(f"r{i}", "t", model="llama-3.1-8b", client_region="eu-west"))
            res = eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=float(rng.uniform(50, 900))))
            insert_decision(conn, decision_id=d.decision_id, decided_at=1000.0 + i, learner="linucb@1",
                            propensity=d.propensity, trace=dict(d.trace))
            insert_outcome(conn, decision_id=d.decision_id, reward=res.reward, reported_at=1001.0 + i)
    store = LearnerStore(fresh_pg_url)
    try:
        other = LinUCB(len(BasicFeatures.names), seed=1)
        assert LearnerSync(other, store, BasicFeatures.names).restore().replayed == 0 and other.n_updates == 0
        same = LinUCB(len(FEATURE_NAMES), seed=1)
        assert LearnerSync(same, store, FEATURE_NAMES).restore().replayed == 20
    finally:
        store.close()


def test_a_damaged_delta_row_is_skipped_and_the_replicas_keep_merging(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    a, b = LinUCB(D, seed=1), LinUCB(D, seed=2)
    sa = LearnerSync(a, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="a")
    sb = LearnerSync(b, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="b")
    name, version = sa.key
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:  # replica c's row, one float short
        conn.execute("INSERT INTO learner_deltas (learner, version, replica, seq, n_features, dn, da, db)"
                     " VALUES (%s, %s, 'c', 1, %s, 1, %s, %s)", (name, version, D, b"\0" * 8 * (D * D - 1),
                                                                  b"\0" * 8 * D))
    a.update(tuple(np.full(D, 0.1)), 1.0)
    sa.sync()
    sb.sync()
    assert b.n_updates == 1  # a's delta arrived past c's damaged one
    sb.sync()
    assert b.n_updates == 1  # and the damaged one is not tried again
    restarted = LinUCB(D, seed=3)
    LearnerSync(restarted, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="d").restore()
    assert restarted.n_updates == 1


def test_a_damaged_newest_snapshot_falls_back_to_the_one_before_it(fresh_pg_url: str) -> None:
    import json

    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    sa = LearnerSync(a, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="a")
    a.update(tuple(np.full(D, 0.1)), 1.0)
    good = sa.snapshot()
    name, version = sa.key
    broken = a.state_dict()
    del broken["stats"]["A"]
    for state in ({"learner": a.name, "n_features": D, "rng": {}}, broken):
        with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO learner_snapshots (learner, version, replica, watermark, n_updates, delta_marks,"
                         " state) VALUES (%s, %s, 'x', now(), 1, '{}', %s)", (name, version, json.dumps(state)))
    b = LinUCB(D, seed=2)
    report = LearnerSync(b, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="b").restore()
    assert report.snapshot_id == good and b.n_updates == 1


def test_a_single_instance_after_replicas_takes_their_deltas_and_does_not_replay_their_outcomes(
        fresh_pg_url: str) -> None:
    # `serve --workers 2` ran on this database, then one process (replica "") starts on it.
    migrate(fresh_pg_url)
    w0, w1 = LinUCB(D, seed=5), LinUCB(D, seed=6)
    s0 = LearnerSync(w0, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="host-w0", clock=lambda: 1_000.0)
    s1 = LearnerSync(w1, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="host-w1", clock=lambda: 1_000.0)
    s1.snapshot()
    eng, rng = _engine(w0, 5)
    after = _traffic(eng, rng, 10)  # w0 learns these, pushes them as its delta, and the log holds them
    s0.sync()
    _log(fresh_pg_url, [], after)
    single = LinUCB(D, seed=5)
    report = LearnerSync(single, LearnerStore(fresh_pg_url), FEATURE_NAMES).restore()
    assert (report.deltas, report.replayed) == (1, 0)
    assert single.n_updates == 10  # each outcome once (was 20: the delta and the replay)


@pytest.mark.parametrize(("column", "value"), [
    ("state", "[]"),
    ("state", "null"),
    ("state", '"a string"'),
    ("delta_marks", '{"a": "x"}'),
    ("delta_marks", "[]"),
    ("delta_marks", '{"a": null}'),
    ("delta_marks", '{"a": 9223372036854775808}'),  # past bigint: every read of deltas would fail on it
], ids=["state-array", "state-null", "state-string", "marks-value-text", "marks-array", "marks-value-null",
        "marks-value-past-bigint"])
def test_a_snapshot_whose_json_has_the_wrong_shape_falls_back_to_the_one_before_it(
        fresh_pg_url: str, column: str, value: str, caplog: pytest.LogCaptureFixture) -> None:
    import json

    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    sa = LearnerSync(a, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="a")
    a.update(tuple(np.full(D, 0.1)), 1.0)
    good = sa.snapshot()
    name, version = sa.key
    row = {"delta_marks": "{}", "state": json.dumps(a.state_dict()), column: value}
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        bad = conn.execute("INSERT INTO learner_snapshots (learner, version, replica, watermark, n_updates,"
                           " delta_marks, state) VALUES (%s, %s, 'x', now(), 1, %s, %s) RETURNING id",
                           (name, version, row["delta_marks"], row["state"])).fetchone()
    assert bad is not None
    b = LinUCB(D, seed=2)
    with caplog.at_level("ERROR", logger="learners.sync"):
        report = LearnerSync(b, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="b").restore()
    assert report.snapshot_id == good and b.n_updates == 1
    message = next(r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage())
    assert f"snapshot {bad[0]} of {name}@{version}" in message and column in message, message


def test_with_no_snapshot_that_loads_a_replica_starts_fresh_and_takes_the_deltas(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    sa = LearnerSync(a, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="a")
    a.update(tuple(np.full(D, 0.1)), 1.0)
    sa.sync()  # seq 1 of replica a
    name, version = sa.key
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO learner_snapshots (learner, version, replica, watermark, n_updates, delta_marks,"
                     " state) VALUES (%s, %s, 'x', now(), 1, '[]', 'null')", (name, version))
    b = LinUCB(D, seed=2)
    report = LearnerSync(b, LearnerStore(fresh_pg_url), FEATURE_NAMES, replica="b").restore()
    assert (report.snapshot_id, report.deltas, b.n_updates) == (None, 1, 1)
