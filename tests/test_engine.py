"""The in-process pipeline on the demo fleet: locate -> guard -> score -> choose -> audit."""

from __future__ import annotations

from typing import Any

import pytest

from decision.domain import Outcome, OutcomeStatus, RequestContext
from decision.errors import InvalidArgument, NoCandidate, NotFound, QuotaExceeded
from decision.telemetry import GPU_TEMP_C, QUEUE_WAITING, XID_ERRORS
from decision.trace_format import expand_trace
from tests.spine_support import ScriptedGuard, demo_engine


def _req(**kw: Any) -> RequestContext:
    base: dict[str, Any] = {"request_id": "r1", "tenant": "globex", "model_family": "llama",
                            "client_region": "eu-west", "estimated_input_tokens": 800, "expected_output_tokens": 200}
    base.update(kw)
    if "model" in kw and "model_family" not in kw:  # an exact model names its own family
        base["model_family"] = ""
    return RequestContext(**base)


class RecordingSink:
    def __init__(self) -> None:
        self.decisions: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []

    def submit_decision(self, event: Any) -> None:
        self.decisions.append(dict(event))

    def submit_outcome(self, event: Any) -> None:
        self.outcomes.append(dict(event))

    def close(self) -> None:
        pass


class RecordingLearner:
    name, version = "recording", "1"

    def __init__(self) -> None:
        self.updates: list[tuple[tuple[float, ...], float]] = []

    def choose(self, ctx: Any, arms: Any) -> Any:
        from learners.least_ttft import LeastExpectedTtft

        return LeastExpectedTtft().choose(ctx, arms)

    def update(self, features: Any, reward: float) -> None:
        self.updates.append((tuple(features), reward))


def test_decision_routes_to_an_endpoint_serving_the_family_with_distinct_ordered_fallbacks(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    eng = demo_engine(demo_fleet)
    d = eng.decide(_req())
    chosen = demo_fleet.by_id[d.route.endpoint_id]
    assert chosen.family == "llama"
    assert d.propensity == 1.0
    assert len(d.fallbacks) == 3
    ids = [d.route.endpoint_id, *(f.endpoint_id for f in d.fallbacks)]
    assert len(set(ids)) == len(ids)
    scores = {row["endpoint_id"]: row["score"] for row in d.trace["stages"]["score"]["candidates"]}
    assert scores[ids[0]] >= scores[ids[1]] >= scores[ids[2]] >= scores[ids[3]]
    assert d.trace["stages"]["choose"]["chosen"] == d.route.endpoint_id
    assert d.policy_revision == eng.guard.revision
    assert "least-ttft" in d.reason


def test_least_expected_ttft_avoids_a_queued_endpoint(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    eng = demo_engine(demo_fleet)
    first = eng.decide(_req(model="llama-3.1-8b")).route.endpoint_id
    eng.telemetry.update_endpoint(first, {QUEUE_WAITING: 500.0})
    second = eng.decide(_req(model="llama-3.1-8b", request_id="r2")).route.endpoint_id
    assert second != first


def test_builtin_health_rule_removes_hot_and_xid_gpus(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    eng = demo_engine(demo_fleet)
    eps = demo_fleet.by_model["llama-3.1-70b"]
    eng.telemetry.update_node(eps[0].node_id, {GPU_TEMP_C: 95.0})
    eng.telemetry.update_node(eps[1].node_id, {XID_ERRORS: 79.0})
    d = eng.decide(_req(model="llama-3.1-70b"))
    removed = d.trace["stages"]["guard"]["removed"]
    assert removed == {eps[0].endpoint_id: ["builtin.health"], eps[1].endpoint_id: ["builtin.health"]}
    assert d.route.endpoint_id not in removed
    assert all(f.endpoint_id not in removed for f in d.fallbacks)


def test_trace_records_candidates_verdicts_features_and_telemetry_ages(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    eng = demo_engine(demo_fleet)
    ep = demo_fleet.by_model["sdxl-1.0"][0]
    eng.telemetry.update_endpoint(ep.endpoint_id, {QUEUE_WAITING: 1.0})
    d = eng.decide(_req(model="sdxl-1.0", modality="image"))
    t = d.trace
    assert t["stages"]["locate"]["candidates"] == [e.endpoint_id for e in demo_fleet.by_model["sdxl-1.0"]]
    assert len(t["stages"]["guard"]["verdicts"]) == len(demo_fleet.by_model["sdxl-1.0"])
    row = t["stages"]["score"]["candidates"][0]
    assert set(row) >= {"endpoint_id", "features", "expected_ttft_ms", "expected_cost_per_1k_tokens", "score"}
    assert QUEUE_WAITING in t["telemetry"][ep.endpoint_id]["ages_s"]
    assert t["inventory_revision"] == demo_fleet.revision
    assert set(t["timings_us"]) >= {"locate", "guard", "score", "choose"}


def test_errors_are_typed_and_name_the_field_or_rules(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    eng = demo_engine(demo_fleet, guard=ScriptedGuard(deny_substring="/", quota_tenant="greedy"))
    with pytest.raises(InvalidArgument) as e1:
        eng.decide(_req(tenant=""))
    assert e1.value.field == "tenant"
    with pytest.raises(InvalidArgument) as e2:
        eng.decide(_req(estimated_input_tokens=-5))
    assert e2.value.field == "estimated_input_tokens"
    with pytest.raises(NotFound):
        eng.decide(_req(model="gpt-17"))
    with pytest.raises(NotFound):
        eng.decide(_req(model_family="nope"))
    with pytest.raises(NoCandidate) as e3:
        eng.decide(_req())
    assert e3.value.rules == ("test.deny-substring",)
    assert not isinstance(e3.value, QuotaExceeded)
    with pytest.raises(QuotaExceeded) as e4:
        eng.decide(_req(tenant="greedy"))
    assert e4.value.rules == ("quota.rpm",)


def test_denials_are_audited_with_their_rules(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    sink = RecordingSink()
    eng = demo_engine(demo_fleet, guard=ScriptedGuard(deny_substring="/"), audit=sink)
    with pytest.raises(NoCandidate) as err:
        eng.decide(_req())
    [event] = sink.decisions
    assert event["status"] == "denied"
    assert event["deny_rules"] == ["test.deny-substring"]
    assert event["decision_id"] == err.value.decision_id
    assert expand_trace(event["trace"])["stages"]["choose"]["chosen"] is None


def test_outcome_updates_the_learner_once_and_is_idempotent(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    learner = RecordingLearner()
    sink = RecordingSink()
    eng = demo_engine(demo_fleet, learner=learner, audit=sink)
    d = eng.decide(_req(ttft_target_ms=400.0))
    res = eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=200.0, output_tokens=10))
    again = eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=200.0, output_tokens=10))
    assert not res.duplicate and again.duplicate
    assert res.reward == 1.0 and again.reward == 1.0
    assert len(learner.updates) == 1
    chosen_row = next(r for r in d.trace["stages"]["score"]["candidates"] if r["endpoint_id"] == d.route.endpoint_id)
    assert learner.updates[0][0] == pytest.approx(tuple(chosen_row["features"].values()), abs=1e-4)
    assert len(sink.outcomes) == 1
    with pytest.raises(NotFound):
        eng.report_outcome(Outcome("no-such-decision", OutcomeStatus.OK))
    with pytest.raises(InvalidArgument):
        eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=-1.0))


def test_missing_outcomes_become_failure_signals_after_the_timeout(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    now = [1000.0]
    learner = RecordingLearner()
    eng = demo_engine(demo_fleet, learner=learner, outcome_timeout_s=60.0, clock=lambda: now[0])
    eng.telemetry._clock = lambda: now[0]
    d = eng.decide(_req())
    assert eng.expire_outcomes() == 0
    now[0] += 61.0
    assert eng.expire_outcomes() == 1
    assert learner.updates[0][1] == -1.0
    late = eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=10.0))
    assert not late.duplicate and late.reward is None and len(learner.updates) == 1  # recorded, not learnt again
    assert eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=10.0)).duplicate


