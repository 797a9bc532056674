"""Runs a scenario for a list of strategies and writes summary.json, comparison.csv and plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.engine import RunConfig, Simulation, pick_degradations
from sim.fleets import scenario_fleet
from sim.metrics import Collector
from sim.scenario import Scenario
from sim.strategies import registry
from sim.strategies.infermesh import InferMesh
from sim.traces import TraceWorkload, read_trace
from sim.workload import RequestSpec, SyntheticWorkload, token_sampler
from sim.world import World


@dataclass
class Options:
    duration_s: float | None = None
    trace: str | None = None
    rate_scale: float = 1.0
    seed: int | None = None
    nodes: int | None = None
    decision_time: str = "measured"
    drain_s: float | None = None
    jobs: int = 1


@dataclass
class Result:
    scenario: str
    seed: int
    summary: dict[str, Any]
    collectors: dict[str, Collector] = field(default_factory=dict)
    rate_rps: float = 0.0
    nodes: int = 0


def build_world(sc: Scenario, opts: Options) -> World:
    seed = sc.seed if opts.seed is None else opts.seed
    return World(scenario_fleet(sc.fleet, opts.nodes, seed, f"<scenario {sc.name}>"))


def arrival_rate(sc: Scenario, world: World) -> float:
    """Mean requests/s: ``rps`` as given, or ``load`` x the fleet's capacity for the token mix."""
    arr = sc.workload.get("arrival", {})
    if "rps" in arr:
        return float(arr["rps"])
    import random

    _, mean_in = token_sampler(sc.workload["input_tokens"], random.Random(0))
    _, mean_out = token_sampler(sc.workload["output_tokens"], random.Random(0))
    return float(arr["load"]) * world.capacity_rps(mean_in, mean_out)


def workload_for(sc: Scenario, world: World, opts: Options, seed: int, duration: float) -> Iterable[RequestSpec]:
    if opts.trace:
        rows = read_trace(opts.trace, seed=seed)
        return TraceWorkload(rows, sc.tenants, world.regions, duration, opts.rate_scale, seed)
    rate = arrival_rate(sc, world) * opts.rate_scale
    return SyntheticWorkload(sc.workload, sc.tenants, world.regions, rate, duration, seed)


def run(sc: Scenario, strategies: Sequence[str], opts: Options,
        progress: Callable[[str, float], None] | None = None, world: World | None = None) -> Result:
    """Run every strategy on the same fleet and the same seeded workload."""
    seed = sc.seed if opts.seed is None else opts.seed
    duration = sc.duration_s if opts.duration_s is None else opts.duration_s
    world = world or build_world(sc, opts)
    _, mean_out = token_sampler(sc.workload["output_tokens"], __import__("random").Random(0))
    cfg = RunConfig(duration_s=duration, drain_s=sc.drain_s if opts.drain_s is None else opts.drain_s,
                    telemetry_period_s=sc.telemetry_period_s, telemetry_delay_s=sc.telemetry_delay_s,
                    family=sc.family, decision_time=opts.decision_time, seed=seed)
    degr = pick_degradations(world, sc.degraded_fraction, duration, seed)
    out = Result(sc.name, seed, {}, rate_rps=arrival_rate(sc, world) * opts.rate_scale, nodes=world.n)
    ctx = _RunContext(sc, opts, world, cfg, degr, seed, duration, int(mean_out))
    if opts.jobs > 1 and len(strategies) > 1:
        results = _run_parallel(ctx, strategies, opts.jobs, progress)
    else:
        results = [_run_one(ctx, name, progress) for name in strategies]
    for name, summary, collector in results:
        out.summary[name] = summary
        out.collectors[name] = collector
    return out


@dataclass
class _RunContext:
    sc: Scenario
    opts: Options
    world: World
    cfg: RunConfig
    degr: Any
    seed: int
    duration: float
    mean_out: int


def _run_one(ctx: _RunContext, name: str, progress: Callable[[str, float], None] | None,
             ) -> tuple[str, dict[str, Any], Collector]:
    strat = registry.make(name, ctx.seed)
    if isinstance(strat, InferMesh):
        strat.family = ctx.sc.family
        strat.configure(ctx.sc.decision)
        strat.expected_output_tokens = ctx.mean_out
    sim = Simulation(ctx.world, workload_for(ctx.sc, ctx.world, ctx.opts, ctx.seed, ctx.duration), ctx.sc.tenants,
                     strat, ctx.cfg, ctx.degr)
    cb = (lambda t, n=name: progress(n, t)) if progress is not None else None
    m = sim.run(cb)
    return name, m.summary(ctx.world, sim.busy_seconds()), m


