"""Outcomes: refused decisions, concurrent duplicates, denials, late outcomes, an audit log that refuses,
and outcomes of decisions another replica made (the audit log is shared)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from decision.domain import Outcome, OutcomeStatus, RequestContext
from decision.engine import DecisionEngine
from decision.errors import InvalidArgument, Unavailable
from decision.fleet import Fleet
from decision.fleetgen import demo_fleet
from decision.health_guard import BuiltinHealthGuard
from decision.telemetry import TelemetryStore
from learners.features import FEATURE_NAMES, RouteFeatures
from learners.linucb import LinUCB


class _Audit:
    """An in-memory audit sink; ``refuse`` makes it refuse decisions as a full fail-closed queue does."""

    def __init__(self, *, refuse: bool = False, refuse_outcomes: bool = False) -> None:
        self.refuse = refuse
        self.refuse_outcomes = refuse_outcomes
        self.decisions: list[Mapping[str, Any]] = []
        self.outcomes: list[Mapping[str, Any]] = []

    def submit_decision(self, event: Mapping[str, Any]) -> None:
        if self.refuse:
            raise Unavailable("audit queue full (fail-closed)")
        self.decisions.append(event)

    def submit_outcome(self, event: Mapping[str, Any]) -> None:
        if self.refuse_outcomes:
            raise Unavailable("audit queue full (fail-closed)")
        self.outcomes.append(event)

    def close(self) -> None:
        pass


class _Log:
    """A trace reader holding fixed records, as the audit log would answer after a restart."""

    def __init__(self, records: dict[str, dict[str, Any]]) -> None:
        self.records = records

    def get_decision(self, decision_id: str) -> dict[str, Any] | None:
        return self.records.get(decision_id)

    def reported_among(self, decision_ids: Any) -> set[str]:
        return {d for d in decision_ids if (self.records.get(d) or {}).get("outcome")}


def _engine(audit: _Audit, clock: list[float], **kw: Any) -> tuple[DecisionEngine, LinUCB]:
    fleet = Fleet.from_mapping(demo_fleet())
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints}, clock=lambda: clock[0])
    learner = LinUCB(len(FEATURE_NAMES), seed=1)
    engine = DecisionEngine(fleet, store, BuiltinHealthGuard(), learner, features=RouteFeatures(), audit=audit,
                            clock=lambda: clock[0], outcome_timeout_s=10.0, **kw)
    return engine, learner


def test_a_decision_the_audit_log_refuses_is_neither_in_flight_nor_learnt() -> None:
    clock = [1000.0]
    engine, learner = _engine(_Audit(refuse=True), clock)
    for i in range(5):
        with pytest.raises(Unavailable):
            engine.decide(RequestContext(f"r{i}", "acme", model="llama-3.1-8b"))
    assert engine.pending_outcomes() == 0
    assert all(engine.inflight(e.endpoint_id) == 0 for e in engine.fleet.endpoints)
    # Nor does it leave a prefill backlog or an arrival rate that would steer later traffic away.
    _, backlog, _, rate = engine.ledger.columns([e.endpoint_id for e in engine.fleet.endpoints], clock[0])
    assert not backlog.any() and not rate.any()
    clock[0] += 11.0
    assert engine.expire_outcomes() == 0
    assert learner.n_updates == 0


def test_a_decision_whose_caller_went_away_is_neither_logged_nor_booked() -> None:
    """A cancelled or timed-out gRPC call still got its decision logged as routed, held in flight and
    later learnt as a timeout (and its quota share was kept)."""
    clock = [1000.0]
    audit = _Audit()
    engine, learner = _engine(audit, clock)
    with pytest.raises(Unavailable, match="caller went away"):
        engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"), alive=lambda: False)
    assert audit.decisions == [] and engine.pending_outcomes() == 0 and engine.stats["decisions"] == 0
    assert all(engine.inflight(e.endpoint_id) == 0 for e in engine.fleet.endpoints)
    clock[0] += 11.0
    assert engine.expire_outcomes() == 0 and learner.n_updates == 0
    engine.decide(RequestContext("r2", "acme", model="llama-3.1-8b"), alive=lambda: True)
    assert len(audit.decisions) == 1 and engine.pending_outcomes() == 1


def test_an_ok_outcome_without_a_ttft_is_learnt_at_the_expected_one() -> None:
    """0 is the API's unset value: it was learnt as a first token faster than any measured."""
    engine, _ = _engine(_Audit(), [1000.0])
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b", ttft_target_ms=400.0))
    got = engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, latency_ms=900.0, output_tokens=20))
    expected = engine.reward(RequestContext("r1", "acme", ttft_target_ms=400.0),
                             Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=d.expected_ttft_ms),
                             d.expected_ttft_ms, d.expected_cost_per_1k_tokens)
    assert got.reward == pytest.approx(expected)


