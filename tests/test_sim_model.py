"""The simulator's model: conservation, queueing theory, reproducibility."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from sim import runner
from sim.engine import RunConfig, Simulation
from sim.model import C_CANCELLED, C_DECODE, DONE, DROPPED, FIRST_TOKEN, ROUTED, Copy, Request
from sim.node import Node
from sim.scenario import load_scenario
from sim.strategies import registry
from sim.testing import tiny_scenario
from sim.workload import Tenant

FIXED = runner.Options(decision_time="0")


def _sim(sc, strategy: str, opts: runner.Options = FIXED) -> Simulation:  # type: ignore[no-untyped-def]
    world = runner.build_world(sc, opts)
    cfg = RunConfig(duration_s=sc.duration_s, drain_s=sc.drain_s if opts.drain_s is None else opts.drain_s,
                    telemetry_period_s=sc.telemetry_period_s, telemetry_delay_s=sc.telemetry_delay_s,
                    decision_time=opts.decision_time, seed=sc.seed)
    wl = runner.workload_for(sc, world, opts, sc.seed, sc.duration_s)
    sim = Simulation(world, wl, sc.tenants, registry.make(strategy, sc.seed), cfg)
    sim.requests_log = []
    return sim


@pytest.mark.parametrize("strategy", ["baseline_rr", "mesh_hedge", "infermesh"])
def test_conservation_when_the_run_stops_mid_flight(strategy: str) -> None:
    # Overloaded and no drain: many requests are still queued or decoding at the end.
    sc = tiny_scenario(cells=1, per_cell=2, rps=60.0, duration=10.0, drain=0.0, concurrency=2)
    sim = _sim(sc, strategy)
    m = sim.run()
    log = sim.requests_log or []
    assert m.requests == len(log) > 300
    done = sum(r.state == DONE for r in log)
    dropped = sum(r.state == DROPPED for r in log)
    flying = sum(r.state in (ROUTED, FIRST_TOKEN) for r in log)
    assert done == m.completed and dropped == sum(m.dropped.values())
    assert done + dropped + flying == m.requests
    assert flying > 0
    s = m.summary(sim.world, sim.busy_seconds())
    assert s["in_flight_at_end"] == flying
    # Every completed request was served once: its winning copy is its only finished copy.
    for r in log:
        if r.state == DONE:
            assert r.winner >= 0 and r.first_token_at <= r.done_at


@pytest.mark.parametrize("strategy", ["baseline_rr", "mesh_hedge"])
def test_finished_requests_are_freed_without_the_cyclic_collector(strategy: str) -> None:
    # A request and its copies must not form a cycle once it is done: the cyclic collector's
    # passes over millions of dead requests were ~13% of a run's time.
    sc = tiny_scenario(cells=1, per_cell=2, rps=60.0, duration=10.0, drain=600.0, concurrency=2)
    sim = _sim(sc, strategy)
    sim.requests_log = None
    gc.collect()
    gc.disable()
    try:
        m = sim.run()
        del sim
        alive = sum(isinstance(o, (Request, Copy)) for o in gc.get_objects())
    finally:
        gc.enable()
    assert m.completed == m.requests > 300
    assert alive == 0


def test_drain_completes_everything_and_slots_are_freed() -> None:
    sc = tiny_scenario(cells=1, per_cell=2, rps=60.0, duration=10.0, drain=600.0, concurrency=2)
    sim = _sim(sc, "least_load")
    m = sim.run()
    assert m.completed == m.requests
    for nd in sim.nodes:  # every slot and KV reservation came back
        assert nd.running == 0 and nd.kv_used == 0 and not nd.waiting and nd.dec_b == 0


def test_dropped_requests_carry_the_guard_reason() -> None:
    # A tenant whose data may only stay in a jurisdiction the fleet does not have.
    sc = tiny_scenario(tenants=[Tenant("t", jurisdictions=("MARS",), user_tier="premium")], duration=2.0)
    sim = _sim(sc, "infermesh")
    m = sim.run()
    assert m.requests > 0 and m.completed == 0
    assert sum(m.dropped.values()) == m.requests
    assert all("residency" in reason for reason in m.dropped)
    assert m.violations == 0


def test_md1_queue_matches_pollaczek_khinchine_and_littles_law() -> None:
    # One endpoint, one batch slot, constant tokens: an M/D/1 queue (RTT 0.5 ms each way is tiny).
    sc = tiny_scenario(cells=1, per_cell=1, concurrency=1, duration=4000.0, drain=300.0, period=0.5,
                       input_tokens={"dist": "const", "value": 240}, output_tokens={"dist": "const", "value": 5},
                       rps=1.0, seed=5)
    world = runner.build_world(sc, FIXED)
    p = world.params[0]
    service = 240 / p.prefill_tps + 5 / p.decode_tps1
    rho = 0.6
    sc.workload["arrival"]["rps"] = rho / service
    sim = _sim(sc, "baseline_rr")
    samples: list[float] = []
    scrape = sim.tele.scrape

    def recording(nodes, now):  # type: ignore[no-untyped-def]
        nd = nodes[0]
        samples.append(nd.running + len(nd.waiting))
        return scrape(nodes, now)

    sim.tele.scrape = recording  # type: ignore[method-assign]
    m = sim.run()
    lam = m.requests / sc.duration_s
    rtt_s = 0.001
    sojourn = np.asarray(m.latency_ms) / 1000.0 - rtt_s
    wait = np.asarray(m.ttft_ms) / 1000.0 - rtt_s - 240 / p.prefill_tps
    pk = rho * service / (2 * (1 - rho))
    assert float(wait.mean()) == pytest.approx(pk, rel=0.1)
    # Little: time-average number in system (sampled on a fixed grid) = lambda x mean sojourn.
    assert float(np.mean(samples)) == pytest.approx(lam * float(sojourn.mean()), rel=0.1)


def _stable(summary: dict) -> dict:  # type: ignore[type-arg]
    return {k: v for k, v in summary.items() if k not in ("wall_s", "events_per_s", "decision_us")}


@pytest.mark.parametrize("strategy", ["power_of_two", "mesh_hedge", "infermesh"])
def test_same_seed_same_result_other_seed_other_result(strategy: str) -> None:
    sc = tiny_scenario(rps=120.0, duration=15.0, concurrency=4, delay=0.05, degraded=0.25)
    a = runner.run(sc, [strategy], FIXED).summary[strategy]
    b = runner.run(sc, [strategy], FIXED).summary[strategy]
    c = runner.run(sc, [strategy], runner.Options(decision_time="0", seed=99)).summary[strategy]
    assert _stable(a) == _stable(b)
    assert _stable(a) != _stable(c)


def test_a_hidden_throughput_error_is_per_endpoint_from_the_start_and_leaves_the_degradations_alone() -> None:
    from sim.engine import pick_degradations, throughput_errors

    errors = throughput_errors(4000, 0.3, seed=7)
    assert [d.endpoint for d in errors] == list(range(4000)) and {d.start for d in errors} == {0.0}
    assert np.std(np.log([d.factor for d in errors])) == pytest.approx(0.3, rel=0.05)
    assert throughput_errors(10, 0.0, seed=7) == []
    sc = tiny_scenario(cells=4, per_cell=10, duration=10.0)
    world = runner.build_world(sc, FIXED)
    plain = pick_degradations(world, 0.2, 10.0, seed=3)
    both = pick_degradations(world, 0.2, 10.0, seed=3, throughput_error=0.3)
    assert plain and both == throughput_errors(world.n, 0.3, seed=3) + plain


def test_a_degradation_multiplies_the_endpoints_hidden_throughput_error() -> None:
    from sim.engine import Degradation

    sc = tiny_scenario(cells=1, per_cell=2, rps=20.0, duration=2.0, drain=0.0)
    world = runner.build_world(sc, FIXED)
    cfg = RunConfig(duration_s=2.0, drain_s=0.0, decision_time="0")
    changes = [Degradation(0, 0.0, 0.8, False), Degradation(0, 0.5, 0.5, True), Degradation(1, 0.0, 1.25, False)]
    sim = Simulation(world, runner.workload_for(sc, world, FIXED, 0, 2.0), sc.tenants,
                     registry.make("least_load", 0), cfg, changes)
    sim.run()
    assert [nd.slow for nd in sim.nodes] == [pytest.approx(0.4), pytest.approx(1.25)]


def test_the_throughput_error_option_changes_the_service_and_is_reported() -> None:
    from dataclasses import replace

    sc = tiny_scenario(cells=2, per_cell=4, rps=40.0, duration=5.0, drain=5.0, concurrency=4)
    exact = runner.run(sc, ["least_load"], FIXED)
    wrong = runner.run(sc, ["least_load"], replace(FIXED, throughput_error=0.5))
    assert runner.summary_json(exact)["throughput_error"] == 0.0
    assert runner.summary_json(wrong)["throughput_error"] == 0.5
    assert exact.summary["least_load"]["requests"] == wrong.summary["least_load"]["requests"]  # same arrivals
    assert exact.summary["least_load"]["ttft_ms"] != wrong.summary["least_load"]["ttft_ms"]


def test_the_trusted_fleet_path_gives_the_validated_endpoints() -> None:
    from decision.fleet import Fleet
    from sim.fleets import build_inventory, trusted_fleet

    sc = load_scenario("mesh-512")
    inventory = build_inventory(sc.fleet, 300, 7)
    validated = Fleet.from_mapping(inventory)
    trusted = trusted_fleet(inventory, {"fleet": sc.fleet, "nodes": 300, "seed": 7})
    assert trusted.endpoints == validated.endpoints and trusted.revision.startswith("gen-")
    assert [trusted.topology.path(r, s.id) for r in ("eu-west", "us-east") for s in trusted.spec.sites] == \
        [validated.topology.path(r, s.id) for r in ("eu-west", "us-east") for s in validated.spec.sites]


def test_parallel_jobs_give_the_sequential_results() -> None:
    from dataclasses import replace

    sc = tiny_scenario(cells=2, per_cell=4, rps=40.0, duration=5.0, drain=5.0, concurrency=4)
    names = ["baseline_rr", "least_load", "infermesh"]
    seq = runner.run(sc, names, FIXED)
    par = runner.run(sc, names, replace(FIXED, jobs=2))
    for n in names:
        assert _stable(par.summary[n]) == _stable(seq.summary[n])


def test_requests_without_a_first_token_count_in_the_ttft_percentiles_at_a_lower_bound() -> None:
    # Dropping the slow half must not improve a strategy's P95: the dropped count at arrival-to-window-end.
    from sim.metrics import Collector

    def run(serve_every: int) -> Collector:
        m = Collector(window_s=100.0)
        for rid in range(100):
            req = Request(rid, float(rid) * 0.1, 10, 10, "t", 0, "", (), 500.0, (), "public")
            m.record_arrival(req)
            if rid % serve_every == 0:
                req.first_token_at = req.arrival + 0.1  # 100 ms TTFT
                m.record_first(req)
        return m

    all_served, half_served = run(1), run(2)
    assert all_served.censored_ttft_ms() == [] and len(half_served.censored_ttft_ms()) == 50

    def p95(m: Collector) -> float:  # as summary() computes ttft_ms
        return float(np.percentile(m.ttft_ms + m.censored_ttft_ms(), 95))

    assert p95(all_served) == pytest.approx(100.0)
    assert p95(half_served) > 90_000.0  # ~ (100 s - a late arrival) for the unserved


def test_requests_that_never_complete_count_in_the_latency_percentiles_at_a_lower_bound() -> None:
    """Latency counted completed requests only: a strategy leaving a quarter unfinished looked faster."""
    from sim.metrics import Collector

    m = Collector(window_s=100.0)
    for rid in range(100):
        req = Request(rid, float(rid) * 0.1, 10, 10, "t", 0, "", (), 500.0, (), "public")
        m.record_arrival(req)
        if rid % 2 == 0:
            req.first_token_at, req.done_at = req.arrival + 0.1, req.arrival + 1.0  # 1 s latency
            m.record_first(req)
            m.record_done(req)
    assert len(m.censored_latency_ms()) == 50
    assert float(np.percentile(m.latency_ms, 95)) == pytest.approx(1000.0)  # completed only
    assert float(np.percentile(m.latency_ms + m.censored_latency_ms(), 95)) > 90_000.0


# -- GPU time: each busy second charged once, also while a prefill overlaps a decoding batch --

class _Timeline:
    """Every prefill's and every decode's interval per node, recorded beside the node's own accounting."""

    def __init__(self) -> None:
        self.busy: dict[Node, list[tuple[float, float]]] = {}  # prefills and decodes
        self.prefills: dict[Node, list[tuple[float, float]]] = {}
        self.copies: list[Copy] = []
        self.decoding: dict[Copy, float] = {}


