"""Outcomes that must not be learnt or recorded: refused decisions, concurrent duplicates, denials."""

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

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.decisions: list[Mapping[str, Any]] = []
        self.outcomes: list[Mapping[str, Any]] = []

    def submit_decision(self, event: Mapping[str, Any]) -> None:
        if self.refuse:
            raise Unavailable("audit queue full (fail-closed)")
        self.decisions.append(event)

    def submit_outcome(self, event: Mapping[str, Any]) -> None:
        self.outcomes.append(event)

    def close(self) -> None:
        pass


class _Log:
    """A trace reader holding fixed records, as the audit log would answer after a restart."""

    def __init__(self, records: dict[str, dict[str, Any]]) -> None:
        self.records = records

    def get_decision(self, decision_id: str) -> dict[str, Any] | None:
        return self.records.get(decision_id)


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
    clock[0] += 11.0
    assert engine.expire_outcomes() == 0
    assert learner.n_updates == 0


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
