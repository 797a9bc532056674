"""``infermesh bench load``: an open-loop load generator over gRPC, and 1-vs-2-worker capacity.

Open loop: requests leave on a Poisson schedule at the asked rate whether or not earlier ones have answered,
from several client processes, and each latency is measured from the request's *scheduled* send time, so a
stalled server shows up as latency instead of silently lowering the offered rate (coordinated omission).
Guardrail and quota denials (FAILED_PRECONDITION, RESOURCE_EXHAUSTED) are answers, counted as ``denied``; any
other status is an error. ``late`` counts sends the generator itself could not make on time; ``dropped`` those
refused because too many were already in flight.

``--workers-compare`` measures closed-loop capacity (calls/s at a fixed concurrency) of ``infermesh serve
--workers 1`` and ``--workers 2`` started one after the other in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from decision.cli_args import default_config
from decision.console import report_console
from decision.stats import percentile


def add_bench_load(bsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``bench load`` (picked up by ``decision.cli_spine``)."""
    p = bsub.add_parser("load", help="open-loop gRPC load at a fixed rate; --workers-compare: 1 vs 2 workers")
    p.add_argument("--config", default=default_config())
    p.add_argument("--target", default="", help="an already running server (host:port); default: start one")
    p.add_argument("--workers", type=int, default=1, help="server processes when the bench starts the server")
    p.add_argument("--rate", type=float, default=500.0, help="offered requests/s (all client processes)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--outcomes", type=float, default=0.0, help="fraction of decisions followed by ReportOutcome")
    p.add_argument("--audit", action="store_true", help="keep the config's audit log on (default: off)")
    p.add_argument("--workers-compare", action="store_true",
                   help="instead: closed-loop capacity with 1 and 2 workers, same run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_load)


# -- the server under test ----------------------------------------------------------------------
def bench_config(config: str, folder: Path, *, audit: bool) -> Path:
    """A copy of ``config`` with absolute paths and the audit log on or off."""
    import yaml

    src = Path(config).resolve()
    doc = yaml.safe_load(src.read_text())
    for key in ("fleet", "policies"):
        if doc.get(key) and doc[key] != "builtin":
            doc[key] = str((src.parent / doc[key]).resolve())
    if not audit:
        doc["audit"] = {"enabled": False}
    path = folder / "infermesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@contextlib.contextmanager
def running_server(config: Path, *, workers: int, env: dict[str, str] | None = None,
                   timeout_s: float = 120.0) -> Iterator[tuple[str, subprocess.Popen[str], str]]:
    """``infermesh serve`` in a child process; yields its gRPC target, the process and its banner line.

    SIGTERM at the end (a graceful stop).
    """
    cmd = [sys.executable, "-m", "decision.cli", "serve", "--config", str(config), "--grpc-port", "0",
           "--http-port", "0", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    found: list[str] = []
    got = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("infermesh serving: grpc ") and not found:
                found.extend((line.split()[3], line.strip()))
                got.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not got.wait(timeout_s) or proc.poll() is not None:
            raise RuntimeError(f"server did not start (exit status {proc.poll()})")
        yield found[0], proc, found[1]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the open-loop generator --------------------------------------------------------------------
def _open_loop(target: str, rate: float, duration_s: float, requests: list[dict[str, Any]], outcomes: float,
               seed: int, max_inflight: int, out: Any) -> None:
    """One client process: Poisson arrivals at ``rate`` for ``duration_s``; puts its tallies on ``out``."""
    import grpc
    from google.protobuf.json_format import ParseDict
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from infermesh.decision.v1 import decision_pb2 as pb
    from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

    msgs = [ParseDict(r, pb.DecideRequest()) for r in requests]
    rng = random.Random(seed)
    denials = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}

    async def run() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.DecisionServiceStub(ch)
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            loop = asyncio.get_running_loop()
            lat: list[float] = []
            errors: Counter[str] = Counter()
            denied: Counter[str] = Counter()
            inflight: set[asyncio.Task[None]] = set()
            late = dropped = sent = 0

            async def one(i: int, scheduled: float) -> None:
                try:
                    d = await stub.Decide(msgs[i % len(msgs)], timeout=10)
                    lat.append(loop.time() - scheduled)
                    if outcomes and rng.random() < outcomes:
                        await stub.ReportOutcome(pb.Outcome(decision_id=d.decision_id, status=pb.OUTCOME_STATUS_OK,
                                                            ttft_ms=rng.uniform(50, 400), latency_ms=900.0,
                                                            input_tokens=200, output_tokens=150), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in denials:  # a guardrail's or quota's answer, not a failure
                        lat.append(loop.time() - scheduled)
                        denied[exc.code().name] += 1
                    else:
                        errors[exc.code().name] += 1

            start = loop.time() + 0.05
            end = start + duration_s
            scheduled = start
            i = 0
            while True:
                scheduled += rng.expovariate(rate)
                if scheduled >= end:
                    break
                now = loop.time()
                if scheduled > now:
                    await asyncio.sleep(scheduled - now)
                elif now - scheduled > 0.05:
                    late += 1
                if len(inflight) >= max_inflight:
                    dropped += 1
                    continue
                task = asyncio.create_task(one(i, scheduled))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                sent += 1
                i += 1
            if inflight:
                await asyncio.wait(inflight, timeout=15)
            return {"sent": sent, "completed": len(lat), "errors": dict(errors), "denied": dict(denied), "late": late,
                    "dropped": dropped, "lat": lat, "wall_s": loop.time() - start}

    out.put(asyncio.run(run()))


def open_loop(target: str, *, rate: float, duration_s: float, processes: int, requests: list[dict[str, Any]],
              outcomes: float = 0.0, max_inflight: int = 2000, seed: int = 1) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``duration_s`` from ``processes`` client processes; the summary."""
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    procs = [ctx.Process(target=_open_loop, args=(target, rate / processes, duration_s, requests, outcomes,
                                                  seed * 1000 + k, max_inflight, q)) for k in range(processes)]
    for p in procs:
        p.start()
    parts = [q.get(timeout=duration_s + 120) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for r in parts for x in r["lat"])
    errors: Counter[str] = Counter()
    denied: Counter[str] = Counter()
    for r in parts:
        errors.update(r["errors"])
        denied.update(r["denied"])
    wall = max(r["wall_s"] for r in parts)
    completed = sum(r["completed"] for r in parts)
    return {"offered_rps": rate, "achieved_rps": round(completed / duration_s, 1), "duration_s": duration_s,
            "wall_s": round(wall, 2), "sent": sum(r["sent"] for r in parts), "completed": completed,
            "errors": sum(errors.values()), "errors_by_code": dict(errors), "denied": sum(denied.values()),
            "denied_by_code": dict(denied), "late": sum(r["late"] for r in parts),
            "dropped": sum(r["dropped"] for r in parts), "p50_ms": round(percentile(lat, 0.5) * 1e3, 3),
            "p90_ms": round(percentile(lat, 0.9) * 1e3, 3), "p99_ms": round(percentile(lat, 0.99) * 1e3, 3),
            "p999_ms": round(percentile(lat, 0.999) * 1e3, 3), "max_ms": round(lat[-1] * 1e3, 3) if lat else None}


def capacity(target: str, *, duration_s: float, processes: int, requests: list[dict[str, Any]],
             concurrency: int = 64, outcomes: bool = False) -> dict[str, float]:
    """Closed-loop capacity: decisions/s with ``concurrency`` in flight (each with its ReportOutcome
    when ``outcomes``, so the capacity is measured on the same work the load will offer)."""
    from decision.bench import _measure

    kind = "decide+outcome" if outcomes else "decide"
    _measure(target, kind, 4, 1, 1.0, requests)  # warm-up: connections, caches
    return _measure(target, kind, concurrency, processes, duration_s, requests)


def demo_requests(config: str, n: int = 2000) -> list[dict[str, Any]]:
    from decision.bench import _demo_requests
    from decision.config import load_config
    from decision.fleet import load_fleet

    return _demo_requests(load_fleet(load_config(config).fleet), n)


# -- the command --------------------------------------------------------------------------------
def cmd_bench_load(args: argparse.Namespace) -> int:
    console = report_console()
    requests = demo_requests(args.config)
    if args.workers_compare:
        return _workers_compare(args, requests, console)
    with contextlib.ExitStack() as stack:
        target = args.target
        if not target:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="infermesh-bench-")))
            target, _, _ = stack.enter_context(running_server(bench_config(args.config, folder, audit=args.audit),
                                                           workers=args.workers))
        console.print(f"bench load: {args.rate:.0f} req/s offered (Poisson) for {args.duration:.0f} s from "
                      f"{args.processes} client processes to {target}"
                      + ("" if args.target else f" ({args.workers} worker(s), audit {'on' if args.audit else 'off'})"))
        r = open_loop(target, rate=args.rate, duration_s=args.duration, processes=args.processes, requests=requests,
                      outcomes=args.outcomes)
    table = Table(title="open-loop load")
    for col in ("offered/s", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "denied", "errors", "late",
                "dropped"):
        table.add_column(col, justify="right")
    table.add_row(f"{r['offered_rps']:.0f}", f"{r['achieved_rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                  f"{r['p99_ms']:.2f}", f"{r['p999_ms']:.2f}", str(r["denied"]), str(r["errors"]),
                  str(r["late"]), str(r["dropped"]))
    console.print(table)
    if r["errors_by_code"]:
        console.print(f"errors by code: {r['errors_by_code']}")
    if args.json:
        print(json.dumps(r))
    return 0


def _workers_compare(args: argparse.Namespace, requests: list[dict[str, Any]], console: Console) -> int:
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as tmp:
        config = bench_config(args.config, Path(tmp), audit=args.audit)
        for workers in (1, 2):
            with running_server(config, workers=workers) as (target, _, _):
                results[workers] = capacity(target, duration_s=args.duration, processes=args.processes,
                                            requests=requests)
            console.print(f"{workers} worker(s): {results[workers]['rps']:.0f} Decide calls/s")
    speedup = results[2]["rps"] / results[1]["rps"] if results[1]["rps"] else float("nan")
    table = Table(title=f"Decide capacity, closed loop (64 in flight, {args.processes} client processes), same run")
    for col in ("workers", "calls/s", "p50 ms", "p99 ms", "errors"):
        table.add_column(col, justify="right")
    for w, r in results.items():
        table.add_row(str(w), f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", str(int(r["errors"])))
    console.print(table)
    console.print(f"speed-up with 2 workers: {speedup:.2f}x on {os.cpu_count()} cores "
                  "(the client processes share the same cores)")
    if args.json:
        print(json.dumps({"workers_1_rps": round(results[1]["rps"], 1), "workers_2_rps": round(results[2]["rps"], 1),
                          "speedup": round(speedup, 3), "errors": int(results[1]["errors"] + results[2]["errors"]),
                          "cores": os.cpu_count()}))
    return 0