@pytest.fixture
def timeline(monkeypatch: pytest.MonkeyPatch) -> _Timeline:
    rec = _Timeline()
    admit, start_decode, stop_decode = Node.admit, Node.start_decode, Node.stop_decode

    def on_admit(nd: Node, c: Copy, now: float, in_tokens: int) -> float:
        start = max(now, nd.prefill_free_at)  # prefills run one after another
        t_first = admit(nd, c, now, in_tokens)
        rec.busy.setdefault(nd, []).append((start, t_first))
        rec.prefills.setdefault(nd, []).append((start, t_first))
        rec.copies.append(c)
        return t_first

    def on_start_decode(nd: Node, c: Copy, now: float, out_tokens: int) -> None:
        rec.decoding[c] = now
        start_decode(nd, c, now, out_tokens)

    def on_stop_decode(nd: Node, c: Copy) -> None:
        stop_decode(nd, c)
        rec.busy.setdefault(nd, []).append((rec.decoding.pop(c), nd.last_t))

    monkeypatch.setattr(Node, "admit", on_admit)
    monkeypatch.setattr(Node, "start_decode", on_start_decode)
    monkeypatch.setattr(Node, "stop_decode", on_stop_decode)
    return rec


def _union(intervals: list[tuple[float, float]], end: float) -> tuple[float, float, float]:
    """(measure of the union of ``intervals`` cut at ``end``, its first start, the longest gap inside it)."""
    total, gap, cur_lo, cur_hi = 0.0, 0.0, -1.0, -1.0
    first = min(lo for lo, _ in intervals)
    for lo, hi in sorted((lo, min(hi, end)) for lo, hi in intervals if lo < end):
        if lo > cur_hi:
            total += max(cur_hi - cur_lo, 0.0)
            gap = max(gap, lo - cur_hi) if cur_hi >= 0.0 else gap
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    return total + max(cur_hi - cur_lo, 0.0), first, gap


