"""Decide calls/s through the whole service over gRPC, audit on vs off (``bench audit --service``).

The in-process measurement (``audit/bench.py``) puts the audit's cost against the cheapest decision
there is; a proxy sees the service's gRPC rate, where each call's own cost dilutes the audit's. Two
server processes on the same configuration, one auditing into the bench's scratch database and one
not, are driven in interleaved slices by the same client processes, so both see the same machine.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import psycopg

CONCURRENCY = 50  # in flight, as `bench grpc`'s concurrency-50 row
CLIENTS = 2


def _serve(config_path: str, url: str, audit: bool, spool_dir: str, ports: Any, stop: Any) -> None:
    """One server process: the configured service (audit on or off) until ``stop`` is set."""
    from decision.bench import _seed_telemetry
    from decision.config import load_config, load_settings
    from decision.service import Service

    cfg = load_config(config_path)
    cfg = cfg.model_copy(update={"audit": {**cfg.audit, "enabled": audit, "spool_dir": spool_dir}})
    # Scratch database for the log and the learner's snapshots; quotas in memory, so a configured
    # Redis never sees the bench's tenants.
    settings = load_settings().model_copy(update={"database_url": url, "redis_url": ""})
    service = Service(cfg, settings, audit_enabled=audit)
    _seed_telemetry(service.telemetry, service.fleet)
    ports.put((audit, service.start_grpc(0)))
    while not stop.wait(5.0):  # as scrapers would: the policies deny on stale telemetry
        _seed_telemetry(service.telemetry, service.fleet)
    service.stop(5.0)


def _ports(ports: Any, procs: list[Any], timeout_s: float = 180.0) -> list[tuple[bool, int]]:
    """Each server's (audit, port) as it comes up; a server that dies first fails the bench at once."""
    got: list[tuple[bool, int]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            got.append(ports.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"a bench server exited with code {dead[0]} before serving") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench servers did not start within {timeout_s:.0f} s") from None
    return got


@dataclass(frozen=True)
class ServiceRates:
    """Median Decide calls/s with audit off and on; calls made to the auditing server and its log's rows."""

    rps_off: float
    rps_on: float
    errors: int
    calls_on: int
    rows_on: int


def service_rps(config_path: str, url: str, *, seconds: float, rounds: int) -> ServiceRates:
    """Decide calls/s at concurrency 50, audit off vs on, interleaved; counts the audited rows after."""
    from decision.bench import _demo_requests, _measure
    from decision.config import load_config
    from decision.fleet import load_fleet

    ctx = mp.get_context("spawn")
    stop, ports = ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory() as spool:
        procs = [ctx.Process(target=_serve, args=(config_path, url, audit, spool, ports, stop))
                 for audit in (False, True)]
        for p in procs:
            p.start()
        try:
            target = {audit: f"127.0.0.1:{port}" for audit, port in _ports(ports, procs)}
            requests = _demo_requests(load_fleet(load_config(config_path).fleet))
            calls_on = errors = 0
            for audit in (False, True):  # warm-up: connections, caches, the learner's first updates
                r = _measure(target[audit], "decide", 4, 1, 1.0, requests)
                calls_on += int(r["calls"]) if audit else 0
            rps: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(rounds):
                for audit in (False, True):
                    r = _measure(target[audit], "decide", CONCURRENCY, CLIENTS, seconds, requests)
                    rps[audit].append(r["rps"])
                    errors += int(r["errors"])
                    calls_on += int(r["calls"]) if audit else 0
        finally:
            stop.set()
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
    # The auditing server drained its queue on stop: every call it answered is a row (a denial too).
    # The in-process measurements share the scratch database under their own "bench-" chains.
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM decision_events WHERE chain_id NOT LIKE 'bench-%'").fetchone()
    return ServiceRates(statistics.median(rps[False]), statistics.median(rps[True]), errors, calls_on,
                        int(row[0]) if row else 0)

