"""What the simulator measures and charges: when outcome reports reach the router, decision waits of
requests still queued at the end of a run, the decision time charged to ``NAME+guard`` peers, and when
the router's own outstanding counts drop."""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from sim import runner
from sim.engine import CLIENT_TO_ROUTER_S, JOB_OUTCOME, RunConfig, Simulation
from sim.metrics import _pcts
from sim.model import DONE, DROPPED, Request
from sim.rules import breaks_rules
from sim.scenario import Scenario
from sim.strategies import registry
from sim.strategies.base import RouterView, Strategy
from sim.strategies.infermesh import InferMesh
from sim.strategies.peers import LeastLoad
from sim.testing import tiny_scenario
from sim.workload import RequestSpec, Tenant
from sim.world import I64


def _run(sc: Scenario, strategy: Strategy, specs: list[RequestSpec] | None = None, *, workers: int = 1,
         decision_time: str = "0", flat_limit: int | None = None,
         counts: list[tuple[float, int, float]] | None = None) -> tuple[Simulation, dict[str, Any]]:
    """Run ``strategy``; ``flat_limit`` lowers the router view's (0: every run searches by cell, ranking the
    cells by outstanding load); ``counts`` collects every change of the router's outstanding counts."""
    opts = runner.Options(decision_time=decision_time, workers=workers)
    world = runner.build_world(sc, opts)
    cfg = RunConfig(duration_s=sc.duration_s, drain_s=sc.drain_s, telemetry_period_s=sc.telemetry_period_s,
                    decision_time=decision_time, seed=sc.seed, workers=workers)
    load = specs if specs is not None else runner.workload_for(sc, world, opts, sc.seed, sc.duration_s)
    sim = Simulation(world, load, sc.tenants, strategy, cfg)
    sim.requests_log = []
    sim.jobs_log = []
    if flat_limit is not None:
        sim.view.flat_limit = flat_limit
    if counts is not None:
        sim.view.outstanding = _CountLog.watching(sim.view, counts)
    m = sim.run()
    return sim, m.summary(world, sim.busy_seconds())


class _CountLog(np.ndarray[Any, np.dtype[np.float64]]):
    """The router's outstanding counts, logging each change: (simulated time, endpoint, new count)."""

    router: RouterView
    changes: list[tuple[float, int, float]]

    @classmethod
    def watching(cls, view: RouterView, changes: list[tuple[float, int, float]]) -> _CountLog:
        arr = np.zeros(view.world.n).view(cls)
        arr.router, arr.changes = view, changes
        return arr

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if hasattr(self, "changes"):  # slices and results of arithmetic are plain copies: not logged
            self.changes.append((self.router.now, int(key), float(self[key])))


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


# -- 4. the router's outstanding count drops when the router learns a copy ended --

def _changes(counts: list[tuple[float, int, float]], up: bool) -> dict[int, list[float]]:
    """When each endpoint's outstanding count went up (``up``) or down, in order."""
    out: dict[int, list[float]] = defaultdict(list)
    last: dict[int, float] = defaultdict(float)
    for t, node, v in counts:
        if (v > last[node]) == up:
            out[node].append(t)
        last[node] = v
    return dict(out)


def _sent_to(counts: list[tuple[float, int, float]], t: float) -> int:
    """The endpoint a request decided at ``t`` was sent to (decision time 0: its count rose at ``t``)."""
    nodes = [node for node, times in _changes(counts, up=True).items() if t in times]
    assert len(nodes) == 1, nodes
    return nodes[0]


