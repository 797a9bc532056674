"""The simulator's review fixes: KV refusal, TTFT at first token, NaN per-1K metrics, input validation."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from sim import runner
from sim.engine import KV_TOO_BIG, RunConfig, Simulation
from sim.model import FIRST_TOKEN, Request
from sim.scenario import SCENARIO_DIR, ScenarioError, load_scenario
from sim.strategies import registry
from sim.strategies.base import RouterView, Strategy
from sim.strategies.peers import LeastLoad
from sim.telemetry_view import TelemetryView
from sim.testing import tiny_scenario
from sim.workload import RequestSpec, Tenant, prefix_block_ids
from sim.world import I64

FIXED = runner.Options(decision_time="0")
SEED_512 = (SCENARIO_DIR / "seed-512.yaml").read_text(encoding="utf-8")


class _Recording(LeastLoad):
    """least_load, remembering what the engine told it about each request's end."""

    def __init__(self) -> None:
        self.ends: list[tuple[int, bool]] = []

    def on_complete(self, req: Request, node: int, ok: bool) -> None:
        self.ends.append((req.rid, ok))


def _run(sc, strategy: Strategy, specs: list[RequestSpec]) -> Simulation:  # type: ignore[no-untyped-def]
    world = runner.build_world(sc, FIXED)
    cfg = RunConfig(duration_s=sc.duration_s, drain_s=sc.drain_s, telemetry_period_s=sc.telemetry_period_s,
                    decision_time="0", seed=sc.seed)
    sim = Simulation(world, specs, sc.tenants, strategy, cfg)
    sim.requests_log = []
    sim.run()
    return sim


# -- 1. a request larger than the KV cache --

@pytest.mark.parametrize("name", ["least_load", "infermesh"])
def test_a_request_larger_than_the_kv_cache_is_dropped_and_does_not_block_the_queue(name: str) -> None:
    sc = tiny_scenario(cells=1, per_cell=1, concurrency=1, duration=5.0, drain=60.0)
    cap = runner.build_world(sc, FIXED).params[0].kv_capacity_tokens
    # One slot: the second request arrives while the first runs, so the giant one would head the FIFO.
    specs = [RequestSpec(0.01 * k, 200, 20, 0, "cell0", "", ()) for k in range(10)]
    specs.insert(1, RequestSpec(0.005, cap, 1, 0, "cell0", "", ()))
    strat: Strategy = _Recording() if name == "least_load" else registry.make(name, 1)
    sim = _run(sc, strat, specs)
    m = sim.metrics
    assert m.requests == 11 and m.completed == 10
    assert dict(m.dropped) == {KV_TOO_BIG: 1}
    s = m.summary(sim.world, sim.busy_seconds())
    assert s["in_flight_at_end"] == 0 and s["no_first_token"] == 1
    assert sim.view.outstanding.tolist() == [0.0]  # the router's count came back
    nd = sim.nodes[0]
    assert nd.running == 0 and nd.kv_used == 0 and not nd.waiting
    giant = (sim.requests_log or [])[1]
    assert giant.drop_reason == KV_TOO_BIG and not giant.copies
    if isinstance(strat, _Recording):
        assert (giant.rid, False) in strat.ends and len(strat.ends) == 11


# -- 2. TTFT counts at the first token --

def test_ttft_and_slo_count_requests_still_decoding_at_the_end() -> None:
    sc = tiny_scenario(cells=1, per_cell=2, rps=60.0, duration=10.0, drain=0.0, concurrency=2)
    world = runner.build_world(sc, FIXED)
    cfg = RunConfig(duration_s=sc.duration_s, drain_s=0.0, telemetry_period_s=sc.telemetry_period_s,
                    decision_time="0", seed=sc.seed)
    sim = Simulation(world, runner.workload_for(sc, world, FIXED, sc.seed, sc.duration_s), sc.tenants,
                     registry.make("baseline_rr", 1), cfg)
    sim.requests_log = []
    m = sim.run()
    log = sim.requests_log
    served = [r for r in log if r.first_token_at >= 0]
    assert any(r.state == FIRST_TOKEN for r in log)  # some were decoding when the run stopped
    assert len(m.ttft_ms) == len(served) > m.completed
    met = sum((r.first_token_at - r.arrival) * 1000.0 <= r.ttft_target_ms for r in served)
    s = m.summary(world, sim.busy_seconds())
    assert s["slo_attainment"] == pytest.approx(met / m.requests)
    assert s["first_tokens"] == len(served) and s["no_first_token"] == m.requests - len(served) > 0
    assert sum(n for _, _, n in m.learning_curve(10.0)) == len(served)