def test_concurrent_duplicate_outcomes_are_recorded_once() -> None:
    audit = _Audit()
    engine, learner = _engine(audit, [1000.0])
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    slow_reward = engine.reward

    def reward(*args: Any) -> float:
        time.sleep(0.2)  # widen the window between taking the decision and recording its outcome
        return slow_reward(*args)

    engine.reward = reward  # type: ignore[assignment]
    results = []
    outcome = Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0, latency_ms=900.0, output_tokens=50)
    threads = [threading.Thread(target=lambda: results.append(engine.report_outcome(outcome))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.duplicate for r in results) == [False, True, True, True]
    assert len(audit.outcomes) == 1 and learner.n_updates == 1
    assert engine.report_outcome(outcome).duplicate  # and once recorded, a retry is one too


def test_an_outcome_for_a_denied_decision_is_refused_naming_the_field() -> None:
    audit = _Audit()
    engine, learner = _engine(audit, [1000.0], traces=_Log({"d-denied": {"status": "denied", "outcome": None}}))
    with pytest.raises(InvalidArgument) as err:
        engine.report_outcome(Outcome("d-denied", OutcomeStatus.OK, ttft_ms=100.0))
    assert err.value.field == "decision_id" and "denied" in err.value.message
    assert audit.outcomes == [] and learner.n_updates == 0


def test_a_late_outcome_is_audited_but_not_learnt_twice() -> None:
    audit, clock = _Audit(), [1000.0]
    engine, learner = _engine(audit, clock)
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    clock[0] += 11.0
    assert engine.expire_outcomes() == 1 and learner.n_updates == 1  # learnt as a timeout...
    (expiry,) = audit.outcomes  # ...and logged as one, with the reward learnt (a restore replays it)
    assert expiry["status"] == "timeout" and expiry["error"].startswith("expired: no outcome was reported within 10")
    assert expiry["reward"] is not None
    late = engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=90.0))
    assert (late.accepted, late.duplicate, late.reward) == (True, False, None)  # recorded, not "already recorded"
    assert [(o["decision_id"], o["status"], o["reward"]) for o in audit.outcomes[1:]] == [(d.decision_id, "ok", None)]
    assert learner.n_updates == 1
    assert engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=90.0)).duplicate


def test_an_outcome_that_arrives_while_its_decision_is_being_timed_out_is_in_time() -> None:
    # The expiry asks the shared log whether another replica has the outcome; one arriving here
    # meanwhile is learnt and logged as in time, and no timeout is logged or learnt after it.
    audit, clock = _Audit(), [1000.0]
    holder: list[Any] = []

    class Log(_Log):
        def reported_among(self, decision_ids: Any) -> set[str]:
            holder.append(engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=90.0)))
            return set()

    engine, learner = _engine(audit, clock, traces=Log({}))
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    clock[0] += 11.0
    assert engine.expire_outcomes() == 1
    (res,) = holder
    assert res.reward is not None and not res.duplicate and learner.n_updates == 1
    assert [(o["status"], o["reward"] is not None) for o in audit.outcomes] == [("ok", True)]
    assert engine.stats["outcomes_missing"] == 0


def test_an_outcome_the_audit_log_refuses_is_recorded_whole_on_the_retry() -> None:
    audit = _Audit(refuse_outcomes=True)
    engine, learner = _engine(audit, [1000.0])
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    outcome = Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0)
    with pytest.raises(Unavailable):
        engine.report_outcome(outcome)
    assert learner.n_updates == 0 and audit.outcomes == []  # neither learnt nor logged: the caller retries
    audit.refuse_outcomes = False
    retry = engine.report_outcome(outcome)
    assert not retry.duplicate and retry.reward is not None  # not "already recorded": it never was
    assert learner.n_updates == 1 and [o["decision_id"] for o in audit.outcomes] == [d.decision_id]
    assert engine.report_outcome(outcome).duplicate


def test_an_outcome_the_audit_log_refused_and_nobody_retried_times_out_like_a_missing_one() -> None:
    clock = [1000.0]
    audit = _Audit(refuse_outcomes=True)
    engine, learner = _engine(audit, clock)
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    with pytest.raises(Unavailable):
        engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0))
    audit.refuse_outcomes = False  # the log is back; this caller (ext_proc's observer, say) never retries
    clock[0] += 11.0
    assert engine.expire_outcomes() == 1 and learner.n_updates == 1
    assert [(o["decision_id"], o["status"]) for o in audit.outcomes] == [(d.decision_id, "timeout")]
    assert engine.expire_outcomes() == 0 and learner.n_updates == 1  # once