_FORKED: list[_RunContext] = []


def _run_forked(name: str) -> tuple[str, dict[str, Any], Collector]:
    return _run_one(_FORKED[0], name, None)


def _run_parallel(ctx: _RunContext, strategies: Sequence[str], jobs: int,
                  progress: Callable[[str, float], None] | None) -> list[tuple[str, dict[str, Any], Collector]]:
    """One strategy per worker process (forked: the world is shared copy-on-write, not pickled).

    Runs are independent and seeded, so the results equal the sequential ones; only measured
    decision times (``--decision-time measured``) see the other workers' CPU load.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    _FORKED[:] = [ctx]
    done: dict[str, tuple[str, dict[str, Any], Collector]] = {}
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
            # Longest first: a pipeline strategy takes several times any peer's wall time, and
            # started last it would run alone at the end while the other workers idle.
            futures = {pool.submit(_run_forked, n): n for n in sorted(strategies, key=registry.runs_the_pipeline,
                                                                        reverse=True)}
            for fut in as_completed(futures):
                name = futures[fut]
                done[name] = fut.result()
                if progress is not None:
                    progress(name, ctx.duration)
    finally:
        _FORKED.clear()
    return [done[n] for n in strategies]


def summary_json(res: Result) -> dict[str, Any]:
    return {"scenario": res.scenario, "seed": res.seed, "strategies": res.summary,
            "nodes": res.nodes, "arrival_rps": round(res.rate_rps, 3)}


CSV_FIELDS = ("strategy", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p95_ms",
              "latency_p99_ms", "cost_per_1k_tokens", "fleet_cost_per_1k_tokens", "energy_wh_per_1k_tokens",
              "util_std", "requests", "completed", "completion_rate", "slo_attainment", "guardrail_violations",
              "decision_us_p50", "decision_us_p99")


def write_outputs(res: Result, out_dir: Path, plots: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "summary.json", out_dir / "comparison.csv"]
    written[0].write_text(json.dumps(summary_json(res), indent=2, allow_nan=True) + "\n", encoding="utf-8")
    with written[1].open("w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(CSV_FIELDS)
        for name, s in res.summary.items():
            wr.writerow([name, s["ttft_ms"]["p50"], s["ttft_ms"]["p95"], s["ttft_ms"]["p99"],
                         s["latency_ms"]["p50"], s["latency_ms"]["p95"], s["latency_ms"]["p99"],
                         f"{s['cost_per_1k_tokens']:.7f}", f"{s['fleet_cost_per_1k_tokens']:.7f}",
                         f"{s['energy_wh_per_1k_tokens']:.4f}", s["util_std"], s["requests"], s["completed"],
                         f"{s['completion_rate']:.5f}", f"{s['slo_attainment']:.4f}", s["guardrail_violations"],
                         s["decision_us"]["p50"], s["decision_us"]["p99"]])
    if plots:
        from sim import plots as pl

        written += pl.write_all(res, out_dir)
    return written


def ratio_table(res: Result, ours: str = "infermesh") -> dict[str, float]:
    """The issue's target ratios for ``ours`` (NaN where a strategy is missing)."""
    s = res.summary
    if ours not in s:
        return {}
    p95 = {k: v["ttft_ms"]["p95"] for k, v in s.items()}
    cost = {k: v["cost_per_1k_tokens"] for k, v in s.items()}
    others = [k for k in s if k != ours and not registry.runs_the_pipeline(k)]
    best = min(others, key=lambda k: p95[k]) if others else ours
    rr = "baseline_rr"
    return {
        "p95_vs_rr": p95[ours] / p95[rr] if rr in s else float("nan"),
        "cost_vs_rr": cost[ours] / cost[rr] if rr in s else float("nan"),
        "p95_vs_best_other": p95[ours] / p95[best] if others else float("nan"),
        "best_other": float("nan") if not others else float(np.float64(p95[best])),
    }