def _gpu_run(timeline: _Timeline, *, rps: float, drain: float) -> tuple[Simulation, dict[Node, float], float]:
    # Long prompts (~900 tokens) and a wide batch: prefills overlap decoding most of the time.
    sc = tiny_scenario(cells=1, per_cell=2, rps=rps, duration=20.0, drain=drain, concurrency=32,
                       input_tokens={"dist": "lognormal", "mu": 6.8, "sigma": 0.5},
                       output_tokens={"dist": "lognormal", "mu": 4.6, "sigma": 0.7})
    sim = _sim(sc, "baseline_rr")
    m = sim.run()
    end = m.end_time
    for c, t in timeline.decoding.items():  # still decoding when the run stopped
        timeline.busy.setdefault(sim.nodes[c.node], []).append((t, end))
    charged = {nd: 0.0 for nd in sim.nodes}
    for c in timeline.copies:
        nd = sim.nodes[c.node]
        # A copy still decoding has its share of the batch so far still to be added (at its end).
        charged[nd] += c.gpu_s + (nd.S - c.share_start if c.state == C_DECODE else 0.0)
    return sim, charged, end


def test_gpu_seconds_charged_to_requests_never_exceed_the_gpus_busy_time(timeline: _Timeline) -> None:
    sim, charged, end = _gpu_run(timeline, rps=6.0, drain=120.0)
    log = sim.requests_log or []
    assert sum(r.state == DONE for r in log) == len(log) > 100
    busy = sim.busy_seconds()
    for i, nd in enumerate(sim.nodes):
        union, _, gap = _union(timeline.busy[nd], end)
        decodes = [iv for iv in timeline.busy[nd] if iv not in timeline.prefills[nd]]
        overlap = _union(timeline.prefills[nd], end)[0] + _union(decodes, end)[0] - union
        assert gap > 0.0 and overlap > 0.1 * union  # it idles at times, and prefills overlap decoding a lot
        assert busy[i] == pytest.approx(union, rel=1e-9, abs=1e-9)  # busy time: prefilling or decoding, once
        assert charged[nd] <= union * (1 + 1e-9)  # every request's GPU-seconds together: at most that
        assert charged[nd] == pytest.approx(union, rel=1e-9)  # and all of it, with everything finished
    # What the requests were billed for GPU time (their $ less egress, in GPU-seconds): the same.
    w = sim.world
    egress = sum(w.egress_usd_per_gb[r.region, r.winner] * (r.in_tokens + r.out_tokens) * w.bytes_per_token / 1e9
                 for r in log)
    billed_s = (sum(r.cost_usd for r in log) - egress) / float(w.usd_per_s[0])
    assert billed_s <= sum(busy) * (1 + 1e-9)
    assert billed_s == pytest.approx(sum(busy), rel=1e-9)


