"""``infermesh serve --workers N``: N server processes on one gRPC port (SO_REUSEPORT).

Python serves one core per process, so more cores means more processes. The parent:

* reserves the gRPC port (a bound, non-listening SO_REUSEPORT socket, so ``--grpc-port 0`` works
  and no other program takes the port between workers' starts); the kernel spreads connections
  over the workers' listening sockets. With ``extproc.enabled`` the Envoy ext_proc port is shared
  the same way. Envoy opens one HTTP/2 connection to the processor cluster per Envoy worker thread
  and carries both ext_proc streams of a request (pick, then observe) on it, so the outcome
  normally reaches the worker that decided; one that reaches another worker is learnt there
  (``DecisionEngine.report_outcome`` finds the decision and its trace in the log), and the
  deciding worker, finding the outcome in the log when its own wait times out, does not learn it
  again as missing;
* starts the embedded PostgreSQL once when no ``INFERMESH_DATABASE_URL`` is set, migrates the
  database once (an advisory lock serialises migrations anyway; once is simply less work), and
  hands every worker its URL: one audit log, one learner store;
* gives worker ``i`` the HTTP port ``http_port + i`` (``0`` stays ephemeral), its own data
  directory ``<data_dir>/worker-<i>`` (the audit spool must not be shared: a configured
  ``audit.spool_dir`` gets a ``worker-<i>`` subfolder too) and the replica id
  ``<INFERMESH_REPLICA, else learner.replica, else host>-w<i>`` (learner statistics merge through PostgreSQL,
  ``learners.sync``, keyed by replica: two workers under one id would collide);
* on SIGTERM or SIGINT, forwards SIGTERM to every worker, each of which stops accepting, finishes
  in-flight calls, drains its audit queue and snapshots its learner; if a worker dies on its own,
  the others are stopped too and the exit status is 1 (the supervisor, e.g. Kubernetes, restarts
  the whole pod; half a server is not silently kept).

Quota counters are shared only through Redis (``INFERMESH_REDIS_URL``); without it each worker
counts alone and a tenant could get N times its quota, which is logged as a warning.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("infermesh.workers")


class WorkerStartFailed(Exception):
    """A worker could not start; the message is the one line ``serve`` prints for it (exit 2)."""


def worker_replica(replica: str, i: int) -> str:
    """Worker ``i``'s learner replica id: the configured one (or the host name) with ``-w<i>``.

    >>> worker_replica("infermesh-7f9c", 1), worker_replica("", 0).endswith("-w0")
    ('infermesh-7f9c-w1', True)
    """
    return f"{replica or socket.gethostname()}-w{i}"


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket holding ``port`` (0: a free one) for the workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(config_path: str, index: int, grpc_port: int, http_port: int, extproc_port: int | None,
            env: dict[str, str], ready: Any) -> None:
    """One worker process: a whole Service on the shared port(s) until SIGTERM."""
    os.environ.update(env)
    from decision.cli_spine import StartRefused, start_service
    from decision.config import load_config, load_settings
    from decision.logging_json import configure_logging
    from decision.service import Service
    from decision.signals import wait_until_set

    settings = load_settings()
    configure_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; a terminal's ^C reaches everyone
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked for while starting must not kill it
    # What stops a start (a learner replica id another process holds, a bundle's failing tests...) is the one
    # line a single serve says; it goes to the parent, which says it once and exits 2, not as a traceback.
    try:
        service: Service = start_service(load_config(config_path), settings)
    except StartRefused as exc:
        ready.put((index, str(exc)))
        return
    port = service.start_grpc(grpc_port, reuse_port=True)
    if extproc_port is not None:
        service.start_extproc(extproc_port, reuse_port=True)
    http = service.start_http(http_port)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=service.reload_policies, daemon=True).start())
    ready.put((index, os.getpid(), port, http))
    wait_until_set(stop)
    service.stop()


def _shared_database(config_path: str) -> tuple[dict[str, str], Any]:
    """Environment for the workers' one database, starting the embedded one if none is configured."""
    from decision.config import load_config, load_settings

    cfg, settings = load_config(config_path), load_settings()
    if not cfg.audit.get("enabled", True):
        return {}, None
    from audit.database import prepare, start_embedded

    url, server = settings.database_url, None
    if not url:
        url, server = start_embedded(Path(settings.data_dir) / "pgdata")
    prepare(url)  # migrate once here: the workers' own (no-op) migrations then cannot race
    return {"INFERMESH_DATABASE_URL": url}, server