# -- 3. nothing served: NaN, null in JSON, plots survive --

def test_a_strategy_that_serves_nothing_has_nan_per_1k_and_null_in_summary_json(tmp_path: Path) -> None:
    # infermesh keeps residency (nothing in MARS: all dropped); baseline_rr routes anyway.
    sc = tiny_scenario(tenants=[Tenant("t", jurisdictions=("MARS",), user_tier="premium")], duration=1.0, drain=5.0)
    res = runner.run(sc, ["infermesh", "baseline_rr"], FIXED)
    ours = res.summary["infermesh"]
    assert ours["completed"] == 0 and res.summary["baseline_rr"]["completed"] > 0
    for key in ("cost_per_1k_tokens", "fleet_cost_per_1k_tokens", "energy_wh_per_1k_tokens"):
        assert math.isnan(ours[key]) and math.isfinite(res.summary["baseline_rr"][key])
    ratios = runner.ratio_table(res)
    assert math.isnan(ratios["cost_vs_rr"])
    assert ratios["p95_vs_rr"] > 1.0  # serving nothing is worse than round robin, not undefined
    runner.write_outputs(res, tmp_path, plots=True)

    def no_constants(c: str) -> None:
        raise AssertionError(f"summary.json holds {c}")

    doc = json.loads((tmp_path / "summary.json").read_text(), parse_constant=no_constants)
    assert doc["strategies"]["infermesh"]["cost_per_1k_tokens"] is None
    assert doc["strategies"]["infermesh"]["ttft_ms_served"]["p95"] is None
    # Nothing served: every request counts at its TTFT's lower bound (arrival to the window's end).
    assert doc["strategies"]["infermesh"]["ttft_ms"]["p95"] >= 5000.0


def test_zero_duration_writes_outputs_and_plots(tmp_path: Path) -> None:
    sc = tiny_scenario(duration=0.0, drain=1.0)
    res = runner.run(sc, ["mesh", "baseline_rr", "infermesh"], FIXED)
    assert all(s["requests"] == 0 and math.isnan(s["cost_per_1k_tokens"]) for s in res.summary.values())
    paths = runner.write_outputs(res, tmp_path, plots=True)
    assert all(p.exists() for p in paths)
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))


# -- 4. inputs that used to hang --

@pytest.mark.parametrize("opts", [runner.Options(rate_scale=0.0), runner.Options(rate_scale=-2.0),
                                  runner.Options(drain_s=-1.0), runner.Options(duration_s=-1.0),
                                  runner.Options(decision_time="-5"), runner.Options(jobs=0),
                                  runner.Options(throughput_error=-0.1), runner.Options(throughput_error=float("nan"))])
def test_bad_options_are_refused_before_running(opts: runner.Options) -> None:
    with pytest.raises(ValueError):
        runner.run(tiny_scenario(duration=1.0), ["mesh"], opts)


@pytest.mark.parametrize("period", [0.0, -1.0])
def test_a_telemetry_period_that_would_never_advance_is_refused(period: float) -> None:
    with pytest.raises(ValueError, match="period"):
        RunConfig(duration_s=1.0, telemetry_period_s=period)
    with pytest.raises(ValueError, match="period"):
        runner.run(tiny_scenario(duration=1.0, period=period), ["mesh"], FIXED)


# -- 5. the scenario file and the CLI --

def _yaml(tmp_path: Path, old: str, new: str) -> str:
    assert old in SEED_512
    p = tmp_path / "sc.yaml"
    p.write_text(SEED_512.replace(old, new, 1), encoding="utf-8")
    return str(p)