@pytest.mark.parametrize("name", ["least_load", "power_of_two", "least_load+guard"])
def test_the_routers_outstanding_count_drops_when_the_response_reaches_the_router(name: str) -> None:
    # Two cells 25 ms apart: a response from the other cell's endpoint reaches the client (and the router at
    # its edge) 12.5 ms after the endpoint finished. Request 3 is refused by its endpoint (larger than its KV).
    sc = tiny_scenario(cells=2, per_cell=1, concurrency=4, duration=2.0, drain=30.0)
    world = runner.build_world(sc, runner.Options(decision_time="0"))
    specs = _two_regions_specs(world.params[0].kv_capacity_tokens)
    counts: list[tuple[float, int, float]] = []
    sim, s = _run(sc, registry.make(name, 1), specs, counts=counts)
    assert s["completed"] == 7 and s["dropped"] == {"exceeds KV capacity": 1}
    assert sim.requests_log is not None
    expected: dict[int, list[float]] = defaultdict(list)
    far = 0
    for r in sim.requests_log:
        if r.state == DONE:
            # The response's end reaches the client, and the router at its edge, half an RTT after the
            # endpoint finished: the count drops then, as the outcome report would reach the router.
            expected[r.winner].append(r.done_at + CLIENT_TO_ROUTER_S)
            far += float(world.rtt_ms[r.region, r.winner]) > 1.0
        else:  # refused on reaching its endpoint: the error travels back half an RTT, as a response would
            node = _sent_to(counts, r.arrival)
            transfer = r.in_tokens * world.bytes_per_token / float(world.bandwidth_Bps[r.region, node])
            rtt_s = float(world.rtt_ms[r.region, node]) / 1000.0
            expected[node].append(r.arrival + rtt_s + transfer + CLIENT_TO_ROUTER_S)
    assert far >= 2  # responses from the far cell: the count waits 12.5 ms after the endpoint finished
    got = _changes(counts, up=False)
    assert sorted(got) == sorted(expected)
    for node, times in expected.items():
        assert got[node] == pytest.approx(sorted(times), abs=1e-12)
    assert sim.view.outstanding.tolist() == [0.0, 0.0]  # the run went on until the router's counts came back


def test_the_count_drops_when_the_pipelines_outcome_report_reaches_its_worker() -> None:
    # InferMesh's pipeline learns a completion from its outcome report; on a fleet searched by cell (ranked
    # by the router's outstanding counts) the router's count drops at that same moment, request by request.
    sc = tiny_scenario(cells=2, per_cell=1, concurrency=4, duration=2.0, drain=30.0)
    world = runner.build_world(sc, runner.Options(decision_time="0"))
    specs = _two_regions_specs(world.params[0].kv_capacity_tokens)
    counts: list[tuple[float, int, float]] = []
    strat = _HeardAt()
    sim, s = _run(sc, strat, specs, flat_limit=0, counts=counts)
    assert sim.view.ranks_cells(sc.family)
    assert s["completed"] == 7 and s["dropped"] == {"exceeds KV capacity": 1}
    assert sim.jobs_log is not None
    drops = sorted(t for times in _changes(counts, up=False).values() for t in times)
    reports = sorted(c for _, k, c, _, _ in sim.jobs_log if k == JOB_OUTCOME)
    assert len(drops) == len(reports) == 8
    assert drops == pytest.approx(reports, abs=1e-12)
    assert drops == pytest.approx(sorted(strat.heard.values()), abs=1e-12)


def _trajectory(sim: Simulation) -> str:
    assert sim.requests_log is not None
    rows = [(r.rid, r.winner, repr(r.first_token_at), repr(r.done_at)) for r in sim.requests_log]
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


# Recorded on the simulator before the router's counts waited for the router to learn a copy ended (commit
# fc15c8a), overloaded so that mesh_hedge hedges: every request's endpoint, first-token and completion time
# (hashed), heap events and events. None of these strategies reads the counts on this (flat) fleet: unchanged.
# mesh_hedge's was recorded again when a hedge loser began to wait for its cancel to reach its endpoint
# (before: 13e15e9561f3564f, 1883, 2673): one more event per loser cancelled while travelling or queued.
UNREAD_COUNTS = {
    "baseline_rr": ("1e74c24d86a8c96e", 1581, 2379),
    "gie_like": ("3cf0177251a52f02", 1602, 2422),
    "mesh_hedge": ("869fee80695480a7", 2037, 2827),
    "infermesh:least-ttft": ("59b3b40afe33f731", 1808, 2676),
}


def _overloaded() -> Scenario:
    return tiny_scenario(cells=1, per_cell=2, rps=30.0, duration=5.0, concurrency=2, drain=120.0, seed=3)


@pytest.mark.parametrize("name", sorted(UNREAD_COUNTS))
def test_a_strategy_that_reads_no_outstanding_count_is_unchanged(name: str) -> None:
    sim, s = _run(_overloaded(), registry.make(name, 3))
    assert not registry.make(name, 3).reads_outstanding and not sim.view.ranks_cells("llama")
    assert (_trajectory(sim), s["heap_events"], s["events"]) == UNREAD_COUNTS[name]
    assert s["completed"] == s["requests"] == 157
    assert (s["hedges"] > 100) == (name == "mesh_hedge")
    # Searched by cell, the same strategy reads the counts (to rank the cells): each copy's end reaches the
    # router as an event of its own, the winner's and each cancelled hedge loser's. (One cell: same routes.)
    cell, c = _run(_overloaded(), registry.make(name, 3), flat_limit=0)
    assert _trajectory(cell) == _trajectory(sim)
    assert c["heap_events"] == s["heap_events"] + c["completed"] + c["hedges"]
    assert cell.view.outstanding.tolist() == [0.0, 0.0]