def test_gpu_seconds_charged_equal_the_busy_time_while_the_gpu_is_always_busy(timeline: _Timeline) -> None:
    # Overloaded and stopped mid-flight: from its first prefill to the end each GPU never idles.
    sim, charged, end = _gpu_run(timeline, rps=120.0, drain=0.0)
    busy = sim.busy_seconds()
    for i, nd in enumerate(sim.nodes):
        union, first, gap = _union(timeline.busy[nd], end)
        assert gap == 0.0 and union == pytest.approx(end - first, rel=1e-9)
        assert busy[i] == pytest.approx(end - first, rel=1e-9)  # utilisation and energy use this: at most 100%
        assert charged[nd] == pytest.approx(busy[i], rel=1e-9)


# -- GPU time with hedging: a losing copy still prefilling when its request completes runs on --

def _hedge_run(timeline: _Timeline, monkeypatch: pytest.MonkeyPatch, *, rps: float, drain: float,
               concurrency: int = 16) -> tuple[Simulation, dict[int, float]]:
    # Long prompts and short answers: a hedge copy that wins often completes while the first copy,
    # behind it in a prefill queue, is still prefilling (mesh_hedge hedges after 35% of the target).
    sc = tiny_scenario(cells=1, per_cell=3, rps=rps, duration=20.0, drain=drain, concurrency=concurrency,
                       input_tokens={"dist": "lognormal", "mu": 7.2, "sigma": 0.6},
                       output_tokens={"dist": "lognormal", "mu": 3.0, "sigma": 0.5})
    sim = _sim(sc, "mesh_hedge")
    at_completion: dict[int, float] = {}  # what each request's copies had run when it completed
    complete = Simulation._complete

    def on_complete(self: Simulation, c: Copy, t_client: float) -> None:
        at_completion[c.req.rid] = sum(o.gpu_s for o in c.req.copies)
        complete(self, c, t_client)

    monkeypatch.setattr(Simulation, "_complete", on_complete)
    sim.run()
    return sim, at_completion