@pytest.mark.parametrize(("old", "new", "line", "match"), [
    ("duration_s: 300", "duration_s: abc", 7, "duration_s: a finite number"),
    ("drain_s: 120", "drain_s: -5", 8, "drain_s: must be >= 0"),
    ("period_s: 0.1", "period_s: 0", 31, r"telemetry.period_s: must be > 0"),
    ("type: poisson", "type: poison", 25, "unknown arrival type 'poison'"),
    ("dist: lognormal, mu: 3.8", "dist: lognormall, mu: 3.8", 26, "unknown token distribution"),
    ("{name: whitepaper,", "{nmae: whitepaper,", 29, "unknown key"),
    ("ttft_target_ms: 500}", "ttft_target_ms: 500, regions: eu-west}", 29, "regions: a list"),
    ("ttft_target_ms: 500}", "ttft_target_ms: 500, jurisdictions: EU}", 29, "jurisdictions: a list"),
    ("ttft_target_ms: 500}", "ttft_target_ms: 500, weight: 0}", 29, "weights must not all be 0"),
    ("duration_s: 300", "duration_s: [1", 8, "YAML syntax error"),
    ("{fraction: 0.0}", "{fraction: 0.0, throughput_error: 3}", 33, "throughput_error: must be <= 2"),
    ("{fraction: 0.0}", "{fraction: 0.0, throughput_eror: 0.3}", 33, "unknown key 'throughput_eror'"),
])
def test_scenario_errors_name_the_file_line_and_field(tmp_path: Path, old: str, new: str, line: int,
                                                      match: str) -> None:
    path = _yaml(tmp_path, old, new)
    with pytest.raises(ScenarioError, match=match) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}:{line}: ")


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from decision.cli import main

    rc = main(["sim", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["--scenario", "no-such-scenario"],
    ["--scenario", "seed-512", "--strategies", "leastload"],
    ["--scenario", "seed-512", "--strategies", ""],
    ["--scenario", "seed-512", "--strategies", "mesh,,least_load"],
    ["--scenario", "seed-512", "--strategies", "mesh,mesh"],
    ["--scenario", "seed-512", "--strategies", "mesh,infermesh:no-such-learner"],
    ["--scenario", "seed-512", "--strategies", "mesh,infermesh:linucb/alpah=1"],
    ["--scenario", "seed-512", "--decision-time", "fast"],
    ["--scenario", "seed-512", "--decision-time", "-1"],
    ["--scenario", "seed-512", "--trace", "/no/such/trace.jsonl"],
    ["--scenario", "seed-512", "--nodes", "0"],
    ["--scenario", "seed-512", "--nodes", "-3"],
    ["--scenario", "seed-512", "--jobs", "0"],
    ["--scenario", "seed-512", "--drain", "-1"],
    ["--scenario", "seed-512", "--rate-scale", "0"],
    ["--scenario", "seed-512", "--duration", "-1"],
])
def test_cli_bad_input_is_one_line_on_stderr_and_exit_2(args: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _cli([*args, "--out", str(tmp_path / "out")], capsys)
    assert rc == 2
    assert err.startswith("infermesh sim: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize(("old", "new", "match"), [
    ("ttft_target_ms: 500}", "ttft_target_ms: 500, regions: [mars]}", r"sc.yaml:29: tenants\[0\].regions: .*mars"),
    ("  family: llama\n", "  family: mistral\n", r"sc.yaml:9: family: .*'llama'"),
    ("gpu_type: H100", "gpu_type: H900", r"sc.yaml: fleet: .*unknown gpu_type 'H900'"),
    ("duration_s: 300", "duration_s: [1", r"sc.yaml:8: YAML syntax error"),
])
def test_cli_scenario_errors_found_with_the_fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str,
                                                  new: str, match: str) -> None:
    path = _yaml(tmp_path, old, new)
    rc, err = _cli(["--scenario", path, "--strategies", "mesh", "--nodes", "8", "--out", str(tmp_path / "o")],
                   capsys)
    assert rc == 2 and err.count("\n") == 1
    assert re.search(match, err), err


def test_a_tenant_region_the_fleet_lacks_is_refused_by_the_runner() -> None:
    sc = tiny_scenario(tenants=[Tenant("t", regions=("mars",))], duration=1.0)
    with pytest.raises(ValueError, match="mars"):
        runner.run(sc, ["mesh"], FIXED)