def test_reading_the_counts_is_declared_by_the_strategies_that_do() -> None:
    for name in ("least_load", "power_of_two", "least_load+guard", "power_of_two+guard"):
        assert registry.make(name, 1).reads_outstanding, name
    for name in ("baseline_rr", "heuristic", "mesh", "mesh_hedge", "adaptive_mesh", "predictive_mesh",
                 "hybrid_mesh", "gie_like", "gie_like+guard", "infermesh"):
        assert not registry.make(name, 1).reads_outstanding, name


class _SeesCounts(LeastLoad):
    """least_load, remembering the router's outstanding counts each decision saw (it hears no outcomes)."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def choose(self, req: Request, cands: I64) -> int:
        self.seen[req.rid] = self.view.outstanding.tolist()
        return super().choose(req, cands)


def _one_site_two_sizes() -> Scenario:
    """Two H100 endpoints in one site 40 ms (RTT) from the clients, with 8 and 3 batch slots (so that
    least_load's per-slot counts never tie below)."""
    gpu = {"gpu_type": "H100", "count": 1, "gpu_hour_usd": 2.99, "watts_per_gpu": 700, "model": "llama-3.1-8b"}
    fleet = {"generator": "tiers", "regions": ["eu-west"], "rtt_same_jurisdiction_ms": 10,
             "rtt_cross_jurisdiction_ms": 80, "models": [{"name": "llama-3.1-8b", "family": "llama", "params_b": 8}],
             "tiers": [{"tier": "datacenter", "rtt_ms": 40, "bandwidth_gbps": 100,
                        "gpus": [{**gpu, "max_concurrency": 8}, {**gpu, "max_concurrency": 3}]}]}
    workload = {"arrival": {"type": "poisson", "rps": 1.0}, "input_tokens": {"dist": "const", "value": 100},
                "output_tokens": {"dist": "const", "value": 10}}
    return Scenario(name="window", seed=1, duration_s=5.0, drain_s=120.0, family="llama", fleet=fleet,
                    workload=workload, tenants=[Tenant("t")], telemetry_period_s=0.5, telemetry_delay_s=(0.0, 0.0),
                    degraded_fraction=0.0, strategies=[])


def test_least_load_sees_a_finished_request_until_its_response_reaches_the_router() -> None:
    # Three long requests and a short one, a millisecond apart: whichever endpoint the first goes to (a tie),
    # the second goes to the other and the third and fourth to the 8-slot one (per-slot counts 1/8 < 1/3,
    # then 2/8 < 1/3). The short one finishes first; a probe comes while its response is still on its way.
    sc = _one_site_two_sizes()
    world = runner.build_world(sc, runner.Options(decision_time="0"))
    big, small = 0, 1
    assert world.conc.tolist() == [8.0, 3.0]
    half_rtt = float(world.rtt_ms[0, big]) / 2000.0
    assert half_rtt == float(world.rtt_ms[0, small]) / 2000.0 == 0.02
    setup = [RequestSpec(0.001 * k, 100, 2000, 0, "eu-west", "", ()) for k in range(3)]
    setup.append(RequestSpec(0.003, 100, 2, 0, "eu-west", "", ()))
    first, _ = _run(sc, _SeesCounts(), setup)
    assert first.requests_log is not None
    assert sorted(r.winner for r in first.requests_log[:2]) == [big, small]
    assert [r.winner for r in first.requests_log[2:]] == [big, big]
    short = first.requests_log[3]
    ended = short.done_at - half_rtt  # the endpoint finished it here; the router learns at short.done_at
    assert ended + 0.5 < min(r.done_at for r in first.requests_log[:3]) - half_rtt  # nothing else ends near

    # While the response is on its way the router still counts it: 3/8 on the big one against 1/3.
    strat = _SeesCounts()
    sim, _ = _run(sc, strat, [*setup, RequestSpec(ended + half_rtt / 2, 100, 10, 0, "eu-west", "", ())])
    assert sim.requests_log is not None
    assert sim.requests_log[4].winner == small
    assert strat.seen[4] == [3.0, 1.0]
    # Once it has reached the router (and the count dropped: 2/8 against 1/3) the big one wins.
    strat = _SeesCounts()
    sim, _ = _run(sc, strat, [*setup, RequestSpec(short.done_at + half_rtt / 2, 100, 10, 0, "eu-west", "", ())])
    assert sim.requests_log is not None
    assert sim.requests_log[4].winner == big
    assert strat.seen[4] == [2.0, 1.0]