def test_an_outcome_names_the_route_or_an_inventory_endpoint() -> None:
    clock = [1000.0]
    engine, learner = _engine(_Audit(), clock)
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    with pytest.raises(InvalidArgument, match="served_endpoint_id"):  # a typo; the decision still waits
        engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0, served_endpoint_id="nowhere"))
    assert engine.pending_outcomes() == 1 and learner.n_updates == 0
    # An inventory reload removed the route's endpoint: naming it is still naming the route.
    fleet = engine.fleet
    spec = demo_fleet()
    spec["deployments"] = [x for x in spec["deployments"] if x["id"] != d.route.endpoint_id]
    engine.set_fleet(Fleet.from_mapping(spec))
    assert d.route.endpoint_id in fleet.by_id and d.route.endpoint_id not in engine.fleet.by_id
    got = engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0,
                                        served_endpoint_id=d.route.endpoint_id))
    assert got.accepted and not got.duplicate and got.reward is not None and got.reward > 0
    assert learner.n_updates == 1


def test_an_outcome_served_by_a_fallback_is_the_routes_failure_on_every_replica() -> None:
    clock = [1000.0]
    deciding, _ = _engine(_Audit(), clock)
    first = deciding.decide(RequestContext("r1", "acme", model="llama-3.1-8b", ttft_target_ms=400.0))
    here = deciding.report_outcome(Outcome(first.decision_id, OutcomeStatus.OK, ttft_ms=100.0,
                                           served_endpoint_id=first.fallbacks[0].endpoint_id))
    d = deciding.decide(RequestContext("r2", "acme", model="llama-3.1-8b", ttft_target_ms=400.0))
    record = {"decision_id": d.decision_id, "status": "routed", "learner": d.learner, "request_id": "r2",
              "tenant": "acme", "user_tier": "standard", "endpoint_id": d.route.endpoint_id,
              "trace": dict(d.trace), "outcome": None}
    other_audit = _Audit()
    other, other_learner = _engine(other_audit, clock, traces=_Log({d.decision_id: record}))
    there = other.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=100.0,
                                         served_endpoint_id=d.fallbacks[0].endpoint_id))
    assert here.reward is not None and here.reward < 0 and there.reward == pytest.approx(here.reward)
    assert other_learner.n_updates == 1 and other.stats["outcomes_by_fallback"] == 1
    assert other_audit.outcomes[0]["error"] == f"served by fallback {d.fallbacks[0].endpoint_id}"
    assert other_audit.outcomes[0]["status"] == "ok"  # the log keeps what happened


def test_an_outcome_of_another_replicas_decision_is_learnt_there_and_not_as_a_timeout_here() -> None:
    clock = [1000.0]
    deciding, deciding_learner = _engine(_Audit(), clock)
    d = deciding.decide(RequestContext("r1", "acme", model="llama-3.1-8b", ttft_target_ms=400.0))
    record = {"decision_id": d.decision_id, "status": "routed", "learner": d.learner, "request_id": "r1",
              "tenant": "acme", "user_tier": "standard", "trace": dict(d.trace), "outcome": None}
    log = _Log({d.decision_id: record})
    other_audit = _Audit()
    other, other_learner = _engine(other_audit, clock, traces=log)  # the replica the client's outcome reached
    outcome = Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=150.0)
    got = other.report_outcome(outcome)
    expected = deciding.reward(RequestContext("r1", "acme", ttft_target_ms=400.0), outcome, d.expected_ttft_ms,
                               d.expected_cost_per_1k_tokens)
    assert got.reward == pytest.approx(expected) and other_learner.n_updates == 1
    assert other_audit.outcomes[0]["reward"] == pytest.approx(expected)  # so a restore can replay it
    # The deciding replica's timeout finds the outcome in the shared log and does not learn a failure.
    record["outcome"] = {"status": "ok", "reward": got.reward}
    deciding.traces = log
    clock[0] += 11.0
    assert deciding.expire_outcomes() == 1 and deciding_learner.n_updates == 0
    assert deciding.stats["outcomes_elsewhere"] == 1


def test_outcome_times_must_be_finite() -> None:
    engine, learner = _engine(_Audit(), [1000.0])
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    nan = float("nan")
    for field, outcome in (("ttft_ms", Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=nan)),
                           ("latency_ms", Outcome(d.decision_id, OutcomeStatus.OK, latency_ms=float("inf")))):
        with pytest.raises(InvalidArgument) as err:
            engine.report_outcome(outcome)
        assert err.value.field == field
    assert learner.n_updates == 0


