"""The request's own constraints: its modality (locate stage) and its cost cap (a built-in rule)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from decision.budget import BUDGET_RULE_ID
from decision.domain import RequestContext
from decision.engine import DecisionEngine
from decision.errors import InvalidArgument, NoCandidate
from decision.fleet import Fleet
from decision.scoring import BasicFeatures
from learners.epsilon_greedy import EpsilonGreedy
from policies.bundle import DEFAULT_BUNDLE, compile_bundle
from policies.guard import PolicyGuard
from tests.spine_support import demo_engine


def _req(**kw: Any) -> RequestContext:
    base: dict[str, Any] = {"request_id": "r1", "tenant": "globex", "model_family": "llama",
                            "client_region": "eu-west", "estimated_input_tokens": 800, "expected_output_tokens": 200}
    base.update(kw)
    return RequestContext(**base)


# -- modality ------------------------------------------------------------------------------------
def test_a_model_asked_for_another_modality_is_an_invalid_argument_naming_what_it_takes(demo_fleet: Fleet) -> None:
    eng = demo_engine(demo_fleet)
    with pytest.raises(InvalidArgument) as err:
        eng.decide(_req(model="sdxl-1.0", model_family="", modality="text"))
    assert err.value.field == "modality" and "image" in err.value.message and "sdxl-1.0" in err.value.message
    with pytest.raises(InvalidArgument, match="modality: model family llama takes text requests, not image"):
        eng.decide(_req(modality="image"))


def test_only_endpoints_taking_the_modality_are_located(demo_fleet: Fleet) -> None:
    eng = demo_engine(demo_fleet)
    # A multimodal model also takes text-only requests; an image generator does not.
    d = eng.decide(_req(model_family="llava", modality="text"))
    assert demo_fleet.by_id[d.route.endpoint_id].modality == "multimodal"
    d = eng.decide(_req(model_family="llama", modality="text"))
    located = d.trace["stages"]["locate"]["candidates"]
    assert located and all(demo_fleet.by_id[e].modality == "text" for e in located)


def test_an_unset_modality_is_the_models_own(demo_fleet: Fleet) -> None:
    eng = demo_engine(demo_fleet)
    assert eng.decide(_req(model="sdxl-1.0", model_family="", modality="")).request.modality == "image"
    assert eng.decide(_req(model_family="llava", modality="")).request.modality == "multimodal"
    assert eng.decide(_req(modality="")).request.modality == "text"


# -- the cost cap --------------------------------------------------------------------------------
def _costs(eng: DecisionEngine, **kw: Any) -> dict[str, float]:
    d = eng.decide(_req(**kw))
    return {row["endpoint_id"]: row["expected_cost_per_1k_tokens"] for row in d.trace["stages"]["score"]["candidates"]}


@pytest.mark.parametrize("guarded", ["builtin", "policies"])
def test_no_decision_goes_over_the_requests_cost_cap_even_while_exploring(demo_fleet: Fleet, guarded: str) -> None:
    # No safe set: exploration may pick any arm it is offered, so only the cap keeps costly ones out.
    explorer = EpsilonGreedy(len(BasicFeatures.names), epsilon=0.5, seed=3, safe_slack=None)
    eng = demo_engine(demo_fleet, PolicyGuard(compile_bundle(DEFAULT_BUNDLE)) if guarded == "policies" else None,
                      learner=explorer)
    costs = _costs(eng)
    cap = sorted(costs.values())[len(costs) // 2]  # about half of the allowed candidates are over it
    over = {e for e, c in costs.items() if c > cap}
    assert over and len(over) < len(costs)
    chosen = set()
    for i in range(60):
        d = eng.decide(_req(request_id=f"r{i}", max_cost_per_1k_tokens=cap))
        chosen.add(d.route.endpoint_id)
        assert d.expected_cost_per_1k_tokens <= cap
        assert d.route.endpoint_id not in over and not {f.endpoint_id for f in d.fallbacks} & over
    assert len(chosen) > 1  # the learner did explore, among what the cap allows
    removed = d.trace["stages"]["guard"]["removed"]
    by_cap = {e for e, rules in removed.items() if BUDGET_RULE_ID in rules}
    assert by_cap == over and all(removed[e] == [BUDGET_RULE_ID] for e in by_cap)  # judged only if allowed
    budget = [v for v in d.trace["stages"]["guard"]["verdicts"] if v["rule_id"] == BUDGET_RULE_ID]
    assert {v["endpoint_id"] for v in budget} == set(costs)  # each allowed candidate judged once
    assert all(("over the request's cap" in v["reason"]) == (not v["allow"]) for v in budget)
    assert set(d.trace["stages"]["guard"]["allowed"]) == set(costs) - over


def test_a_cap_below_every_candidate_denies_naming_the_rule(demo_fleet: Fleet) -> None:
    eng = demo_engine(demo_fleet, PolicyGuard(compile_bundle(DEFAULT_BUNDLE)))
    cheapest = min(_costs(eng).values())
    with pytest.raises(NoCandidate) as err:
        eng.decide(_req(request_id="poor", max_cost_per_1k_tokens=cheapest * 0.99))
    assert BUDGET_RULE_ID in str(err.value)
    assert eng.stats["denied"] == 1
    # No cap (0) and a generous one change nothing.
    assert eng.decide(_req(request_id="rich", max_cost_per_1k_tokens=cheapest * 1e6)).expected_cost_per_1k_tokens > 0


def test_grpc_answers_failed_precondition_naming_the_cost_rule(demo_fleet: Fleet) -> None:
    from decision.grpc_server import DecisionServicer, build_server
    from decision.metrics import ServiceMetrics
    from infermesh.decision.v1 import decision_pb2 as pb
    from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

    eng = demo_engine(demo_fleet)
    server, port, _ = build_server(DecisionServicer(eng, ServiceMetrics()), address="127.0.0.1:0", threads=4)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            req = pb.DecideRequest(request_id="g1", tenant="globex", model="sdxl-1.0", client_region="eu-west",
                                   max_cost_per_1k_tokens=1e-12)
            with pytest.raises(grpc.RpcError) as err:
                stub.Decide(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert BUDGET_RULE_ID in (err.value.details() or "")
            req.max_cost_per_1k_tokens = 0.0  # unset modality: the model's own (image), so it is routed
            assert stub.Decide(req, timeout=10).route.model == "sdxl-1.0"
            req.modality = "text"
            with pytest.raises(grpc.RpcError) as err:
                stub.Decide(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "modality" in (err.value.details() or "")
    finally:
        server.stop(0)


def test_a_family_default_comes_from_what_is_deployed_and_a_mixed_family_is_not_narrowed() -> None:
    from decision.fleetgen import demo_fleet

    doc = demo_fleet()
    doc["models"].append({"name": "sdxl-captioner", "family": "sdxl", "modality": "text", "safety_tier": "general",
                          "params_b": 3.0})
    fleet = Fleet.from_mapping(doc)  # listed, not deployed: the family still takes image requests
    assert fleet.default_modality("", "sdxl") == "image"
    assert demo_engine(fleet).decide(_req(model_family="sdxl", modality="")).request.modality == "image"
    doc["deployments"].append({"id": "eu-west-dc1-n1/sdxl-captioner", "node": "eu-west-dc1-n1",
                               "model": "sdxl-captioner", "address": "10.0.15.99:8000", "runtime": "vllm",
                               "max_concurrency": 8, "warm": True})
    mixed = Fleet.from_mapping(doc)
    assert mixed.default_modality("", "sdxl") == ""
    d = demo_engine(mixed).decide(_req(model_family="sdxl", modality=""))
    assert set(d.trace["stages"]["locate"]["candidates"]) == {e.endpoint_id for e in mixed.by_family["sdxl"]}
