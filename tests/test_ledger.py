"""The router's own-traffic ledger (in flight, prefill backlog, outcome-calibrated slowness) and
what the score stage makes of it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from decision.domain import Outcome, OutcomeStatus, RequestContext
from decision.fleet import Fleet
from decision.gpu_profiles import batch_half
from decision.ledger import EndpointLedger
from decision.scoring import ADDED_DELAY_WEIGHT
from sim.service import service_params
from tests.spine_support import demo_engine


def test_prefill_backlog_queues_prompts_one_after_another_and_drains_with_the_clock() -> None:
    led = EndpointLedger()
    led.sent("a", now=100.0, prefill_s=0.5)
    led.sent("a", now=100.2, prefill_s=0.5)  # waits for the first: due at 101.0
    inflight, backlog, slow, rate = led.columns(["a", "b"], now=100.4)
    assert inflight.tolist() == [2.0, 0.0]
    np.testing.assert_allclose(backlog, [600.0, 0.0])
    assert slow.tolist() == [1.0, 1.0]
    # Two requests in the last half second, counted over a 5 s window (decayed since).
    np.testing.assert_allclose(rate, [0.2 * math.exp(-0.4 / 5.0) + 0.2 * math.exp(-0.2 / 5.0), 0.0])
    assert led.columns(["a"], now=101.5)[1].tolist() == [0.0]  # drained: never negative
    led.sent("a", now=103.0, prefill_s=0.25)  # an idle endpoint starts from now, not from its past
    np.testing.assert_allclose(led.columns(["a"], now=103.0)[1], [250.0])
    led.done("a")
    led.done("a")
    led.done("a")
    led.done("a")  # one too many (an expired decision's late outcome): the count stays at 0
    assert led.inflight("a") == 0


def test_slowness_follows_observed_over_expected_in_the_log_domain_within_bounds() -> None:
    led = EndpointLedger(alpha=0.25, min_slowness=0.5, max_slowness=4.0)
    for _ in range(60):  # an endpoint three times slower than its numbers say
        led.observed("hot", expected_ms=100.0 * led.slowness("hot"), observed_ms=300.0,
                     slowness=led.slowness("hot"))
    assert led.slowness("hot") == pytest.approx(3.0, rel=1e-3)
    for _ in range(60):  # far slower than the bound
        led.observed("hot", expected_ms=10.0, observed_ms=10_000.0, slowness=1.0)
    assert led.slowness("hot") == pytest.approx(4.0)
    for _ in range(60):
        led.observed("fast", expected_ms=1000.0, observed_ms=1.0, slowness=1.0)
    assert led.slowness("fast") == pytest.approx(0.5)
    led.observed("x", expected_ms=0.0, observed_ms=50.0, slowness=1.0)  # nothing to compare with
    led.observed("x", expected_ms=50.0, observed_ms=math.nan, slowness=1.0)
    assert led.slowness("x") == 1.0
    with pytest.raises(ValueError, match="alpha"):
        EndpointLedger(alpha=0.0)


def _ctx(i: int, **kw: Any) -> RequestContext:
    base: dict[str, Any] = {"request_id": f"r{i}", "tenant": "globex", "model": "llama-3.1-70b",
                            "client_region": "us-east", "estimated_input_tokens": 6000, "expected_output_tokens": 100}
    base.update(kw)
    return RequestContext(**base)


def _score_row(decision: Any, endpoint_id: str) -> dict[str, Any]:
    rows = decision.trace["stages"]["score"]["candidates"]
    return next(r for r in rows if r["endpoint_id"] == endpoint_id)


def test_a_prompt_sent_to_an_endpoint_delays_the_next_ones_there(demo_fleet: Fleet) -> None:
    now = [1000.0]
    eng = demo_engine(demo_fleet, clock=lambda: now[0], outcome_timeout_s=60.0)
    first = eng.decide(_ctx(0))
    x = first.route.endpoint_id
    prefill_ms = _score_row(first, x)["components"]["prefill_ms"]
    assert prefill_ms > 0
    second = eng.decide(_ctx(1))
    again = _score_row(second, x)
    # The first prompt is ahead in x's prefill: the second one's queue there is at least its prefill.
    assert again["components"]["queue_ms"] >= prefill_ms - 1e-9
    assert again["expected_ttft_ms"] >= _score_row(first, x)["expected_ttft_ms"] + prefill_ms - 1e-9
    # ...and it would add its own prefill to every request expected there while the backlog drains
    # (one request in the last instant, over the ledger's 5 s window: 0.2 per s).
    p2 = again["components"]["prefill_ms"]
    added = again["components"]["added_delay_ms"]
    assert added == pytest.approx(ADDED_DELAY_WEIGHT * p2 * 0.2 * (prefill_ms + p2) / 1000.0)
    now[0] += 60.0  # long after: the backlog has drained (the in-flight count has not)
    later = _score_row(eng.decide(_ctx(2)), x)
    assert later["components"]["queue_ms"] < again["components"]["queue_ms"]
    assert later["components"]["added_delay_ms"] < added


def test_one_of_n_routers_counts_each_of_its_requests_n_times() -> None:
    # serve --workers 4 splits the traffic at random: each worker sees a quarter of it, so counting
    # only its own would show endpoints the others keep busy as idle (the simulator's per-worker
    # ledgers, mesh-512 30 s, 4 workers, decision time 0: InferMesh P95 1,791 ms against least_load 1,125;
    # counting each request 4 times: 503).
    one, of_four = EndpointLedger(), EndpointLedger(routers=4)
    for led in (one, of_four):
        led.sent("a", now=10.0, prefill_s=0.1)
        led.sent("a", now=10.0, prefill_s=0.1)
    for (inflight, backlog, _, rate), n in ((one.columns(["a"], now=10.0), 1), (of_four.columns(["a"], now=10.0), 4)):
        assert inflight.tolist() == [2.0 * n]
        assert backlog.tolist() == pytest.approx([200.0 * n])
        assert rate.tolist() == pytest.approx([2.0 * n / one.rate_window_s])
    of_four.done("a")
    assert of_four.inflight("a") == 4
    with pytest.raises(ValueError, match="routers"):
        EndpointLedger(routers=0)


def test_the_service_ledger_counts_for_every_worker_unless_told(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from decision.config import load_config, load_settings
    from decision.service import Service

    root = Path(__file__).resolve().parent.parent
    for extra, env, routers in (("server: {workers: 3}\n", None, 1),  # this process is one (serve --workers 1)
                                ("server: {workers: 3}\ndecision: {routers: 8}\n", "2", 8),
                                ("", "5", 5),  # serve --workers 5 tells each worker in its environment
                                ("", None, 1)):
        if env is None:
            monkeypatch.delenv("INFERMESH_WORKERS", raising=False)
        else:
            monkeypatch.setenv("INFERMESH_WORKERS", env)
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"fleet: {root / 'deploy/demo/fleet.yaml'}\npolicies: {root / 'policies/bundles/default'}\n"
                       + extra)
        service = Service(load_config(cfg), load_settings(), audit_enabled=False)
        try:
            assert service.engine is not None and service.engine.ledger.routers == routers
        finally:
            service.stop(0)


def test_outcomes_slower_than_expected_make_an_endpoint_look_slower(demo_fleet: Fleet) -> None:
    now = [1000.0]
    eng = demo_engine(demo_fleet, clock=lambda: now[0], outcome_timeout_s=60.0)
    first = eng.decide(_ctx(0, estimated_input_tokens=500))
    x = first.route.endpoint_id
    before = _score_row(first, x)["components"]["prefill_ms"]
    eng.report_outcome(Outcome(first.decision_id, OutcomeStatus.OK, ttft_ms=5.0 * first.expected_ttft_ms))
    routes = []
    for i in range(40):  # x answers five times slower than estimated, every other endpoint as estimated
        now[0] += 30.0  # no backlog left between requests
        d = eng.decide(_ctx(100 + i, estimated_input_tokens=500))
        routes.append(d.route.endpoint_id)
        slow = 5.0 if d.route.endpoint_id == x else 1.0
        eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=slow * d.expected_ttft_ms))
    assert eng.ledger.slowness(x) > 1.0  # one or two outcomes are enough to move the traffic (below)
    assert all(eng.ledger.slowness(e) == pytest.approx(1.0) for e in set(routes) - {x})
    assert routes[-1] != x and routes.count(x) < len(routes) / 2  # traffic moved off x
    now[0] += 30.0
    after = eng.decide(_ctx(999, estimated_input_tokens=500))
    assert _score_row(after, x)["components"]["prefill_ms"] == pytest.approx(before * eng.ledger.slowness(x))
    # Errors and cancellations say nothing about speed: they leave the calibration alone.
    s = eng.ledger.slowness(after.route.endpoint_id)
    eng.report_outcome(Outcome(after.decision_id, OutcomeStatus.ERROR, ttft_ms=50_000.0))
    assert eng.ledger.slowness(after.route.endpoint_id) == s


def test_a_full_batch_queues_the_next_request_and_decodes_slower() -> None:
    from decision import _kernels
    from decision.scoring import ESTIMATE_ROWS
    from decision.telemetry import CANONICAL, KV_CACHE_USAGE, QUEUE_RUNNING, QUEUE_WAITING

    k = len(CANONICAL)
    col = {name: i for i, name in enumerate(CANONICAL)}
    numbers = np.array([[16.0, 3000.0, 12.0, 0.0, 0.0002, 80.0]] * 3)
    tel = np.full((3, k), np.nan)
    tel[:, col[QUEUE_WAITING]] = 0.0
    tel[:, col[QUEUE_RUNNING]] = [14.0, 15.0, 16.0]  # room, the last slot, full
    out = np.empty((len(ESTIMATE_ROWS), 3))
    _kernels.estimate(numbers, tel, np.zeros(3), None, None, k, col[QUEUE_RUNNING],
                      col[QUEUE_WAITING], col[KV_CACHE_USAGE], 300.0, 100.0, 0.5, 0.0, 0.0, 5.0, 0.5, 0.0, out)
    queue = out[ESTIMATE_ROWS.index("queue_ms")]
    assert queue[0] == 0.0 and queue[1] == 0.0
    full_rate = 12.0 / (1.0 + 15.0 / 80.0)
    assert queue[2] == pytest.approx(1000.0 * (300.0 / 3000.0 + 100.0 / full_rate) / 16.0)


def test_the_simulator_and_the_fleet_use_one_batch_half(demo_fleet: Fleet) -> None:
    for ep in demo_fleet.endpoints[:12]:
        params_b = demo_fleet.models[ep.model].params_b
        assert ep.batch_half == batch_half(ep.gpu_type, ep.gpu_count, params_b)
        assert service_params(ep, params_b).batch_half == ep.batch_half


def test_learners_rank_by_expected_ttft_plus_the_delay_added_to_later_requests() -> None:
    """The faster arm for this request loses to one that holds nobody up."""
    from decision.domain import ScoredArms
    from learners.least_ttft import LeastExpectedTtft
    from learners.testing import toy_arms

    two = [a.candidate for a in toy_arms([100.0, 120.0])]
    cols = ScoredArms(two, np.zeros((2, 1)), np.array([100.0, 120.0]), np.zeros(2),
                      {"added_delay_ms": np.array([50.0, 0.0])})
    assert cols.rank_ms.tolist() == [150.0, 120.0]
    assert cols.ttft_ms.tolist() == [100.0, 120.0]  # what the decision reports and calibrates on
    assert LeastExpectedTtft().choose(_ctx(1), cols).arm == 1
    plain = ScoredArms(two, np.zeros((2, 1)), np.array([100.0, 120.0]), np.zeros(2), {})
    assert LeastExpectedTtft().choose(_ctx(1), plain).arm == 0


def test_the_demo_worlds_hidden_slow_site_is_learned_from_outcomes_alone(demo_fleet: Fleet) -> None:
    """The demo's outcomes come from its own model (never the decision's estimate), so the calibration
    finds the secretly throttled datacenter that telemetry does not show."""
    from decision.demo_world import DemoWorld
    from decision.errors import DecisionError

    world = DemoWorld(demo_fleet, seed=3)
    slow_site = next(s for s, f in world.site_slowdown.items() if f > 1.0)
    now = [1000.0]
    eng = demo_engine(demo_fleet, clock=lambda: now[0], outcome_timeout_s=600.0)
    for i in range(1500):
        now[0] += 0.05
        req = world.request(i)
        try:
            d = eng.decide(RequestContext(**{k: tuple(v) if isinstance(v, list) else v  # type: ignore[arg-type]
                                             for k, v in req.items()}))
        except DecisionError:
            continue
        status, ttft, latency = world.outcome(d.route.endpoint_id, str(req["client_region"]),
                                              int(req["estimated_input_tokens"]),  # type: ignore[call-overload]
                                              int(req["expected_output_tokens"]))  # type: ignore[call-overload]
        eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK if status == "ok" else OutcomeStatus.ERROR,
                                   ttft_ms=ttft, latency_ms=latency))
    at_slow = [eng.ledger.slowness(e.endpoint_id) for e in demo_fleet.endpoints if e.site_id == slow_site]
    elsewhere = [eng.ledger.slowness(e.endpoint_id) for e in demo_fleet.endpoints
                 if e.site_id != slow_site and eng.ledger.slowness(e.endpoint_id) != 1.0]
    assert elsewhere and max(at_slow) > 1.5 * float(np.median(elsewhere))


def test_the_added_delay_weight_is_configurable_and_zero_ranks_by_own_ttft(demo_fleet: Fleet) -> None:
    from pydantic import ValidationError

    from decision.config import DecisionSection

    now = [1000.0]
    eng = demo_engine(demo_fleet, clock=lambda: now[0], outcome_timeout_s=60.0, added_delay_weight=0.0)
    first = eng.decide(_ctx(0))
    row = _score_row(eng.decide(_ctx(1)), first.route.endpoint_id)
    assert row["components"]["queue_ms"] > 0 and row["components"]["added_delay_ms"] == 0.0
    assert DecisionSection().added_delay_weight == ADDED_DELAY_WEIGHT
    with pytest.raises(ValidationError, match="added_delay_weight"):
        DecisionSection(added_delay_weight=-1.0)


def test_the_cost_weight_prices_cost_in_milliseconds_of_ttft(demo_fleet: Fleet) -> None:
    from pydantic import ValidationError

    from decision.config import DecisionSection
    from decision.scoring import COST_WEIGHT_MS

    def rows(weight: float) -> tuple[str, list[dict[str, Any]]]:
        eng = demo_engine(demo_fleet, clock=lambda: 1000.0, cost_weight_ms=weight)
        # A small model served fast at the edge and cheaply on devices (the built-in guard allows both).
        d = eng.decide(_ctx(0, model="llama-3.2-3b", estimated_input_tokens=300))
        return d.route.endpoint_id, d.trace["stages"]["score"]["candidates"]

    fastest, plain = rows(0.0)
    cheapest, priced = rows(100_000.0)
    assert all("cost_penalty_ms" not in r["components"] for r in plain)  # no weight, no component
    for r in priced:
        c = r["components"]
        assert c["cost_penalty_ms"] == pytest.approx(100_000.0 * r["expected_cost_per_1k_tokens"] * 1000.0)
    by_id = {r["endpoint_id"]: r for r in priced}
    assert by_id[fastest]["expected_ttft_ms"] == min(r["expected_ttft_ms"] for r in priced)
    assert by_id[cheapest]["expected_cost_per_1k_tokens"] == min(r["expected_cost_per_1k_tokens"] for r in priced)
    assert by_id[cheapest]["expected_cost_per_1k_tokens"] < by_id[fastest]["expected_cost_per_1k_tokens"]
    assert DecisionSection().cost_weight_ms == COST_WEIGHT_MS
    with pytest.raises(ValidationError, match="cost_weight_ms"):
        DecisionSection(cost_weight_ms=-1.0)


def test_the_service_reward_prices_cost_as_the_score_stage_does() -> None:
    from decision.config import ServiceConfig
    from decision.service import _build_reward

    # No reward section: the documented defaults (a cancellation is not the route's failure), not the
    # engine's bare TTFT reward.
    plain = _build_reward(ServiceConfig(fleet=Path("f.yaml")))
    assert plain(RequestContext("r", "t"), Outcome("d", OutcomeStatus.CANCELLED), 100.0, 0.001) == 0.0
    assert plain(RequestContext("r", "t"), Outcome("d", OutcomeStatus.ERROR), 100.0, 0.001) == -2.0
    cfg = ServiceConfig.model_validate({"fleet": "f.yaml", "decision": {"cost_weight_ms": 500.0}})
    reward = _build_reward(cfg)
    ctx = RequestContext("r", "t", ttft_target_ms=1000.0)
    ok = Outcome("d", OutcomeStatus.OK, ttft_ms=100.0)
    # TTFT 100 ms plus $0.001/1K at 500 ms = 600 ms of a 1,000 ms target; the budget term w_cost=0.1 x 1.
    assert reward(ctx, ok, 100.0, 0.001) == pytest.approx(1.0 - 0.6 - 0.1)
    assert reward(ctx, ok, 100.0, 0.0) == pytest.approx(1.0 - 0.1)
