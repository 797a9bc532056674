"""``infermesh bench audit``: the writer's sustained rows/s and decide throughput, audit on vs off."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from audit import database
from audit.settings import AuditSettings
from audit.writer import make_writer
from decision.cli_args import default_config
from decision.contracts import AuditSink

ROOT = Path(__file__).resolve().parent.parent


def add_bench_audit(bench_sub: Any) -> None:
    """Register ``bench audit`` under the lead's ``bench`` subcommand group."""
    p = bench_sub.add_parser("audit", help="audit writer rows/s and decide throughput with audit on vs off")
    p.add_argument("--fleet", default=str(ROOT / "deploy" / "demo" / "fleet.yaml"))
    p.add_argument("--rows", type=int, default=40_000, help="events pushed through the writer")
    p.add_argument("--duration", type=float, default=0.5, help="seconds per decide slice")
    p.add_argument("--rounds", type=int, default=16,
                   help="off/on slice pairs (short, interleaved slices: both modes see the same machine)")
    p.add_argument("--writer", choices=("process", "thread"), default=None,
                   help="the writer in its own process or a thread of the service (default: as configured)")
    p.add_argument("--service", action="store_true",
                   help="also: Decide calls/s through the service over gRPC (concurrency 50), audit on vs off")
    p.add_argument("--config", default=default_config(),
                   help="the service configuration: its audit: section, under INFERMESH_AUDIT_*, sets the "
                        "writer's settings (as the service builds them); --service runs it")
    p.add_argument("--service-seconds", type=float, default=3.0, help="seconds per --service slice")
    p.add_argument("--service-rounds", type=int, default=4, help="off/on --service slice pairs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_audit)


def _engine(fleet_path: str, audit: AuditSink | None) -> Any:
    from decision.engine import DecisionEngine
    from decision.fleet import load_fleet
    from decision.health_guard import BuiltinHealthGuard
    from decision.telemetry import TelemetryStore
    from learners.least_ttft import LeastExpectedTtft

    fleet = load_fleet(fleet_path)
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints})
    return DecisionEngine(fleet, store, BuiltinHealthGuard(), LeastExpectedTtft(), audit=audit,
                          outcome_timeout_s=1e9, max_pending=10_000)


def _requests(engine: Any, n: int) -> list[Any]:
    from decision.domain import RequestContext

    models = sorted(engine.fleet.models)
    return [RequestContext(request_id=f"bench-{i}", tenant=f"tenant-{i % 7}", model=models[i % len(models)],
                           estimated_input_tokens=200 + 37 * (i % 50), expected_output_tokens=100 + 11 * (i % 40),
                           client_region="eu-west" if i % 2 else "us-east") for i in range(n)]


def configured_settings(config_path: str, writer: str | None = None) -> AuditSettings:
    """The audit settings the service would run with: the config's ``audit:`` section under
    ``INFERMESH_AUDIT_*`` (``writer`` overrides the writer kind). The bench gives each writer a
    scratch spool of its own."""
    from decision.config import load_config

    settings = AuditSettings.from_section(load_config(config_path).audit)
    return settings.model_copy(update={"writer": writer}) if writer else settings


def writer_rows_per_s(url: str, fleet_path: str, rows: int, settings: AuditSettings) -> float:
    """Push ``rows`` real decision events through a fresh writer as the service does; rows/s to commit.

    The events are made before the clock starts (decisions of the bench fleet, each with a new id),
    so this measures the writer: hand-over, trace assembly, chaining, COPY. ``settings`` are the
    writer's (:func:`configured_settings`); its queue holds all ``rows`` (a drop would not be a row written).
    """
    from decision.engine import LazyTrace, decision_event, new_decision_id

    engine = _engine(fleet_path, None)
    samples = [decision_event(engine.decide(ctx), "routed", ()) for ctx in _requests(engine, 300)]
    parts = [ev["trace"].parts() for ev in samples]
    events = []
    for i in range(rows):
        ev = dict(samples[i % len(samples)])
        ev["decision_id"] = new_decision_id()
        # Each event its own trace, as each decision has: the writer (thread or process) builds every one.
        ev["trace"] = LazyTrace(gather=_constant(parts[i % len(parts)]))
        events.append(ev)
    with tempfile.TemporaryDirectory() as spool:
        room = {"spool_dir": Path(spool), "queue_max": max(settings.queue_max, rows + 1)}
        w = make_writer(settings.writer, url, settings.model_copy(update=room), chain_id="bench-writer")
        w.flush(timeout=60)  # the writer process is up
        t0 = time.perf_counter()
        for ev in events:
            w.submit_decision(ev)
        ok = w.flush(timeout=600)
        elapsed = time.perf_counter() - t0
        w.close()
    if not ok:
        raise RuntimeError("the audit writer did not flush within 600 s")
    return rows / elapsed


