"""Runs a scenario for a list of strategies and writes summary.json, comparison.csv and plots."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.engine import RunConfig, Simulation, pick_degradations
from sim.fleets import scenario_fleet
from sim.metrics import Collector
from sim.model import MAX_WORKERS
from sim.scenario import Scenario, check_world
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
    throughput_error: float | None = None  # overrides the scenario's degradations.throughput_error
    workers: int | None = None  # decision workers of the pipeline strategies; overrides the scenario's server.workers


@dataclass
class Result:
    scenario: str
    seed: int
    summary: dict[str, Any]
    collectors: dict[str, Collector] = field(default_factory=dict)
    rate_rps: float = 0.0
    nodes: int = 0
    duration_s: float = 0.0
    realised_rps: float = 0.0  # requests that arrived / duration (the same for every strategy)
    workers: int = 1  # decision workers of the pipeline strategies
    throughput_error: float = 0.0  # sigma of the endpoints' hidden throughput error


def check_options(opts: Options) -> None:
    """Refuse options that would hang a run or mean nothing (a rate scale <= 0, negative times...).

    Raises
    ------
    ValueError
        Naming the option.
    """
    def finite(v: float) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    if not (finite(opts.rate_scale) and opts.rate_scale > 0.0):
        raise ValueError(f"--rate-scale must be a positive number, got {opts.rate_scale}")
    for flag, v in (("--duration", opts.duration_s), ("--drain", opts.drain_s)):
        if v is not None and not (finite(v) and v >= 0.0):
            raise ValueError(f"{flag} must be a number of seconds >= 0, got {v}")
    if opts.nodes is not None and opts.nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {opts.nodes}")
    if opts.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {opts.jobs}")
    w = opts.workers
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WORKERS):
        raise ValueError(f"--workers must be an integer from 1 to {MAX_WORKERS}, got {w!r}")
    sigma = opts.throughput_error
    if sigma is not None and not (finite(sigma) and 0.0 <= sigma <= 2.0):
        raise ValueError(f"--throughput-error must be a sigma in [0, 2], got {opts.throughput_error}")
    if opts.decision_time != "measured":
        try:
            us = float(opts.decision_time)
        except ValueError:
            us = float("nan")
        if not (math.isfinite(us) and us >= 0.0):
            raise ValueError(f"--decision-time must be 'measured' or a number of microseconds >= 0, "
                             f"got {opts.decision_time!r}")


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
    """Run every strategy on the same fleet and the same seeded workload.

    ``Result.rate_rps`` is the configured mean rate of a synthetic workload and the realised one
    (requests / duration) of a trace, whose rate the scenario does not set.
    """
    check_options(opts)
    seed = sc.seed if opts.seed is None else opts.seed
    duration = sc.duration_s if opts.duration_s is None else opts.duration_s
    world = world or build_world(sc, opts)
    check_world(sc, world.regions, world.by_family)
    _, mean_out = token_sampler(sc.workload["output_tokens"], __import__("random").Random(0))
    cfg = RunConfig(duration_s=duration, drain_s=sc.drain_s if opts.drain_s is None else opts.drain_s,
                    telemetry_period_s=sc.telemetry_period_s, telemetry_delay_s=sc.telemetry_delay_s,
                    family=sc.family, decision_time=opts.decision_time, seed=seed,
                    workers=sc.workers if opts.workers is None else opts.workers)
    error = sc.throughput_error if opts.throughput_error is None else opts.throughput_error
    degr = pick_degradations(world, sc.degraded_fraction, duration, seed, throughput_error=error)
    rate = 0.0 if opts.trace else arrival_rate(sc, world) * opts.rate_scale
    out = Result(sc.name, seed, {}, rate_rps=rate, nodes=world.n, duration_s=duration, throughput_error=error,
                 workers=cfg.workers)
    ctx = _RunContext(sc, opts, world, cfg, degr, seed, duration, int(mean_out))
    if opts.jobs > 1 and len(strategies) > 1:
        results = _run_parallel(ctx, strategies, opts.jobs, progress)
    else:
        results = [_run_one(ctx, name, progress) for name in strategies]
    for name, summary, collector in results:
        out.summary[name] = summary
        out.collectors[name] = collector
    if results:  # every strategy sees the same arrivals
        out.realised_rps = results[0][2].requests / duration if duration > 0 else 0.0
    if opts.trace:
        out.rate_rps = out.realised_rps
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


def _json_safe(v: Any) -> Any:
    """``v`` with non-finite floats as None: JSON has no NaN (null means 'not defined here')."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def summary_json(res: Result) -> dict[str, Any]:
    """The ``summary.json`` document; undefined numbers (NaN) are null."""
    doc: dict[str, Any] = _json_safe({"scenario": res.scenario, "seed": res.seed, "strategies": res.summary,
                                      "nodes": res.nodes, "arrival_rps": round(res.rate_rps, 3),
                                      "arrival_rps_realised": round(res.realised_rps, 3),
                                      "throughput_error": res.throughput_error, "workers": res.workers})
    return doc


CSV_FIELDS = ("strategy", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p95_ms",
              "latency_p99_ms", "cost_per_1k_tokens", "fleet_cost_per_1k_tokens", "energy_wh_per_1k_tokens",
              "util_std", "requests", "completed", "completion_rate", "slo_attainment", "guardrail_violations",
              "decision_us_p50", "decision_us_p99")


def write_outputs(res: Result, out_dir: Path, plots: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "summary.json", out_dir / "comparison.csv"]
    written[0].write_text(json.dumps(summary_json(res), indent=2, allow_nan=False) + "\n", encoding="utf-8")
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
    """The issue's target ratios for ``ours`` (NaN where a strategy is missing or a value undefined).

    A strategy without a P95 (nothing served) cannot be the best other; a ratio with an undefined
    (NaN) or zero denominator is NaN.
    """
    s = res.summary
    if ours not in s:
        return {}
    p95 = {k: float(v["ttft_ms"]["p95"]) for k, v in s.items()}
    cost = {k: float(v["cost_per_1k_tokens"]) for k, v in s.items()}
    others = [k for k in s if k != ours and not registry.runs_the_pipeline(k) and math.isfinite(p95[k])]
    best = min(others, key=lambda k: p95[k]) if others else ours
    rr = "baseline_rr"
    return {
        "p95_vs_rr": _ratio(p95[ours], p95[rr]) if rr in s else float("nan"),
        "cost_vs_rr": _ratio(cost[ours], cost[rr]) if rr in s else float("nan"),
        "p95_vs_best_other": _ratio(p95[ours], p95[best]) if others else float("nan"),
        "best_other": float("nan") if not others else float(np.float64(p95[best])),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b != 0.0 else float("nan")