def _billed_gpu_s(sim: Simulation) -> float:
    """What the requests were billed for GPU time: their $ less egress, in GPU-seconds (one price)."""
    w = sim.world
    log = [r for r in sim.requests_log or [] if r.state == DONE]
    egress = sum(w.egress_usd_per_gb[r.region, r.winner] * (r.in_tokens + r.out_tokens) * w.bytes_per_token / 1e9
                 for r in log)
    return float((sum(r.cost_usd for r in log) - egress) / float(w.usd_per_s[0]))


@pytest.mark.parametrize("rps", [5.0, 7.0])
def test_gpu_time_a_losing_hedge_copy_runs_after_its_request_completed_is_billed(
        timeline: _Timeline, monkeypatch: pytest.MonkeyPatch, rps: float) -> None:
    sim, at_completion = _hedge_run(timeline, monkeypatch, rps=rps, drain=300.0)
    m = sim.metrics
    log = sim.requests_log or []
    assert sum(r.state == DONE for r in log) == len(log) > 100 and m.hedge_wins > 0
    busy = float(sim.busy_seconds().sum())
    assert sum(c.gpu_s for c in timeline.copies) == pytest.approx(busy, rel=1e-9)
    # Losers ran on after their request completed: 1.4% (5 req/s) and 3.2% (7 req/s) of the GPU time.
    assert busy - sum(at_completion.values()) > 0.01 * busy
    billed = _billed_gpu_s(sim)
    assert billed == pytest.approx(busy, rel=1e-9)  # every GPU-second billed once, the losers' too
    assert m.cost_usd == pytest.approx(sum(r.cost_usd for r in log), rel=1e-12)  # the run's $/1K bills them
    lost = [c for c in timeline.copies if c.state == C_CANCELLED]
    assert lost and m.cancelled_gpu_s == pytest.approx(sum(c.gpu_s for c in lost), rel=1e-9)