def test_an_update_a_learner_refuses_does_not_fail_the_outcome_nor_starve_the_shadows() -> None:
    from learners.thompson import LinearThompson

    shadow = LinearThompson(len(FEATURE_NAMES), seed=1)
    engine, learner = _engine(_Audit(), [1000.0], shadow=(shadow,))
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    engine.reward = lambda *_: 1e300  # finite, but overflows the statistics
    got = engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=100.0))
    # Both refused: the acting learner's refusal did not stop the shadow's try, nor fail the outcome.
    assert got.accepted and engine.stats["updates_refused"] == 2
    assert learner.n_updates == shadow.n_updates == 0  # refused whole, nothing half-applied


def test_an_outcome_is_stamped_and_learnt_under_the_snapshot_barrier() -> None:
    """While a learner snapshot holds ``outcome_barrier`` (taking state and watermark), an outcome is
    neither stamped (submitted to the log with its reported_at) nor learnt: it lands wholly after."""
    audit = _Audit()
    engine, learner = _engine(audit, [1000.0])
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    done = threading.Event()
    outcome = Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0, latency_ms=900.0, output_tokens=50)

    def report() -> None:
        engine.report_outcome(outcome)
        done.set()

    with engine.outcome_barrier:
        t = threading.Thread(target=report)
        t.start()
        assert not done.wait(0.3)
        assert audit.outcomes == [] and learner.n_updates == 0
    t.join(5)
    assert done.is_set() and len(audit.outcomes) == 1 and learner.n_updates == 1


def _claims(redis_url: str) -> Any:
    import uuid

    from decision.outcome_claims import RedisOutcomeClaims

    claims = RedisOutcomeClaims(redis_url, ttl_s=60, prefix=f"test-claims:{uuid.uuid4().hex[:8]}")
    if not claims.claim("probe"):
        pytest.fail("a fresh claim namespace refused its first claim")
    if claims.errors:
        pytest.skip(f"no Redis at {redis_url}")
    return claims


def test_an_outcome_retried_at_the_deciding_replica_after_another_learnt_it_is_learnt_once(redis_url: str) -> None:
    # The client's report went to B (found in the shared log, learnt there); B's reply was lost and the
    # retry reached A, which still held the decision: learnt twice, the quota trued up twice.
    clock = [1000.0]
    claims = _claims(redis_url)
    a, a_learner = _engine(_Audit(), clock, claims=claims)
    d = a.decide(RequestContext("r1", "acme", model="llama-3.1-8b", ttft_target_ms=400.0))
    record = {"decision_id": d.decision_id, "status": "routed", "learner": d.learner, "request_id": "r1",
              "tenant": "acme", "user_tier": "standard", "trace": dict(d.trace), "outcome": None}
    b_audit = _Audit()
    b, b_learner = _engine(b_audit, clock, traces=_Log({d.decision_id: record}), claims=claims)
    outcome = Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=150.0, input_tokens=10, output_tokens=20)
    first = b.report_outcome(outcome)
    retry = a.report_outcome(outcome)
    assert not first.duplicate and retry.duplicate
    assert (a_learner.n_updates, b_learner.n_updates) == (0, 1) and len(b_audit.outcomes) == 1
    assert a.inflight(d.route.endpoint_id) == 0 and a.pending_outcomes() == 0  # done with, not left to time out
    assert a.report_outcome(outcome).duplicate and a_learner.n_updates == 0


def test_an_outcome_the_log_refused_gives_its_claim_back_for_the_retry(redis_url: str) -> None:
    clock = [1000.0]
    claims = _claims(redis_url)
    audit = _Audit(refuse_outcomes=True)
    engine, learner = _engine(audit, clock, claims=claims)
    d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    outcome = Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=150.0)
    with pytest.raises(Unavailable):
        engine.report_outcome(outcome)
    audit.refuse_outcomes = False
    got = engine.report_outcome(outcome)  # the retry claims it again and is recorded whole
    assert not got.duplicate and learner.n_updates == 1 and len(audit.outcomes) == 1


def test_an_outcome_that_needs_a_shared_claim_is_not_answered_from_memory(redis_url: str) -> None:
    # An asyncio server answers what holds() says inline, on its loop: a Redis call must not be there.
    clock = [1000.0]
    with_claims, _ = _engine(_Audit(), clock, claims=_claims(redis_url))
    without, _ = _engine(_Audit(), clock)
    for engine, inline in ((with_claims, False), (without, True)):
        d = engine.decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
        assert engine.holds(d.decision_id) is inline
        engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=150.0))
        assert engine.holds(d.decision_id)  # a repeat is answered from memory either way
