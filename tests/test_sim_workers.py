"""The simulator's decision workers (``serve --workers N``): per-worker state, FIFO queueing, conservation."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from decision.domain import Outcome
from learners._linear import LinearLearner
from sim import runner
from sim.engine import RunConfig, Simulation
from sim.model import DONE, DROPPED, Request
from sim.scenario import SCENARIO_DIR, load_scenario
from sim.strategies import registry
from sim.strategies.infermesh import InferMesh
from sim.testing import tiny_scenario
from sim.world import I64

SEED_512 = (SCENARIO_DIR / "seed-512.yaml").read_text(encoding="utf-8")


def _sim(name: str | InferMesh, *, workers: int = 1, decision_time: str = "0", rps: float = 60.0,
         duration: float = 10.0, drain: float = 60.0, concurrency: int = 8) -> tuple[Simulation, dict[str, Any]]:
    sc = tiny_scenario(rps=rps, duration=duration, drain=drain, concurrency=concurrency, seed=3)
    opts = runner.Options(decision_time=decision_time, workers=workers)
    world = runner.build_world(sc, opts)
    cfg = RunConfig(duration_s=sc.duration_s, drain_s=sc.drain_s, telemetry_period_s=sc.telemetry_period_s,
                    decision_time=decision_time, seed=sc.seed, workers=workers)
    strat = registry.make(name, sc.seed) if isinstance(name, str) else name
    sim = Simulation(world, runner.workload_for(sc, world, opts, sc.seed, sc.duration_s), sc.tenants, strat, cfg)
    sim.requests_log = []
    sim.jobs_log = []  # every job the decision workers ran (decisions, outcome reports, syncs)
    m = sim.run()
    return sim, m.summary(world, sim.busy_seconds())


def _trajectory(sim: Simulation) -> str:
    assert sim.requests_log is not None
    rows = [(r.rid, r.winner, repr(r.first_token_at), repr(r.done_at)) for r in sim.requests_log]
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


# Recorded with commit e65056d's simulator (before decision workers) and re-recorded when outcome reports
# came to reach the router at the client's completion instead of the endpoint's (half an RTT earlier),
# same scenario and seed: every request's endpoint, first-token and completion time (hashed), and the
# summary's latencies. heap_events: the old count plus one report event per request.
BEFORE_WORKERS = {
    "infermesh": ("59100ae283443703", {"p50": 228.382, "p95": 685.745, "p99": 860.262},
                  {"p50": 1060.34, "p95": 2816.071, "p99": 4309.556}, 614, 3996),
    "infermesh:least-ttft": ("4722568ee0cd9861", {"p50": 208.004, "p95": 709.349, "p99": 845.843},
                             {"p50": 1071.628, "p95": 2881.571, "p99": 4281.181}, 614, 3988),
}


def _on_arrival(name: str) -> InferMesh:
    """The pipeline deciding on arrival, as one router of unlimited throughput (the simulator before workers)."""
    strat = registry.make(name, 3)
    assert isinstance(strat, InferMesh)
    strat.modelled_workers = False
    return strat


@pytest.mark.parametrize("name", sorted(BEFORE_WORKERS))
def test_one_worker_reproduces_the_simulator_before_workers_exactly(name: str) -> None:
    # Equal only where no decision ever waits for the worker: with decision time 0 none does. With
    # measured times one worker queues whenever a request comes while it decides (the point of it).
    sim, s = _sim(name, workers=1)
    assert (_trajectory(sim), s["ttft_ms"], s["latency_ms"], s["completed"], s["heap_events"]) == BEFORE_WORKERS[name]
    assert s["workers"] == 1 and s["decision_wait_ms"]["p99"] == 0.0
    plain, p = _sim(_on_arrival(name), workers=1)
    assert p["workers"] == 0 and _trajectory(plain) == _trajectory(sim)
    assert (p["ttft_ms"], p["latency_ms"], p["heap_events"]) == (s["ttft_ms"], s["latency_ms"], s["heap_events"])


def test_workers_do_not_change_a_peer_strategy() -> None:
    # Peers decide as one router on arrival, whatever --workers says.
    a, sa = _sim("least_load", workers=1, decision_time="20")
    b, sb = _sim("least_load", workers=4, decision_time="20")
    assert _trajectory(a) == _trajectory(b) and sa["ttft_ms"] == sb["ttft_ms"] and sb["workers"] == 0


class _Recorded(InferMesh):
    """The pipeline, remembering which worker decided what and what each worker's ledger was told."""

    def __init__(self) -> None:
        super().__init__("least-ttft", seed=3)
        self.routed: dict[int, list[str]] = defaultdict(list)
        self.ledger_sent: dict[int, list[str]] = defaultdict(list)
        self.ledger_done: dict[int, int] = defaultdict(int)

    def bind(self, view: Any) -> None:
        super().bind(view)
        for w, eng in enumerate(self.engines):
            led = eng.ledger
            sent, done = led.sent, led.done

            def record_sent(eid: str, now: float, prefill_s: float, w: int = w, sent: Any = sent) -> None:
                self.ledger_sent[w].append(eid)
                sent(eid, now, prefill_s)

            def record_done(eid: str, w: int = w, done: Any = done) -> None:
                self.ledger_done[w] += 1
                done(eid)

            led.sent = record_sent  # type: ignore[method-assign,assignment]
            led.done = record_done  # type: ignore[method-assign,assignment]

    def choose(self, req: Request, cands: I64) -> int:
        node = super().choose(req, cands)
        if node >= 0:
            self.routed[req.worker].append(self.view.world.endpoints[node].endpoint_id)
        return node


