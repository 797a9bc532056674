"""``infermesh sim``: run a scenario for a set of strategies and write the results."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from sim import runner
from sim.scenario import available, load_scenario
from sim.strategies import registry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sim", help="discrete-event benchmark of routing strategies",
                       description="Run a simulator scenario; writes summary.json, comparison.csv and plots.")
    p.add_argument("--scenario", required=True, help=f"name ({', '.join(available())}) or YAML file")
    p.add_argument("--strategies", help=f"comma-separated; default: the scenario's ({', '.join(registry.available())})")
    p.add_argument("--duration", type=float, help="simulated seconds of arrivals (default: the scenario's)")
    p.add_argument("--trace", help="replay a Mooncake .jsonl or CSV trace instead of the synthetic workload")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument("--nodes", type=int, help="rescale the scenario's fleet to this many endpoints")
    p.add_argument("--drain", type=float, help="seconds to let in-flight requests finish after arrivals stop")
    p.add_argument("--decision-time", default="measured",
                   help="'measured' (wall-clock decision time is added to TTFT) or fixed microseconds")
    p.add_argument("--out", default="sim-out", help="output directory (default: sim-out)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--jobs", type=int, default=1,
                   help="strategies run in parallel worker processes (default 1; results are the same)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    sc = load_scenario(args.scenario)
    names = [s.strip() for s in args.strategies.split(",")] if args.strategies else sc.strategies
    if not args.strategies and "vw_peer" in registry.available() and "vw_peer" not in names:
        names.append("vw_peer")
    opts = runner.Options(duration_s=args.duration, trace=args.trace, rate_scale=args.rate_scale, seed=args.seed,
                          nodes=args.nodes, decision_time=args.decision_time, drain_s=args.drain,
                          jobs=max(1, args.jobs))
    t0 = time.perf_counter()
    world = runner.build_world(sc, opts)
    duration = sc.duration_s if args.duration is None else args.duration
    console.print(f"[bold]{sc.name}[/]: {world.n} endpoints, {runner.arrival_rate(sc, world) * args.rate_scale:.0f} "
                  f"req/s mean, {duration:g} s (fleet built in {time.perf_counter() - t0:.1f} s)")
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description:>16}"), BarColumn(), TextColumn("{task.fields[t]:>7.1f} s sim"),
                  TimeElapsedColumn(), console=console, transient=False) as prog:
        for n in names:
            tasks[n] = prog.add_task(n, total=duration, t=0.0)

        def progress(name: str, t: float) -> None:
            prog.update(tasks[name], completed=min(t, duration), t=t)

        res = runner.run(sc, names, opts, progress, world=world)
        for n in names:
            prog.update(tasks[n], completed=duration)
    out = Path(args.out)
    runner.write_outputs(res, out, plots=not args.no_plots)
    table = Table(title=f"{sc.name} (seed {res.seed}, {world.n} endpoints)")
    for col in ("strategy", "TTFT p50", "p95", "p99", "$/1K tok", "fleet $/1K", "Wh/1K", "util sd",
                "done %", "SLO %", "viol.", "dec µs p50/p99", "events/s"):
        table.add_column(col, justify="right")
    for n, s in res.summary.items():
        t = s["ttft_ms"]
        table.add_row(n, f"{t['p50']:.1f}", f"{t['p95']:.1f}", f"{t['p99']:.1f}", f"{s['cost_per_1k_tokens']:.6f}",
                      f"{s['fleet_cost_per_1k_tokens']:.6f}", f"{s['energy_wh_per_1k_tokens']:.3f}",
                      f"{s['util_std']:.3f}", f"{100 * s['completion_rate']:.2f}", f"{100 * s['slo_attainment']:.1f}",
                      str(s["guardrail_violations"]), f"{s['decision_us']['p50']:.0f}/{s['decision_us']['p99']:.0f}",
                      f"{s['events_per_s']:,}")
    console.print(table)
    ratios = runner.ratio_table(res)
    if ratios:
        console.print("infermesh vs baseline_rr: P95 TTFT x{p95_vs_rr:.3f}, cost/1K x{cost_vs_rr:.3f}; "
                      "vs best other: P95 TTFT x{p95_vs_best_other:.3f}".format(**ratios))
    console.print(f"wrote {out}/summary.json, comparison.csv and plots in {time.perf_counter() - t0:.0f} s")
    return 0