# -- 6. small cells fleets --

@pytest.mark.parametrize(("nodes", "regions"), [(1, 1), (100, 1), (200, 2), (384, 3), (385, 4)])
def test_seed_512_builds_with_fewer_nodes_than_its_cells(nodes: int, regions: int) -> None:
    world = runner.build_world(load_scenario("seed-512"), runner.Options(nodes=nodes))
    assert world.n == nodes and len(world.regions) == regions


# -- 7. trace arrival rate --

def test_arrival_rps_of_a_trace_is_the_realised_rate(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp_s,input_tokens,output_tokens\n"
                     + "".join(f"{0.5 * k},100,10\n" for k in range(20)), encoding="utf-8")
    sc = tiny_scenario(rps=50.0, duration=4.0, drain=5.0)
    res = runner.run(sc, ["mesh"], runner.Options(decision_time="0", trace=str(trace), rate_scale=2.0))
    doc = runner.summary_json(res)
    n = res.summary["mesh"]["requests"]
    assert n == 16  # rows at 0, 0.25, ... 3.75 s after scaling by 2
    assert doc["arrival_rps"] == pytest.approx(n / 4.0)  # not the scenario's 50 x 2
    assert doc["arrival_rps_realised"] == doc["arrival_rps"]


# -- 8. the shortlist's local half comes from this request's candidates --

def test_infermesh_shortlist_stays_within_the_located_candidates() -> None:
    from sim.fleets import scenario_fleet
    from sim.strategies.infermesh import InferMesh
    from sim.world import World

    sc = tiny_scenario(cells=2, per_cell=4)
    world = World(scenario_fleet(sc.fleet, 64, 1), cell_size=2)  # 32 cells of 2: hierarchical search
    view = RouterView(world, TelemetryView(world), 1, flat_limit=8)
    s = InferMesh("least-ttft", seed=1, shortlist=2)
    s.family = "llama"
    s.bind(view)
    bad = 0
    for k in range(400):
        req = Request(k, 0.0, 100, 100, "t", k % 2, "", (), 500.0, (), "public")
        view.outstanding[:] = np.random.default_rng(k).random(world.n)
        cands: I64 = view.candidates(req, "llama")
        cset = set(cands.tolist())
        bad += any(s.index[e.endpoint_id] not in cset for e in s._shortlist(req, cands))
        del cands
    assert bad == 0


# -- 9. late telemetry never overwrites newer --

def test_an_older_snapshot_delivered_late_does_not_overwrite_a_newer_one() -> None:
    sc = tiny_scenario(cells=1, per_cell=2)
    world = runner.build_world(sc, FIXED)
    nodes = world.make_nodes()
    tele = TelemetryView(world)
    old = tele.scrape(nodes, 1.0)
    nodes[0].running = 3
    new = tele.scrape(nodes, 2.0)
    tele.deliver(new)
    tele.deliver(old)
    assert tele.obs_running.tolist() == [3.0, 0.0]
    assert tele.obs_taken_at.tolist() == [2.0, 2.0]


# -- 10. one window for the fleet-wide measures --

def test_fleet_cost_uses_duration_plus_drain_for_every_strategy() -> None:
    sc = tiny_scenario(rps=40.0, duration=3.0, drain=30.0)
    res = runner.run(sc, ["baseline_rr", "mesh"], FIXED)
    world = runner.build_world(sc, FIXED)
    for name, s in res.summary.items():
        assert s["simulated_s"] < 33.0  # drained early ...
        out_k = res.collectors[name].out_tokens / 1000.0
        # ... but the fleet was provisioned for the whole window
        assert s["fleet_cost_per_1k_tokens"] == pytest.approx(float(world.usd_per_s.sum()) * 33.0 / out_k)


# -- 11. prefix-cache ids are unique per tenant --

def test_prefix_block_ids_never_collide_across_tenants() -> None:
    a = set(prefix_block_ids(0, 10_000, 999))
    b = set(prefix_block_ids(1, 0, 999))
    assert len(a) == len(b) == 999 and not a & b
    assert not set(prefix_block_ids(0, 1, 999)) & set(prefix_block_ids(0, 2, 999))