def test_each_workers_ledger_sees_only_the_requests_assigned_to_it() -> None:
    strat = _Recorded()
    sim, s = _sim(strat, workers=3, decision_time="300")
    assert len({id(e.ledger) for e in strat.engines}) == 3 and len({id(e) for e in strat.engines}) == 3
    assert sim.requests_log is not None
    per_worker: defaultdict[int, int] = defaultdict(int)
    for r in sim.requests_log:
        per_worker[r.worker] += 1
    assert sorted(per_worker) == [0, 1, 2] and all(n > 150 for n in per_worker.values())  # ~614 / 3 each
    for w in range(3):
        # What ledger w was told is exactly what worker w routed, in order, and nothing else.
        assert strat.ledger_sent[w] == strat.routed[w] and len(strat.routed[w]) == per_worker[w]
        assert strat.ledger_done[w] == per_worker[w]  # and every outcome came back to the worker that decided
        assert all(strat.engines[w].ledger.inflight(eid) == 0 for eid in set(strat.routed[w]))
    assert s["completed"] == s["requests"] == sum(per_worker.values())


def test_decisions_queue_above_one_workers_capacity_and_a_second_worker_relieves_it() -> None:
    # 50 req/s against 25 ms per decision and OUTCOME_SHARE (0.18) of it per outcome report, 29.5 ms a
    # request: one worker can serve 34/s (load 1.48), two 68/s (load 0.74).
    _, none = _sim("infermesh", workers=1, decision_time="0", rps=50.0, concurrency=16)
    _, one = _sim("infermesh", workers=1, decision_time="25000", rps=50.0, concurrency=16)
    _, two = _sim("infermesh", workers=2, decision_time="25000", rps=50.0, concurrency=16)
    assert one["decision_wait_ms"]["p50"] > 1000.0  # the queue grows for as long as arrivals last
    assert one["ttft_ms"]["p95"] > 20 * two["ttft_ms"]["p95"]
    assert two["decision_wait_ms"]["p50"] < 50.0 and two["decision_wait_ms"]["p95"] < 250.0
    # Two workers still cost their 25 ms decision and some waiting; no queue costs neither.
    assert two["ttft_ms"]["p50"] > none["ttft_ms"]["p50"] + 25.0
    for s in (one, two):
        assert s["completed"] == s["requests"]



