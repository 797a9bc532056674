"""``infermesh bench envoy``: what the ext_proc endpoint picker adds to a request through Envoy.

One run starts one real Envoy (``deploy/envoy/envoy.yaml``, ports changed) with three listeners:
the shipped one ("with": InferMesh picks the endpoint and observes the response), the same without
the observer filter ("pick only"), and a copy without either ext_proc filter that proxies straight
to the same backend ("without"). A fake OpenAI-compatible backend answers at once, so the
differences between listeners are the picker's. InferMesh runs in its own process, as
``infermesh serve`` would, with a 16-endpoint model. Requests rotate between the listeners in
small blocks, one at a time, so all see the same machine load.

Target: the picker adds <= 1.5 ms at p50. ``--json`` prints ``{"p50_ms_without", "p50_ms_with",
"added_p50_ms", "added_p99_ms", ...}`` on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from decision.stats import percentile

TARGET_ADDED_P50_MS = 1.5
_MODEL = "bench-llm-8b"


def bench_fleet(backend: str, endpoints: int = 16) -> Any:
    """One model on ``endpoints`` endpoints; only the first (``backend``) is idle and reachable."""
    from decision.fleet import Fleet

    sites = [{"id": f"site-{i}", "region": f"region-{i % 2}", "jurisdiction": "EU", "tier": "datacenter"}
             for i in range(2)]
    nodes = [{"id": f"node-{i}", "site": f"site-{i % 2}", "gpu_type": "A100", "gpu_count": 1,
              "gpu_hour_usd": 2.0, "watts_per_gpu": 400.0} for i in range(endpoints)]
    deps = [{"id": f"ep-{i}", "node": f"node-{i}", "model": _MODEL, "max_concurrency": 16,
             "address": backend if i == 0 else f"127.0.0.1:{20000 + i}"} for i in range(endpoints)]
    return Fleet.from_mapping({"sites": sites, "nodes": nodes, "deployments": deps,
                               "models": [{"name": _MODEL, "family": "bench", "params_b": 8.0}]}, "bench")


def _serve_processor(backend: str, server_kind: str = "grpclib") -> None:
    """The processor process: a DecisionEngine on the bench fleet behind the ext_proc server."""
    from decision import heap
    from decision.engine import DecisionEngine
    from decision.extproc import serve_extproc
    from decision.health_guard import BuiltinHealthGuard
    from decision.telemetry import QUEUE_RUNNING, QUEUE_WAITING, TelemetryStore
    from learners.least_ttft import LeastExpectedTtft

    fleet = bench_fleet(backend)
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints}, stale_after_s=1e9)
    for e in fleet.endpoints:  # only the reachable endpoint looks idle
        store.update_endpoint(e.endpoint_id, {QUEUE_RUNNING: 1.0, QUEUE_WAITING: 0.0 if e.address == backend
                                              else 1000.0})
    # The pick-only listener has no observer, so its decisions never get an outcome: counted in flight,
    # they would pile up on the real backend until the decoys (nothing listens there) looked better.
    engine = DecisionEngine(fleet, store, BuiltinHealthGuard(), LeastExpectedTtft(), count_inflight=False)
    srv = serve_extproc(engine, address="127.0.0.1:0", max_streams=64, server_kind=server_kind)
    heap.settle()  # as the service does once started (decision.heap): start-up state out of the collector's way
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime  # start-up (imports) is not per-request work
    print(srv.port, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu_ms = (ru.ru_utime + ru.ru_stime - cpu0) * 1000.0
        stats = {**srv.servicer.stats, **engine.stats,
                 "cpu_ms_per_request": round(cpu_ms / max(1, srv.servicer.stats["routed"]), 3)}
        print(json.dumps(stats), file=sys.stderr, flush=True)
        srv.stop(0)


def run_bench(requests: int = 1000, block: int = 25, warmup: int = 100, server: str = "grpclib") -> dict[str, Any]:
    """Measure both listeners in one run; returns the summary (latencies in ms)."""
    from decision.extproc_envoyrun import (
        Backend,
        EnvoyProcess,
        add_direct_listener,
        add_pick_only_listener,
        free_port,
        render_config,
    )

    backend = Backend("bench", ttft_ms=0.0, token_ms=0.0, streaming=False)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "decision.bench_envoy", "--serve-processor", backend.address, "--server", server]
    proc = subprocess.Popen(cmd,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            why = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"processor did not start: {line!r} {why}")
        listen, direct, pick_only, admin = free_port(), free_port(), free_port(), free_port()
        cfg = render_config(listen_port=listen, admin_port=admin, extproc_port=int(line))
        cfg = add_pick_only_listener(add_direct_listener(cfg, port=direct, backend_port=backend.port),
                                     port=pick_only)
        body = {"model": _MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hello " * 100}]}
        payload = json.dumps(body).encode()
        hdrs = {"x-infermesh-tenant": "bench", "content-type": "application/json"}
        ports = {"without": direct, "pick_only": pick_only, "with": listen}
        lat: dict[str, list[float]] = {k: [] for k in ports}
        errors = 0
        failures: Counter[str] = Counter()
        with EnvoyProcess(cfg, admin) as envoy:
            clients = {k: httpx.Client(base_url=f"http://127.0.0.1:{p}") for k, p in ports.items()}
            try:
                for c in clients.values():
                    for _ in range(warmup):
                        c.post("/v1/chat/completions", content=payload, headers=hdrs)
                done = 0
                while done < requests:
                    n = min(block, requests - done)
                    for kind, c in clients.items():
                        for _ in range(n):
                            t0 = time.perf_counter()
                            r = c.post("/v1/chat/completions", content=payload, headers=hdrs)
                            lat[kind].append((time.perf_counter() - t0) * 1000.0)
                            if r.status_code != 200:
                                errors += 1
                                failures[f"{kind} {r.status_code} {r.text[:160]}"] += 1
                    done += n
            finally:
                for c in clients.values():
                    c.close()
            picks = envoy.stats("http.inference.ext_proc")
    finally:
        try:  # communicate() closes the processor's stdin: its cue to print stats and stop
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        finally:
            backend.stop()
    proc_stats = json.loads(err.decode().strip().splitlines()[-1]) if err.strip() else {}
    out: dict[str, Any] = {"requests": requests, "server": server, "errors": errors,
                           "failures": dict(failures.most_common(5))}
    for kind, values in lat.items():
        v = sorted(values)
        out[f"p50_ms_{kind}"] = round(percentile(v, 0.5), 3)
        out[f"p99_ms_{kind}"] = round(percentile(v, 0.99), 3)
    out["added_p50_ms"] = round(out["p50_ms_with"] - out["p50_ms_without"], 3)
    out["added_p99_ms"] = round(out["p99_ms_with"] - out["p99_ms_without"], 3)
    out["added_p50_ms_pick_only"] = round(out["p50_ms_pick_only"] - out["p50_ms_without"], 3)
    out["target_added_p50_ms"] = TARGET_ADDED_P50_MS
    out["target_met"] = out["added_p50_ms"] <= TARGET_ADDED_P50_MS
    out["processor"] = {k: proc_stats.get(k) for k in ("routed", "observed", "outcomes", "decisions",
                                                     "cpu_ms_per_request")}
    out["envoy_ext_proc_errors"] = sum(v for k, v in picks.items() if k.endswith("streams_failed"))
    return out


def print_report(res: dict[str, Any], as_json: bool) -> None:
    from rich.table import Table

    from decision.console import report_console

    table = Table(title=f"Envoy with and without the InferMesh picker ({res['requests']} requests each, "
                        "concurrency 1)")
    for col in ("", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("without picker", f"{res['p50_ms_without']:.3f}", f"{res['p99_ms_without']:.3f}")
    table.add_row("picker, no observer", f"{res['p50_ms_pick_only']:.3f}", f"{res['p99_ms_pick_only']:.3f}")
    table.add_row("with picker (shipped)", f"{res['p50_ms_with']:.3f}", f"{res['p99_ms_with']:.3f}")
    table.add_row("added (shipped)", f"{res['added_p50_ms']:.3f}", f"{res['added_p99_ms']:.3f}")
    console = report_console()
    console.print(table)
    verdict = "met" if res["target_met"] else "MISSED"
    console.print(f"target: picker adds <= {TARGET_ADDED_P50_MS} ms at p50 -> {verdict}; "
                  f"errors {res['errors']}; processor {res['processor']}")
    if as_json:
        print(json.dumps(res), flush=True)


def cmd_bench_envoy(args: argparse.Namespace) -> int:
    res = run_bench(requests=args.requests, block=args.block, warmup=args.warmup, server=args.server)
    print_report(res, args.json)
    return 0 if res["errors"] == 0 else 1


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=1000, help="timed requests per listener")
    p.add_argument("--block", type=int, default=25, help="requests per listener before switching")
    p.add_argument("--warmup", type=int, default=100, help="untimed requests per listener first")
    p.add_argument("--server", choices=("grpclib", "asyncio", "threads"), default="grpclib",
                   help="the processor's gRPC server kind (extproc.server)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def add_bench_envoy(bench_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``bench envoy`` under the ``bench`` command group."""
    p = bench_subparsers.add_parser("envoy", help="p50/p99 through Envoy with and without the ext_proc picker")
    _add_args(p)
    p.set_defaults(func=cmd_bench_envoy)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m decision.bench_envoy", description=__doc__.splitlines()[0])
    _add_args(ap)
    ap.add_argument("--serve-processor", metavar="BACKEND", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_processor:
        _serve_processor(args.serve_processor, args.server)
        return 0
    return cmd_bench_envoy(args)


if __name__ == "__main__":
    sys.exit(main())