def test_decision_ids_are_time_ordered_uuids(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from decision.engine import new_decision_id

    ids = [new_decision_id(1_700_000_000.0 + i) for i in range(5)]
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)


def test_huge_candidate_sets_are_cut_to_the_nearest_endpoints() -> None:
    from decision.fleet import Fleet
    from decision.fleetgen import synthetic_fleet

    fleet = Fleet.from_mapping(synthetic_fleet(512, per_model=128, seed=3))
    eng = demo_engine(fleet, max_candidates=16)
    ctx = RequestContext("r", "t", model="model-0", client_region="r0")
    located = eng.locate(fleet, ctx, 0.0)
    assert len(located) == 16
    everyone = sorted(fleet.topology.rtt_ms("r0", e.site_id) for e in fleet.by_model["model-0"])
    assert sorted(c.rtt_ms for c in located) == everyone[:16]
    d = eng.decide(ctx)
    assert d.route.endpoint_id in {c.endpoint.endpoint_id for c in located}


def test_in_flight_requests_count_as_load_until_their_outcome(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    """Telemetry is seconds old; the router's own in-flight count is not: a burst must spread."""
    eng = demo_engine(demo_fleet, outcome_timeout_s=60.0)
    ctx = _req(model="llama-3.1-70b", client_region="us-east", estimated_input_tokens=2000,
               expected_output_tokens=500)
    first = eng.decide(ctx)
    chosen = [eng.decide(_req(**{**ctx.as_dict(), "request_id": f"b{i}",
                                  "allowed_jurisdictions": ()})).route.endpoint_id for i in range(300)]
    assert len(set(chosen)) > 1  # with no telemetry change, the burst still spreads
    assert eng.inflight(first.route.endpoint_id) >= 1
    before = eng.inflight(first.route.endpoint_id)
    eng.report_outcome(Outcome(first.decision_id, OutcomeStatus.OK, ttft_ms=100.0))
    assert eng.inflight(first.route.endpoint_id) == before - 1
    assert sum(eng.inflight(e.endpoint_id) for e in demo_fleet.by_model["llama-3.1-70b"]) == 300


def test_without_in_flight_counting_a_burst_herds_on_stale_telemetry(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    eng = demo_engine(demo_fleet, count_inflight=False)
    ctx = _req(model="llama-3.1-70b", client_region="us-east")
    chosen = {eng.decide(_req(**{**ctx.as_dict(), "request_id": f"b{i}", "allowed_jurisdictions": ()})
                         ).route.endpoint_id for i in range(50)}
    assert len(chosen) == 1


def test_client_locations_the_inventory_does_not_know_share_one_placement(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    """A client region is free text: each unknown one must not hold a placement (and paths) of its own."""
    engine = demo_engine(demo_fleet)
    known = engine.decide(_req(client_region="eu-west"))
    engine.decide(_req(client_region=""))
    for i in range(300):
        d = engine.decide(_req(request_id=f"far-{i}", client_region=f"atlantis-{i}"))
        assert d.request.client_region == f"atlantis-{i}"  # the request (and its trace) keep what was sent
        assert d.trace["request"]["client_region"] == f"atlantis-{i}"
    assert known.route.region == "eu-west"
    assert len(engine._placement) == 2  # eu-west and every unknown location as one
