"""What the simulator measures and charges: when outcome reports reach the router, decision waits of
requests still queued at the end of a run, and the decision time charged to ``NAME+guard`` peers."""

from __future__ import annotations

import time
from typing import Any

import pytest

from sim import runner
from sim.engine import CLIENT_TO_ROUTER_S, JOB_OUTCOME, RunConfig, Simulation
from sim.metrics import _pcts
from sim.model import DONE, DROPPED, Request
from sim.rules import breaks_rules
from sim.scenario import Scenario
from sim.strategies import registry
from sim.strategies.base import Strategy
from sim.strategies.infermesh import InferMesh
from sim.strategies.peers import LeastLoad
from sim.testing import tiny_scenario
from sim.workload import RequestSpec, Tenant


def _run(sc: Scenario, strategy: Strategy, specs: list[RequestSpec] | None = None, *, workers: int = 1,
         decision_time: str = "0") -> tuple[Simulation, dict[str, Any]]:
    opts = runner.Options(decision_time=decision_time, workers=workers)
    world = runner.build_world(sc, opts)
    cfg = RunConfig(duration_s=sc.duration_s, drain_s=sc.drain_s, telemetry_period_s=sc.telemetry_period_s,
                    decision_time=decision_time, seed=sc.seed, workers=workers)
    load = specs if specs is not None else runner.workload_for(sc, world, opts, sc.seed, sc.duration_s)
    sim = Simulation(world, load, sc.tenants, strategy, cfg)
    sim.requests_log = []
    sim.jobs_log = []
    m = sim.run()
    return sim, m.summary(world, sim.busy_seconds())


# -- 1. an outcome report reaches the router when the client is done, not when the endpoint is --

class _HeardAt(InferMesh):
    """The deterministic pipeline, remembering the simulated time at which each outcome report is taken."""

    def __init__(self) -> None:
        super().__init__("least-ttft", seed=1)
        self.heard: dict[int, float] = {}

    def on_complete(self, req: Request, node: int, ok: bool) -> None:
        self.heard[req.rid] = self.view.now
        super().on_complete(req, node, ok)


class _PeerHeardAt(LeastLoad):
    """least_load (no decision workers), remembering when it hears of each outcome."""

    def __init__(self) -> None:
        self.heard: dict[int, float] = {}

    def on_complete(self, req: Request, node: int, ok: bool) -> None:
        self.heard[req.rid] = self.view.now


def _two_regions_specs(cap: int) -> list[RequestSpec]:
    # Clients in both cells' regions (0.5 ms within a cell, 25 ms across), spaced so nothing queues;
    # request 3 is larger than an endpoint's whole KV cache: refused on arrival at the endpoint.
    specs = [RequestSpec(0.05 * k, 300, 40, 0, f"cell{k % 2}", "", ()) for k in range(8)]
    specs[3] = RequestSpec(0.15, cap, 1, 0, "cell1", "", ())
    return specs


@pytest.mark.parametrize("kind", ["pipeline", "peer"])
def test_an_outcome_report_reaches_the_router_when_the_client_is_done(kind: str) -> None:
    sc = tiny_scenario(cells=2, per_cell=1, concurrency=4, duration=2.0, drain=30.0)
    world = runner.build_world(sc, runner.Options(decision_time="0"))
    specs = _two_regions_specs(world.params[0].kv_capacity_tokens)
    strat: _HeardAt | _PeerHeardAt = _HeardAt() if kind == "pipeline" else _PeerHeardAt()
    sim, s = _run(sc, strat, specs)
    assert sim.requests_log is not None and len(sim.requests_log) == 8
    assert s["completed"] == 7 and s["dropped"] == {"exceeds KV capacity": 1}
    for r in sim.requests_log:
        if r.state == DONE:
            # done_at is when the client has the response's end: the endpoint finished half an RTT before.
            half_rtt = float(world.rtt_ms[r.region, r.winner]) / 2000.0
            assert half_rtt > 0.0
            assert strat.heard[r.rid] == pytest.approx(r.done_at + CLIENT_TO_ROUTER_S, abs=1e-12)
        else:
            assert r.state == DROPPED
            # Refused on reaching an endpoint (either refuses it); the error travels back half an RTT,
            # as a response would: a whole RTT at least after the arrival (exactly: the next test).
            assert strat.heard[r.rid] >= r.arrival + float(world.rtt_ms[r.region].min()) / 1000.0 - 1e-12
    if kind == "pipeline":  # through the worker: the report came to its FIFO at that time too
        assert sim.jobs_log is not None
        came = sorted(c for _, k, c, _, _ in sim.jobs_log if k == JOB_OUTCOME)
        assert came == pytest.approx(sorted(strat.heard.values()), abs=1e-12)


