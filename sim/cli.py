"""``infermesh sim``: run a scenario for a set of strategies and write the results."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from sim import runner
from sim.model import MAX_WORKERS
from sim.scenario import Scenario, available, check_world, load_scenario
from sim.strategies import registry
from sim.traces import TraceError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sim", help="discrete-event benchmark of routing strategies",
                       description="Run a simulator scenario; writes summary.json, comparison.csv and plots.")
    p.add_argument("--scenario", required=True, help=f"name ({', '.join(available())}) or YAML file")
    p.add_argument("--strategies", help=f"comma-separated, of {', '.join(registry.available())}; also "
                   "NAME+guard (a peer routing only where the hard rules allow), infermesh:LEARNER[/key=value...] and"
                   " vw_peer (needs vowpalwabbit) (sim/README.md); default: the scenario's")
    p.add_argument("--duration", type=float, help="simulated seconds of arrivals (default: the scenario's)")
    p.add_argument("--trace", help="replay a Mooncake .jsonl or CSV trace instead of the synthetic workload")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument("--nodes", type=int, help="rescale the scenario's fleet to this many endpoints")
    p.add_argument("--drain", type=float, help="seconds to let in-flight requests finish after arrivals stop")
    p.add_argument("--decision-time", default="measured",
                   help="'measured' (wall-clock decision time is added to TTFT) or fixed microseconds")
    p.add_argument("--throughput-error", type=float, metavar="SIGMA",
                   help="every endpoint's real throughput is the inventory's x exp(N(0, SIGMA)), hidden from "
                        "every strategy (default: the scenario's degradations.throughput_error, else 0)")
    p.add_argument("--workers", metavar="N",
                   help="decision worker processes of the pipeline strategies, as `serve --workers N` (1-64; "
                        "default: the scenario's server.workers, else 1): each has its own engine and ledger "
                        "and decides one request at a time")
    p.add_argument("--out", default="sim-out", help="output directory (default: sim-out)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--jobs", type=int, default=1,
                   help="strategies run in parallel worker processes (default 1; results are the same)")
    p.set_defaults(func=main)


def _fail(msg: object) -> int:
    """One line on stderr, exit code 2: bad input is the user's to fix, not a traceback to read."""
    lines = [ln for ln in str(msg).splitlines() if ln.strip()] or [repr(msg)]
    more = f" (and {len(lines) - 1} more line(s) like it)" if len(lines) > 1 else ""
    print(f"infermesh sim: error: {lines[0]}{more}", file=sys.stderr)
    return 2


def _workers(text: str) -> int:
    """``--workers``'s value: a whole number (range-checked with the other options).

    Parsed here, not by argparse, so that a bad value is one line on stderr like every other.

    Raises
    ------
    ValueError
        The value is not a whole number.
    """
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"--workers must be an integer from 1 to {MAX_WORKERS}, got {text!r}") from None


def _prepare(args: argparse.Namespace) -> tuple[Scenario, list[str], runner.Options]:
    """Scenario, strategy names and options, every one validated before anything runs.

    Raises
    ------
    ValueError
        (a :class:`~sim.scenario.ScenarioError` for the scenario file) with a one-line message.
    """
    sc = load_scenario(args.scenario)
    if args.strategies is not None:
        names = [x.strip() for x in args.strategies.split(",")]
    else:
        names = list(sc.strategies)
        if "vw_peer" in registry.available() and "vw_peer" not in names:
            names.append("vw_peer")
    registry.check(names)
    workers = None if args.workers is None else _workers(args.workers)
    opts = runner.Options(duration_s=args.duration, trace=args.trace, rate_scale=args.rate_scale, seed=args.seed,
                          nodes=args.nodes, decision_time=args.decision_time, drain_s=args.drain, jobs=args.jobs,
                          throughput_error=args.throughput_error, workers=workers)
    runner.check_options(opts)
    if args.trace is not None:
        trace = Path(args.trace)
        if not trace.is_file():
            raise ValueError(f"--trace {args.trace}: no such file")
        if trace.suffix not in (".jsonl", ".json", ".csv"):
            raise ValueError(f"--trace {args.trace}: unknown trace format (expected .jsonl or .csv)")
    return sc, names, opts


def main(args: argparse.Namespace) -> int:
    """Run ``infermesh sim``; bad input exits 2 with one line on stderr."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from decision.console import report_console

    console = report_console()
    try:
        sc, names, opts = _prepare(args)
    except ValueError as exc:
        return _fail(exc)
    t0 = time.perf_counter()
    source = sc.source or sc.name
    try:
        world = runner.build_world(sc, opts)
    except (ValueError, KeyError, TypeError) as exc:  # the fleet section (InventoryError is a ValueError)
        detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return _fail(f"{source}: fleet: {detail}")
    try:
        check_world(sc, world.regions, world.by_family)
    except ValueError as exc:
        return _fail(exc)
    duration = sc.duration_s if args.duration is None else args.duration
    rate = (f"trace {Path(args.trace).name} x{args.rate_scale:g}" if args.trace
            else f"{runner.arrival_rate(sc, world) * args.rate_scale:.0f} req/s mean")
    console.print(f"[bold]{sc.name}[/]: {world.n} endpoints, {rate}, {duration:g} s "
                  f"(fleet built in {time.perf_counter() - t0:.1f} s)")
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description:>16}"), BarColumn(), TextColumn("{task.fields[t]:>7.1f} s sim"),
                  TimeElapsedColumn(), console=console, transient=False) as prog:
        for n in names:
            tasks[n] = prog.add_task(n, total=duration, t=0.0)

        def progress(name: str, t: float) -> None:
            prog.update(tasks[name], completed=min(t, duration), t=t)

        try:
            res = runner.run(sc, names, opts, progress, world=world)
        except (TraceError, OSError) as exc:  # a trace line that cannot be parsed, an unreadable file
            return _fail(exc)
        for n in names:
            prog.update(tasks[n], completed=duration)
    out = Path(args.out)
    try:
        runner.write_outputs(res, out, plots=not args.no_plots)
    except OSError as exc:
        return _fail(f"--out {args.out}: {exc}")
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
    console.print(f"arrivals: {res.realised_rps:.1f} req/s realised over {duration:g} s")
    ratios = runner.ratio_table(res)
    parts = []  # only the comparisons this run can make (a strategy not run has no ratio, not "xnan")
    if "baseline_rr" in res.summary and ratios:
        parts.append("vs baseline_rr: P95 TTFT x{p95_vs_rr:.3f}, cost/1K x{cost_vs_rr:.3f}".format(**ratios))
    if ratios and math.isfinite(ratios["p95_vs_best_other"]):
        parts.append("vs best other: P95 TTFT x{p95_vs_best_other:.3f}".format(**ratios))
    if parts:
        console.print("infermesh " + "; ".join(parts))
    what = "summary.json, comparison.csv and plots" if not args.no_plots else "summary.json and comparison.csv"
    console.print(f"wrote {what} to {out} in {time.perf_counter() - t0:.0f} s")
    return 0