@pytest.mark.parametrize(("name", "workers"), [("infermesh:least-ttft", 1), ("infermesh", 2)])
def test_each_worker_is_a_fifo_single_server_of_its_decisions_outcomes_and_syncs(name: str, workers: int) -> None:
    # Lindley's recurrence per worker over every job it ran, with measured (wall-clock) service times:
    # a job starts when it came or when the worker's previous job ended, whichever is later, in the
    # order the jobs came (FIFO). Decisions, outcome reports and (two workers, LinUCB) learner syncs.
    from sim.engine import JOB_DECIDE, JOB_OUTCOME, JOB_SYNC
    sim, s = _sim(name, workers=workers, decision_time="measured", rps=400.0, duration=6.0,
                          concurrency=64)
    assert sim.requests_log is not None and sim.jobs_log is not None
    kinds: dict[int, int] = defaultdict(int)
    free_at: dict[int, float] = defaultdict(float)
    came_last: dict[int, float] = defaultdict(float)
    waited: dict[int, int] = defaultdict(int)
    decided = {}
    for w, kind, came, start, us in sim.jobs_log:  # in the order the jobs started
        assert came >= came_last[w]
        assert start == pytest.approx(max(came, free_at[w]), abs=1e-12)
        assert us > 0.0
        kinds[kind] += 1
        waited[kind] += start > came
        came_last[w], free_at[w] = came, start + us / 1e6
        if kind == JOB_DECIDE:
            decided[(w, came, start)] = us
    # The decisions in the log are the requests' own (worker, arrival, start, decision time).
    assert decided == {(r.worker, r.arrival, r.decided_at): r.decision_us for r in sim.requests_log}
    assert kinds[JOB_DECIDE] == kinds[JOB_OUTCOME] == s["requests"] == s["completed"]
    assert (kinds[JOB_SYNC] > 0) == (workers > 1)
    assert waited[JOB_DECIDE] > 0 and waited[JOB_OUTCOME] > 0  # each came while its worker was busy
    assert s["outcome_us"]["p50"] > 0.0


@pytest.mark.parametrize("workers", [1, 2])
def test_requests_are_conserved_with_requests_still_waiting_for_a_worker_at_the_end(workers: int) -> None:
    sim, s = _sim("infermesh", workers=workers, decision_time="40000", drain=0.0, concurrency=16)
    assert sim.requests_log is not None
    never_decided = sum(r.decided_at < 0.0 for r in sim.requests_log)
    if workers == 1:
        assert never_decided > 100  # load 2.4: most of the queue is still there when the run stops
    dropped = sum(s["dropped"].values())
    assert s["requests"] == s["completed"] + dropped + s["in_flight_at_end"]
    assert s["in_flight_at_end"] >= never_decided
    assert dropped == sum(r.state == DROPPED for r in sim.requests_log)
    assert s["no_first_token"] >= never_decided  # and they count in the TTFT percentiles at a lower bound


class _Counting(InferMesh):
    """The pipeline with LinUCB, counting the updates each worker's learner makes from its own outcomes."""

    def __init__(self) -> None:
        super().__init__("linucb", seed=3)
        self.own: dict[int, int] = defaultdict(int)

    def bind(self, view: Any) -> None:
        super().bind(view)
        for w, eng in enumerate(self.engines):
            update = eng.learner.update

            def counted(features: Any, reward: float, w: int = w, update: Any = update) -> None:
                self.own[w] += 1
                update(features, reward)

            eng.learner.update = counted  # type: ignore[method-assign]