def _constant(value: Any) -> Any:
    return lambda: value


def decide_rps(engine: Any, requests: list[Any], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for ctx in requests:
            engine.decide(ctx)
        n += len(requests)
    return n / (time.perf_counter() - t0)


def cmd_bench_audit(args: argparse.Namespace) -> int:
    server_url, _server = database.resolve_url()
    # Synthetic decisions never enter the configured audit log: a scratch database on its server.
    with database.scratch_database(server_url, "infermesh_bench") as url:
        database.prepare(url)
        return _bench_audit(args, url)


def _bench_audit(args: argparse.Namespace, url: str) -> int:
    settings = configured_settings(args.config, args.writer)
    wr = writer_rows_per_s(url, args.fleet, args.rows, settings)
    with tempfile.TemporaryDirectory() as spool:
        writer = make_writer(settings.writer, url, settings.model_copy(update={"spool_dir": Path(spool)}),
                             chain_id="bench-decide")
        off, on = _engine(args.fleet, None), _engine(args.fleet, writer)
        reqs = _requests(off, 200)
        decide_rps(off, reqs, 0.5)
        decide_rps(on, reqs, 0.5)  # warm both
        offs, ons = [], []
        for _ in range(args.rounds):
            offs.append(decide_rps(off, reqs, args.duration))
            ons.append(decide_rps(on, reqs, args.duration))
        t0 = time.perf_counter()
        writer.flush(timeout=600)
        lag = time.perf_counter() - t0
        writer.close()
    rps_off, rps_on = statistics.median(offs), statistics.median(ons)
    result: dict[str, float] = {"writer_rows_per_s": round(wr, 1), "decide_rps_audit_on": round(rps_on, 1),
                                "decide_rps_audit_off": round(rps_off, 1), "ratio": round(rps_on / rps_off, 3)}
    if args.service:
        from audit.bench_service import service_rps

        svc = service_rps(args.config, url, seconds=args.service_seconds, rounds=args.service_rounds)
        result.update({"service_rps_audit_on": round(svc.rps_on, 1), "service_rps_audit_off": round(svc.rps_off, 1),
                       "service_ratio": round(svc.rps_on / svc.rps_off, 3) if svc.rps_off else float("nan"),
                       "service_errors": svc.errors, "service_calls_audited": svc.calls_on,
                       "service_rows": svc.rows_on})
    scratch = urlsplit(url).path.lstrip("/")  # a socket URL's query holds a path too (host=/...)
    print(f"audit benchmark (same run; scratch database {scratch}, dropped after)")
    print(f"  settings from {args.config} and INFERMESH_AUDIT_*: writer {settings.writer}, batch "
          f"{settings.batch_size}, flush every {settings.flush_interval_s:g} s, writer nice {settings.writer_nice}, "
          f"trace codec {settings.trace_codec}")
    print(f"  {'writer sustained rows/s':<34}{result['writer_rows_per_s']:>12,.0f}   target >= 15,000")
    print(f"  {'decide/s, audit off':<34}{rps_off:>12,.0f}")
    print(f"  {'decide/s, audit on':<34}{rps_on:>12,.0f}")
    print(f"  {'ratio on/off':<34}{result['ratio']:>12.3f}   target >= 0.9")
    print(f"  {'writer caught up after the run in':<34}{lag:>11.2f}s")
    if args.service:
        print(f"  through the service over gRPC (concurrency 50, {args.config}):")
        print(f"  {'  Decide/s, audit off':<34}{result['service_rps_audit_off']:>12,.0f}")
        print(f"  {'  Decide/s, audit on':<34}{result['service_rps_audit_on']:>12,.0f}")
        print(f"  {'  ratio on/off':<34}{result['service_ratio']:>12.3f}   errors {result['service_errors']:.0f}")
        print(f"  {'  rows in the log':<34}{result['service_rows']:>12,.0f}   "
              f"of {result['service_calls_audited']:,.0f} calls to the auditing server")
    if args.json:
        print(json.dumps(result))
    return 0