def test_a_losing_hedge_copy_still_prefilling_when_the_run_stops_is_counted(
        timeline: _Timeline, monkeypatch: pytest.MonkeyPatch) -> None:
    # Overloaded and no drain: the run stops with losers mid-prefill.
    sim, _ = _hedge_run(timeline, monkeypatch, rps=12.0, drain=0.0, concurrency=4)
    m = sim.metrics
    lost = [c for c in timeline.copies if c.state == C_CANCELLED]
    cut = [c for c in lost if c.prefill_end > m.end_time]
    assert cut  # still prefilling when the run stopped
    assert m.cancelled_gpu_s == pytest.approx(sum(c.gpu_s for c in lost), rel=1e-9)
    # Every copy of a completed request billed to it, up to the end; nothing of an unfinished one.
    done = [c for c in timeline.copies if c.req.state == DONE]
    assert _billed_gpu_s(sim) == pytest.approx(sum(c.gpu_s for c in done), rel=1e-9)


@pytest.mark.parametrize("intra_rtt_ms", [0.5, 10.0])
def test_a_losing_hedge_copy_is_queued_and_admitted_until_its_cancel_reaches_its_endpoint(
        timeline: _Timeline, monkeypatch: pytest.MonkeyPatch, intra_rtt_ms: float) -> None:
    """The router cancels a hedge loser when it sees the winner's first token at the client's edge,
    and the cancel takes half an RTT more to reach the loser's endpoint. Until then the endpoint
    queues and admits the copy as any other (its prefill is wasted). Before, a loser still
    travelling or queued vanished the moment the winner's endpoint made its first token, a whole
    RTT early, which spared hedging the waste."""
    admitted: list[tuple[float, float]] = []  # (when, when its cancel reaches the endpoint) of losers admitted
    admit = Simulation._admit

    def on_admit(self: Simulation, nd: Node, c: Copy) -> None:
        if c.state == C_CANCELLED:
            admitted.append((self.now, c.cancel_at))
        admit(self, nd, c)

    monkeypatch.setattr(Simulation, "_admit", on_admit)
    # Overloaded, two slots per endpoint: mesh_hedge hedges most requests and losers queue.
    sc = tiny_scenario(cells=1, per_cell=2, rps=30.0, duration=5.0, concurrency=2, drain=120.0, seed=3)
    sc.fleet["intra_rtt_ms"] = intra_rtt_ms
    sim = _sim(sc, "mesh_hedge")
    m = sim.run()
    assert m.hedges > 100
    assert admitted and all(now < cancel_at for now, cancel_at in admitted)
    lost = [c for c in timeline.copies if c.state == C_CANCELLED]
    assert len(lost) >= len(admitted)  # each ran its prefill as a loser, charged as cancelled GPU time
    assert m.cancelled_gpu_s == pytest.approx(sum(c.gpu_s for c in lost), rel=1e-9)
    assert all(r.state == DONE for r in sim.requests_log or [])
