"""``infermesh demo``: the real service on the demo fleet, driven over real gRPC.

The service runs in this process; the load driver runs in a child process (so client and
server do not share a GIL), pushes simulated telemetry with ``PushTelemetry``, asks ``Decide``,
and reports simulated outcomes (see :mod:`decision.demo_world`) with ``ReportOutcome``.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import statistics
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from google.protobuf.json_format import ParseDict
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from decision.config import ServiceConfig, Settings
from decision.console import report_console
from decision.stats import percentile


@dataclass
class DriveResult:
    decide_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    by_tier: collections.Counter[str] = field(default_factory=collections.Counter)
    by_site: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: int = 0
    sample_decision: str = ""
    elapsed_s: float = 0.0


def _drive(target: str, fleet_path: str, duration_s: float, concurrency: int, seed: int,
           counter: Synchronized, out: Any) -> None:  # type: ignore[type-arg]
    import grpc

    from decision.demo_world import DemoWorld
    from decision.fleet import load_fleet
    from infermesh.decision.v1 import decision_pb2 as pb
    from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

    world = DemoWorld(load_fleet(fleet_path), seed=seed)
    lock = threading.Lock()
    res = DriveResult()
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.DecisionServiceStub(channel)
    stop = threading.Event()
    n = [0]

    def push_telemetry() -> None:
        while not stop.is_set():
            with lock:
                samples = [pb.TelemetrySample(endpoint_id=e, metric=m, value=v) for e, m, v in world.telemetry(0)]
            stub.PushTelemetry(iter([pb.TelemetryBatch(samples=samples)]), timeout=5)
            stop.wait(0.5)

    def worker() -> None:
        while not stop.is_set():
            with lock:
                n[0] += 1
                req = world.request(n[0])
            msg = ParseDict(req, pb.DecideRequest())
            t0 = time.perf_counter()
            try:
                d = stub.Decide(msg, timeout=5)
            except grpc.RpcError as exc:
                with lock:
                    res.errors[exc.code().name] += 1
                counter.value += 1
                continue
            ms = (time.perf_counter() - t0) * 1000
            with lock:
                status, ttft, latency = world.outcome(
                    d.route.endpoint_id, str(req["client_region"]),
                    int(req["estimated_input_tokens"]),  # type: ignore[call-overload]
                    int(req["expected_output_tokens"]))  # type: ignore[call-overload]
                res.decide_ms.append(ms)
                res.by_tier[d.route.tier] += 1
                res.by_site[d.route.site_id] += 1
                if status == "ok":
                    res.ttft_ms.append(ttft)
                if not res.sample_decision and req.get("allowed_jurisdictions") and n[0] > 200:
                    res.sample_decision = d.decision_id
            st = pb.OUTCOME_STATUS_OK if status == "ok" else pb.OUTCOME_STATUS_ERROR
            stub.ReportOutcome(pb.Outcome(decision_id=d.decision_id, status=st, ttft_ms=ttft, latency_ms=latency,
                                          input_tokens=int(req["estimated_input_tokens"]),  # type: ignore[call-overload]
                                          output_tokens=int(req["expected_output_tokens"]),  # type: ignore[call-overload]
                                          error="" if status == "ok" else "simulated backend error"), timeout=5)
            with lock:
                res.outcomes += 1
            counter.value += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=push_telemetry, daemon=True)]
    threads += [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(duration_s)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    res.elapsed_s = time.perf_counter() - started
    channel.close()
    out.put(res)


def run_demo(cfg: ServiceConfig, settings: Settings, *, duration_s: float, concurrency: int, seed: int) -> int:
    from audit.database import shown_url
    from audit.why import render_text
    from decision.cli_spine import _service
    from decision.convert import record_from_trace_pb
    from decision.service import Service
    from infermesh.decision.v1 import decision_pb2 as pb
    from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

    console = report_console()
    console.print("[bold]InferMesh demo[/bold]: starting the decision service on the demo fleet")
    # As serve does: what stops the start (e.g. a learner replica id a running serve holds) is one line, exit 2.
    service: Service = _service(cfg, settings)
    port = service.start_grpc(0)
    http_port = service.start_http(0)
    assert service.engine is not None
    console.print(f"  gRPC 127.0.0.1:{port}  HTTP http://127.0.0.1:{http_port}/healthz  "
                  f"fleet {len(service.fleet.endpoints)} endpoints  policy {service.engine.guard.revision}  "
                  f"learner {service.engine.learner.name}")
    if service.audit.database_url:
        console.print(f"  audit log: {shown_url(service.audit.database_url)}")
    ctx = mp.get_context("spawn")
    counter: Synchronized = ctx.Value("l", 0)  # type: ignore[type-arg]
    queue: Any = ctx.Queue()
    proc = ctx.Process(target=_drive, args=(f"127.0.0.1:{port}", str(cfg.fleet), duration_s, concurrency, seed,
                                            counter, queue), daemon=True)
    proc.start()
    with Progress(TextColumn("driving requests"), BarColumn(), TextColumn("{task.completed:.0f} s"),
                  TextColumn("{task.fields[n]} decisions"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("drive", total=duration_s, n=0)
        t0 = time.monotonic()
        while proc.is_alive() and queue.empty():
            bar.update(task, completed=min(duration_s, time.monotonic() - t0), n=counter.value)
            time.sleep(0.2)
        bar.update(task, completed=duration_s, n=counter.value)
    res: DriveResult = queue.get(timeout=60)
    proc.join(timeout=10)

    routed = len(res.decide_ms)
    decisions = routed + sum(res.errors.values())  # as the progress bar counts: a refusal is a decision too
    table = Table(title="demo summary (decision service real; backends and outcomes simulated)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("decisions (routed + refused)", f"{decisions} ({routed} + {decisions - routed})")
    table.add_row("decisions/s (over real gRPC, with outcome reports)", f"{decisions / res.elapsed_s:.0f}")
    table.add_row("Decide latency p50 / p99 (client side, routed)",
                  f"{percentile(res.decide_ms, 0.5):.2f} / {percentile(res.decide_ms, 0.99):.2f} ms")
    table.add_row("simulated TTFT p50 / p95 / p99",
                  " / ".join(f"{percentile(res.ttft_ms, q):.0f}" for q in (0.5, 0.95, 0.99)) + " ms")
    table.add_row("outcomes reported", str(res.outcomes))
    table.add_row("refused (by gRPC status)", ", ".join(f"{k} {v}" for k, v in res.errors.most_common()) or "none")
    table.add_row("routes by tier", ", ".join(f"{k} {v}" for k, v in res.by_tier.most_common()))
    table.add_row("top sites", ", ".join(f"{k} {v}" for k, v in res.by_site.most_common(6)))
    if res.ttft_ms:
        table.add_row("mean simulated TTFT", f"{statistics.fmean(res.ttft_ms):.0f} ms")
    console.print(table)

    if res.sample_decision:
        with __import__("grpc").insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            try:
                t = stub.Explain(pb.ExplainRequest(decision_id=res.sample_decision), timeout=10)
                console.rule("why this route (Explain over gRPC)")
                console.print(render_text(record_from_trace_pb(t)), highlight=False, soft_wrap=True, markup=False)
            except Exception as exc:  # the summary stands even when the audit log is off
                console.print(f"Explain unavailable: {exc}")
    service.stop()
    console.rule("audit log")
    if service.audit.database_url:
        console.print(f"The audit log stays in {shown_url(service.audit.database_url)}. Query it with:\n"
                      f"  infermesh audit why {res.sample_decision}\n"
                      f"  infermesh audit query --tenant acme --limit 10\n"
                      f"  infermesh audit verify   (recompute the hash chains; with --checkpoint FILE also the heads\n"
                      f"                           that `infermesh audit checkpoint -o FILE` recorded)\n"
                      + ("  (the embedded PostgreSQL stops with the demo; each `infermesh audit` command starts it\n"
                         "   again, and `infermesh serve` keeps it running for SQL clients such as psql)"
                         if not settings.database_url else ""))
    else:
        console.print("audit is disabled in this configuration")
    return 0 if routed > 0 else 1