def serve_workers(config_path: str, workers: int, *, grpc_port: int | None = None,
                  http_port: int | None = None, ready_timeout_s: float = 120.0) -> int:
    """Run ``workers`` server processes sharing one gRPC port; returns the exit status.

    Parameters
    ----------
    config_path : str
        The service config file.
    workers : int
        Server processes.
    grpc_port, http_port : int, optional
        Overrides of the config's ports; worker ``i`` serves HTTP on ``http_port + i``.
    """
    from decision.config import learner_replica, load_config, load_settings

    # SIGHUP's default ends the process: until the workers are up (the embedded database, their own
    # start), a reload asked for is ignored, here and, inherited through spawn, in each worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg, settings = load_config(config_path), load_settings()
    host = cfg.server.host
    holder = reserve_port(host, cfg.server.grpc_port if grpc_port is None else grpc_port)
    port = int(holder.getsockname()[1])
    extproc_holder = reserve_port(host, cfg.extproc.port) if cfg.extproc.enabled else None
    extproc_port = int(extproc_holder.getsockname()[1]) if extproc_holder is not None else None
    http_base = cfg.server.http_port if http_port is None else http_port
    if not settings.redis_url:
        log.warning("%d workers without INFERMESH_REDIS_URL: quota counters are per worker", workers)
    db_env, db_server = _shared_database(config_path)
    data_dir = Path(settings.data_dir).resolve()
    ctx = mp.get_context("spawn")
    ready: Any = ctx.Queue()
    procs = []
    for i in range(workers):
        env = {**db_env, "INFERMESH_DATA_DIR": str(data_dir / f"worker-{i}"),
               "INFERMESH_REPLICA": worker_replica(learner_replica(cfg, settings), i), "INFERMESH_WORKER": str(i),
               "INFERMESH_WORKERS": str(workers)}
        p = ctx.Process(target=_worker, name=f"infermesh-worker-{i}",
                        args=(config_path, i, port, http_base + i if http_base else 0, extproc_port, env, ready))
        p.start()
        procs.append(p)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: _signal_all(procs, signal.SIGHUP))  # policy reload in every worker
    status = 0
    try:
        try:
            started = _await_ready(ready, procs, ready_timeout_s, stop)
        except WorkerStartFailed as exc:  # the workers are stopped below
            print(exc, file=sys.stderr, flush=True)
            return 2
        if started is None:
            status = 1
        else:
            https = ", ".join(f"w{i} pid {pid} :{h}" for i, (pid, _, h) in sorted(started.items()))
            extproc = f"  ext_proc {host}:{extproc_port}" if extproc_port is not None else ""
            print(f"infermesh serving: grpc {host}:{port} ({workers} workers, SO_REUSEPORT)  http {https}{extproc}",
                  flush=True)
            while not stop.wait(0.5):
                dead = [p for p in procs if not p.is_alive()]
                if dead:
                    log.error("worker %s exited with %s; stopping the others", dead[0].name, dead[0].exitcode)
                    status = 1
                    break
    finally:
        _stop_all(procs, cfg.server.grace_s + 30.0)
        holder.close()
        if extproc_holder is not None:
            extproc_holder.close()
        if db_server is not None:
            db_server.cleanup()
    return status


def _await_ready(ready: Any, procs: list[Any], timeout_s: float,
                 stop: threading.Event) -> dict[int, tuple[int, int, int]] | None:
    """Each worker's (pid, gRPC port, HTTP port) once all are up; None if one died, time ran out or a stop came.

    Raises
    ------
    WorkerStartFailed
        A worker said why it could not start (its message, read before its exit is looked at).
    """
    started: dict[int, tuple[int, int, int]] = {}
    deadline = time.monotonic() + timeout_s
    while len(started) < len(procs):
        if stop.is_set() or time.monotonic() > deadline:
            log.error("workers did not all start (%d of %d ready)", len(started), len(procs))
            return None
        try:
            item = ready.get(timeout=0.5)
        except Exception:  # queue.Empty: a worker that exited without a word is looked for only now
            if any(not p.is_alive() for p in procs):
                log.error("workers did not all start (%d of %d ready)", len(started), len(procs))
                return None
            continue
        if isinstance(item[1], str):  # (index, why): a worker that could not start
            raise WorkerStartFailed(item[1])
        i, pid, port, http = item
        started[i] = (pid, port, http)
    return started


def _signal_all(procs: list[Any], sig: int) -> None:
    for p in procs:
        if p.is_alive() and p.pid:
            os.kill(p.pid, sig)


def _stop_all(procs: list[Any], timeout_s: float) -> None:
    """SIGTERM every live worker (each drains gracefully), then wait; kill what outlives the timeout."""
    for p in procs:
        if p.is_alive() and p.pid:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            log.error("worker %s did not stop in time; killing it", p.name)
            p.kill()
            p.join(5)