def test_a_refused_request_is_reported_a_whole_rtt_after_its_decision() -> None:
    # One endpoint: the dispatch travels half an RTT (plus the prompt's transfer) to it, is refused there,
    # and the error takes the other half back to the client, where the router hears of it.
    sc = tiny_scenario(cells=1, per_cell=1, concurrency=1, duration=1.0, drain=10.0)
    world = runner.build_world(sc, runner.Options(decision_time="0"))
    cap = world.params[0].kv_capacity_tokens
    strat = _HeardAt()
    _, s = _run(sc, strat, [RequestSpec(0.1, cap, 1, 0, "cell0", "", ())])
    assert s["dropped"] == {"exceeds KV capacity": 1}
    rtt_s = float(world.rtt_ms[0, 0]) / 1000.0
    transfer = cap * world.bytes_per_token / float(world.bandwidth_Bps[0, 0])
    assert strat.heard[0] == pytest.approx(0.1 + rtt_s + transfer + CLIENT_TO_ROUTER_S, abs=1e-12)


def test_a_strategy_that_learns_nothing_from_outcomes_gets_no_report_events() -> None:
    sc = tiny_scenario(cells=1, per_cell=2, duration=2.0, drain=30.0)
    plain = registry.make("least_load", 1)
    assert not plain.hears_outcomes and not registry.make("least_load+guard", 1).hears_outcomes
    assert _PeerHeardAt().hears_outcomes and registry.make("infermesh", 1).hears_outcomes
    _, a = _run(sc, plain)
    _, b = _run(sc, _PeerHeardAt())
    assert a["ttft_ms"] == b["ttft_ms"]
    assert b["heap_events"] == a["heap_events"] + a["completed"]  # one report event per request heard of


# -- 2. decision waits of requests still queued at a worker when the run ends --

def test_requests_still_queued_at_the_end_count_their_wait_so_far_in_decision_wait() -> None:
    # One worker at 40 ms a decision (plus OUTCOME_SHARE of it per report) against 60 req/s: load 2.8,
    # and no drain, so most requests are still waiting for the worker when the run stops at 10 s.
    sc = tiny_scenario(rps=60.0, duration=10.0, drain=0.0, concurrency=16, seed=3)
    sim, s = _run(sc, registry.make("infermesh:least-ttft", 3), decision_time="40000")
    assert sim.requests_log is not None
    decided = [(r.decided_at - r.arrival) * 1000.0 for r in sim.requests_log if r.decided_at >= 0.0]
    waiting = [(10.0 - r.arrival) * 1000.0 for r in sim.requests_log if r.decided_at < 0.0]
    assert len(waiting) > 100
    assert s["decision_queued_at_end"] == len(waiting)
    assert s["decision_wait_ms"] == _pcts(decided + waiting)
    assert s["decision_wait_ms_decided"] == _pcts(decided)
    # The decided alone understate the wait: the longest waits are the ones never finished.
    assert s["decision_wait_ms"]["p50"] > s["decision_wait_ms_decided"]["p50"]
    assert s["decision_wait_ms"]["p99"] > s["decision_wait_ms_decided"]["p99"]


def test_a_run_that_drains_its_queue_has_nothing_queued_at_the_end() -> None:
    sc = tiny_scenario(rps=60.0, duration=5.0, drain=60.0, concurrency=16, seed=3)
    _, s = _run(sc, registry.make("infermesh:least-ttft", 3), decision_time="20000")
    assert s["decision_queued_at_end"] == 0 and s["decision_wait_ms"] == s["decision_wait_ms_decided"]
    assert s["decision_wait_ms"]["p50"] > 0.0  # it did queue (load 1.4) before the queue drained
    _, peer = _run(sc, registry.make("least_load", 3), decision_time="20000")
    assert peer["decision_queued_at_end"] is None and peer["decision_wait_ms_decided"] is None


# -- 3. decision time charged to a guarded peer: its own choice, not the simulator's rule check --

def test_a_guarded_peer_is_charged_its_choice_not_the_simulators_rule_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make the simulator's rule check cost 1 ms an endpoint: with 8 endpoints a decision that included it
    # would be charged >= 8 ms. The guarded peer's charged time is its peer's choice over the allowed set.
    calls = [0]

    def slow_rules(world: Any, req: Request, node: int) -> bool:
        calls[0] += 1
        time.sleep(0.001)
        return breaks_rules(world, req, node)

    monkeypatch.setattr("sim.strategies.base.breaks_rules", slow_rules)
    sc = tiny_scenario(rps=20.0, duration=1.0, drain=30.0)
    sim, s = _run(sc, registry.make("least_load+guard", 1), decision_time="measured")
    assert s["requests"] > 5 and s["completed"] == s["requests"]
    assert calls[0] == 8 * s["requests"]  # the rules were checked for every candidate of every request
    assert s["decision_us"]["p50"] < 4000.0 and s["decision_us"]["p99"] < 8000.0
    # A fixed decision time (bit-reproducible runs) charges every strategy the same.
    sim, s = _run(sc, registry.make("least_load+guard", 1), decision_time="300")
    assert set(sim.metrics.decision_us) == {300.0}


def test_a_guarded_peer_still_drops_what_no_allowed_endpoint_serves() -> None:
    sc = tiny_scenario(rps=20.0, duration=1.0, drain=30.0,
                       tenants=[Tenant("nowhere", jurisdictions=("XX",), ttft_target_ms=500.0)])
    _, s = _run(sc, registry.make("least_load+guard", 1))
    assert s["requests"] > 5 and s["dropped"] == {"no allowed endpoint": s["requests"]}
    assert s["guardrail_violations"] == 0