def test_linear_learners_merge_through_the_learner_store_every_sync_interval() -> None:
    strat = _Counting()
    _sim(strat, workers=2, decision_time="0", duration=20.0)  # 20 s + drain: several 5 s sync rounds
    lins = [e.learner for e in strat.engines]
    assert all(isinstance(lin, LinearLearner) for lin in lins) and lins[0] is not lins[1]
    own = [strat.own[0], strat.own[1]]
    assert min(own) > 100
    n = [lin.n_updates for lin in lins]  # type: ignore[attr-defined]
    assert n[0] > own[0] and n[1] > own[1]  # each merged the other's increments during the run
    assert n[0] < sum(own) or n[1] < sum(own)  # ...up to its last sync only
    strat.sync(0)
    strat.sync(1)
    strat.sync(0)
    n = [lin.n_updates for lin in lins]  # type: ignore[attr-defined]
    assert n[0] == n[1] == sum(own)  # every outcome of both workers, each counted once
    assert strat.engines[0].telemetry is strat.engines[1].telemetry  # both scrape the same telemetry
    assert strat.engines[0].ledger is not strat.engines[1].ledger


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "", "65"])
def test_cli_bad_workers_is_one_line_on_stderr_and_exit_2(value: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from decision.cli import main

    rc = main(["sim", "--scenario", "seed-512", "--workers", value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("infermesh sim: error: --workers must be an integer from 1 to 64") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("server", "match"), [
    ("server: {workers: 0}", "server.workers: must be from 1 to 64"),
    ("server: {workers: 1.5}", "server.workers: an integer"),
    ("server: {threads: 4}", "server.threads: unknown key 'threads'"),
])
def test_scenario_server_workers_is_checked(tmp_path: Path, server: str, match: str) -> None:
    p = tmp_path / "sc.yaml"
    p.write_text(SEED_512 + f"\n{server}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_scenario(str(p))


def test_the_scenarios_server_workers_applies_unless_the_option_overrides_it(tmp_path: Path) -> None:
    p = tmp_path / "sc.yaml"
    p.write_text(SEED_512 + "\nserver: {workers: 3}\n", encoding="utf-8")
    sc = load_scenario(str(p))
    assert sc.workers == 3 and load_scenario("seed-512").workers == 1
    short = runner.Options(duration_s=0.5, nodes=8, decision_time="0", drain_s=5.0)
    assert runner.run(sc, ["infermesh:least-ttft"], short).summary["infermesh:least-ttft"]["workers"] == 3
    short.workers = 2
    assert runner.run(sc, ["infermesh:least-ttft"], short).summary["infermesh:least-ttft"]["workers"] == 2


@pytest.mark.parametrize(("name", "workers", "routers"), [
    ("infermesh", 3, 3),  # as serve: decision.routers defaults to the workers
    ("infermesh:linucb/routers=1", 3, 1),  # the uncorrected per-worker ledgers, for comparison
    ("infermesh", 1, 1),
])
def test_each_workers_ledger_counts_its_requests_once_per_worker(name: str, workers: int, routers: int) -> None:
    strat = registry.make(name, seed=3)
    assert isinstance(strat, InferMesh)
    _sim(strat, workers=workers)
    assert [e.ledger.routers for e in strat.engines] == [routers] * workers


class _Told(InferMesh):
    """The pipeline with LinUCB, recording each outcome its engines are told and each sample their ledgers learn."""

    def __init__(self) -> None:
        super().__init__("linucb", seed=3)
        self.told: dict[str, Outcome] = {}
        self.observed_ms: list[float] = []

    def bind(self, view: Any) -> None:
        super().bind(view)
        for eng in self.engines:
            report, observed = eng.report_outcome, eng.ledger.observed

            def told(outcome: Outcome, report: Any = report) -> Any:
                self.told[outcome.decision_id] = outcome
                return report(outcome)

            def learnt(eid: str, *, expected_ms: float, observed_ms: float, slowness: float,
                       observed: Any = observed) -> None:
                self.observed_ms.append(observed_ms)
                observed(eid, expected_ms=expected_ms, observed_ms=observed_ms, slowness=slowness)

            eng.report_outcome = told  # type: ignore[method-assign]
            eng.ledger.observed = learnt  # type: ignore[method-assign,assignment]

    def slowness(self) -> list[float]:
        return [eng.ledger.slowness(eid) for eng in self.engines for eid in eng.ledger._row]


def test_the_engine_is_told_the_ttft_from_the_end_of_its_decision_and_the_queue_is_not_learnt_as_slowness() -> None:
    # Two workers at 25 ms a decision decide at most 80 req/s of the 100 arriving: the queue grows all run.
    queued, free = _Told(), _Told()
    sim, s = _sim(queued, workers=2, decision_time="25000", rps=100.0, concurrency=16)
    _, s0 = _sim(free, workers=2, decision_time="0", rps=100.0, concurrency=16)
    assert s["decision_wait_ms"]["p50"] > 1000.0 and s0["decision_wait_ms"]["p99"] == 0.0
    assert sim.requests_log is not None
    waited = 0
    for r in sim.requests_log:
        assert r.state == DONE
        o = queued.told[str(r.ctx)]
        t0 = r.decided_at + r.decision_us / 1e6  # when the route left the router: ext_proc's t0
        assert o.ttft_ms == pytest.approx((r.first_token_at - t0) * 1000.0, abs=1e-6)
        assert o.latency_ms == pytest.approx((r.done_at - t0) * 1000.0, abs=1e-6)
        waited += r.decided_at - r.arrival > 1.0
    assert waited > 300
    # The simulator's own TTFT (the tables') still counts from the arrival: the wait is in it.
    assert s["ttft_ms"]["p50"] > s["decision_wait_ms"]["p50"] + 25.0
    # What the ledgers learn is the endpoints' part (counted from the arrival, every sample was the
    # seconds of waiting and every endpoint's slowness hit its bound, 4): no more than without a queue.
    assert float(np.percentile(queued.observed_ms, 99)) < 100.0
    slow_q, slow_0 = queued.slowness(), free.slowness()
    assert max(slow_q) < 1.5
    assert float(np.median(slow_q)) <= float(np.median(slow_0)) + 0.1


class _Reporting(InferMesh):
    """The pipeline, remembering when (simulated time) and on which worker each outcome report and sync ran."""

    def __init__(self) -> None:
        super().__init__("linucb", seed=3)
        self.reports: list[tuple[int, float]] = []
        self.synced: list[tuple[int, float]] = []

    def on_complete(self, req: Request, node: int, ok: bool) -> None:
        self.reports.append((req.worker, self.view.now))
        super().on_complete(req, node, ok)

    def sync(self, worker: int) -> None:
        self.synced.append((worker, self.view.now))
        super().sync(worker)


def test_outcome_reports_occupy_their_worker_and_decisions_wait_behind_them() -> None:
    # The worker process also takes its requests' outcome reports (same GIL): a decision that comes
    # while one is being taken waits for it (and for a learner sync). Fixed decision time, 10 ms; a
    # report costs OUTCOME_SHARE of it, a sync SYNC_SHARE.
    strat = _Reporting()
    sim, s = _sim(strat, workers=2, decision_time="10000", rps=100.0, concurrency=16)
    assert sim.requests_log is not None
    free_at: dict[int, float] = defaultdict(float)
    waited_else: list[tuple[int, float]] = []
    for r in sim.requests_log:  # in arrival order
        start = max(r.arrival, free_at[r.worker])  # as if only decisions occupied the worker
        assert r.decided_at >= start - 1e-12
        if r.decided_at > start + 1e-9:  # it waited for something else
            waited_else.append((r.worker, round(r.decided_at, 9)))
        free_at[r.worker] = r.decided_at + r.decision_us / 1e6
    assert len(waited_else) > 50
    # ...for a report or a sync of its worker: it started as that ended.
    from sim.engine import OUTCOME_SHARE, SYNC_SHARE

    report_ends = {(w, round(t + OUTCOME_SHARE * 0.01, 9)) for w, t in strat.reports}
    sync_ends = {(w, round(t + SYNC_SHARE * 0.01, 9)) for w, t in strat.synced}
    assert all(end in report_ends or end in sync_ends for end in waited_else)
    assert sum(end in report_ends for end in waited_else) > 50 and any(end in sync_ends for end in waited_else)
    assert len(strat.reports) == s["completed"] == s["requests"]
    assert s["outcome_us"] == {"p50": OUTCOME_SHARE * 10000, "p99": OUTCOME_SHARE * 10000}
