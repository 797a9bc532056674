"""The spine's subcommands: serve, demo, decide, fleet check, bench grpc / bench decide."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from decision.cli_args import UsageError, bounded_float, bounded_int, default_config, read_json_request, shipped
from decision.signals import wait_until_set

DEFAULT_CONFIG = default_config()
_BENCH_EXTENSIONS: list[Any] = []


_port = bounded_int(0, 65535)  # out of range, the OS would take the value modulo 65536


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gRPC decision service and its HTTP port")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"service config YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--grpc-port", type=_port, default=None, help="0-65535 (0: a free one)")
    p.add_argument("--http-port", type=_port, default=None, help="0-65535 (0: a free one)")
    p.add_argument("--workers", type=bounded_int(1, 64), default=None,
                   help="server processes sharing the port (SO_REUSEPORT), 1-64")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="start the service on the demo fleet and drive requests through it")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"service config YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--duration", type=bounded_float(0.5, 86_400), default=30.0, help="seconds of load (default 30)")
    p.add_argument("--concurrency", type=bounded_int(1, 1024), default=16)
    p.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("decide", help="answer one decision in-process, as JSON")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"service config YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--request", required=True, help="JSON file with DecideRequest fields ('-' for stdin)")
    p.add_argument("--trace", action="store_true", help="include the full trace")
    p.set_defaults(func=cmd_decide)

    fleet = sub.add_parser("fleet", help="fleet inventory tools")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    p = fsub.add_parser("check", help="validate an inventory file; errors name file:line: field")
    p.add_argument("path", help="inventory YAML (format: deploy/FLEET.md)")
    p.set_defaults(func=cmd_fleet_check)

    bench = sub.add_parser("bench", help="benchmarks (each prints a table; --json adds one JSON line)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bsub.add_parser("grpc", help="no-op RPC vs Decide throughput on one server, same run")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--duration", type=bounded_float(0.1, 3600), default=5.0, help="seconds per measurement")
    p.add_argument("--clients", type=bounded_int(1, 64), default=2, help="client processes")
    p.add_argument("--blocks", type=bounded_int(1, 1000), default=3,
                   help="interleaved blocks each measurement is split into")
    p.add_argument("--ceiling", action="store_true",
                   help="also Decide at concurrency 50 with the engine bypassed (one fixed answer): the ratio the "
                        "transport and servicer allow")
    p.add_argument("--server-kind", choices=("asyncio", "threads", "split"), default=None,
                   help="the gRPC server kind to measure (default: the config's server.kind)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_grpc)
    p = bsub.add_parser("decide", help="in-process decision latency for N endpoints")
    p.add_argument("--endpoints", type=bounded_int(1, 10_000_000), action="append",
                   help="fleet size (repeatable); default 512 and 65536")
    p.add_argument("--candidates", type=bounded_int(1, 1_000_000), default=64,
                   help="endpoints per model (the locate stage's output)")
    p.add_argument("--iterations", type=bounded_int(1, 100_000_000), default=5000)
    p.add_argument("--policies", default=shipped("policies/bundles/default"),
                   help="policy bundle for the guard stage ('builtin' for the built-in health rule)")
    p.add_argument("--learner", default="least-ttft")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_decide)
    for extend in _bench_extensions():
        extend(bsub)


def _bench_extensions() -> list[Any]:
    """Benchmarks contributed by other packages (audit writer, Envoy, load generator, learner store)."""
    found: list[Any] = []
    for module, attr in (("audit.bench", "add_bench_audit"), ("decision.bench_envoy", "add_bench_envoy"),
                         ("decision.bench_load", "add_bench_load"),
                         ("learners.bench", "add_bench_learner_store")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency inside the module: say so
                raise
            continue
        found.append(getattr(mod, attr))
    return found


def _setup_logging() -> None:
    from decision.config import ConfigError, load_settings
    from decision.logging_json import configure_logging

    try:
        configure_logging(load_settings().log_level)
    except ConfigError as exc:  # INFERMESH_LOG_LEVEL=verbose, before anything could log it
        print(f"infermesh: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _load(config_path: str) -> tuple[Any, Any]:
    from decision.config import ConfigError, load_config, load_settings
    from decision.fleet import InventoryError

    try:
        return load_config(config_path), load_settings()
    except (ConfigError, InventoryError) as exc:
        print(f"infermesh: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _start_failure(exc: Exception, settings: Any) -> str:
    """One line for what stops a start other than the config's own contents: a bundle whose tests
    fail, another process's audit spool, an audit log a newer release migrated, an unreachable
    database (to migrate, or to restore the learner from)."""
    import psycopg

    from audit.database import shown_url

    if isinstance(exc, psycopg.OperationalError):
        where = shown_url(settings.database_url) if settings.database_url else "the embedded PostgreSQL"
        return f"infermesh: cannot start: the audit database {where} cannot be reached: {' '.join(str(exc).split())}"
    return f"infermesh: {exc}"


class StartRefused(Exception):
    """What stops a service from starting, as the one line ``serve`` prints for it (then exit 2)."""


def start_service(cfg: Any, settings: Any, **kwargs: Any) -> Any:
    """Build the service; what stops it (the config's files or sections, a held spool or replica id,
    the database) raises :class:`StartRefused` with one line, not a traceback."""
    import psycopg

    from audit.database import NoAuditLog
    from audit.spool import SpoolInUse
    from decision.config import ConfigError
    from decision.fleet import InventoryError
    from decision.service import Service
    from policies.errors import BundleError, BundleRejected

    try:
        return Service(cfg, settings, **kwargs)
    except (InventoryError, BundleError, ConfigError) as exc:  # already file:line: what
        raise StartRefused(f"infermesh: {exc}") from None
    except (BundleRejected, SpoolInUse, NoAuditLog, psycopg.OperationalError) as exc:
        raise StartRefused(_start_failure(exc, settings)) from None
    except (ValueError, TypeError, KeyError) as exc:  # a learner, audit or TLS setting the section check let by
        raise StartRefused(f"infermesh: {cfg.path}: cannot start with this config: {type(exc).__name__}: {exc}"
                           ) from None


def _service(cfg: Any, settings: Any, **kwargs: Any) -> Any:
    """:func:`start_service`, or its one line on stderr and exit 2."""
    try:
        return start_service(cfg, settings, **kwargs)
    except StartRefused as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def cmd_fleet_check(args: argparse.Namespace) -> int:
    from decision.config import path_problem
    from decision.fleet import InventoryError, load_fleet

    path = Path(args.path)
    problem = path_problem(path)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    try:
        fleet = load_fleet(path)
    except InventoryError as exc:
        for issue in exc.issues:
            print(str(issue), file=sys.stderr)
        print(f"{path}: {len(exc.issues)} error(s)", file=sys.stderr)
        return 1
    tiers = {t: sum(1 for e in fleet.endpoints if e.tier == t) for t in fleet.tiers()}
    print(f"{path}: ok: {len(fleet.sites)} sites, {len(fleet.spec.nodes)} nodes, {len(fleet.endpoints)} endpoints "
          f"({', '.join(f'{k} {v}' for k, v in tiers.items())}), {len(fleet.models)} models, "
          f"revision {fleet.revision}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from decision.convert import decision_to_json, request_from_json
    from decision.errors import DecisionError

    cfg, settings = _load(args.config)
    try:
        raw, data = read_json_request(args.request)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    service = _service(cfg, settings, audit_enabled=False)
    assert service.engine is not None
    try:
        decision = service.engine.decide(request_from_json(data))
    except DecisionError as exc:
        # InvalidArgument and NotFound name the request field (an unknown model or family is one too).
        field = getattr(exc, "field", None)
        line = _key_line(raw, field) if isinstance(field, str) else None
        if line is not None:  # where to look, as an editor wants it
            print(f"{args.request}:{line}: {exc}", file=sys.stderr)
        print(json.dumps({"error": type(exc).__name__, "message": str(exc), "field": field,
                          "rules": list(getattr(exc, "rules", ())),
                          "location": f"{args.request}:{line}" if line is not None else None}))
        return 1
    out = decision_to_json(decision, service.fleet.revision)  # as a gRPC DecideResponse carries it
    if not args.trace:
        out.pop("trace")
    print(json.dumps(out, indent=2, default=str))
    return 0


def _key_line(raw: str, field: str) -> int | None:
    r"""The 1-based line of the request document's top-level key that ``field`` (``labels.x``,
    ``allowed_jurisdictions[2]``) starts with; None when it does not appear.

    >>> _key_line('{"tenant": "t",\n "model": 5}', "model"), _key_line('{"a": 1}', "model")
    (2, None)
    >>> _key_line('{"labels": {"model": "x"},\n "model": 5}', "model")  # the label of that name is not it
    2
    """
    key = re.split(r"[.\[]", field, maxsplit=1)[0]
    for found in re.finditer(rf'"{re.escape(key)}"\s*:', raw):
        if _depth_at(raw, found.start()) == 1:  # a top-level key, not a label or nested value of that name
            return raw.count("\n", 0, found.start()) + 1
    return None


def _depth_at(raw: str, end: int) -> int:
    """How many JSON objects/arrays are open at ``end`` (strings, and escapes in them, skipped)."""
    depth, in_string, escaped = 0, False, False
    for ch in raw[:end]:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return depth


def cmd_serve(args: argparse.Namespace) -> int:
    from decision.config import port_clash

    _setup_logging()
    log = logging.getLogger("infermesh.serve")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked for while starting must not end it
    cfg, settings = _load(args.config)
    workers = args.workers or cfg.server.workers
    clash = port_clash(cfg.server.grpc_port if args.grpc_port is None else args.grpc_port,
                       cfg.server.http_port if args.http_port is None else args.http_port,
                       cfg.extproc.port if cfg.extproc.enabled else None, workers)
    if clash:
        print(f"infermesh: {cfg.path}: {clash}", file=sys.stderr)
        return 2
    if workers > 1:
        import psycopg

        from audit.database import NoAuditLog
        from decision.workers import serve_workers

        try:  # the parent migrates the shared database before any worker starts
            return serve_workers(args.config, workers, grpc_port=args.grpc_port, http_port=args.http_port)
        except (NoAuditLog, psycopg.OperationalError) as exc:
            print(_start_failure(exc, settings), file=sys.stderr)
            return 2
    service = _service(cfg, settings)
    try:
        grpc_port = service.start_grpc(args.grpc_port)
        http_port = service.start_http(args.http_port)
        if cfg.extproc.enabled:
            log.info("serving the Envoy ext_proc endpoint picker on %s:%d", cfg.server.host, service.start_extproc())
    except ValueError as exc:  # the tls: section's files (decision.tls names the one it could not use)
        print(f"infermesh: {cfg.path}: {exc}", file=sys.stderr)
        service.stop(0)
        return 2
    except (RuntimeError, OSError) as exc:  # a port another process holds (grpc says RuntimeError)
        print(f"infermesh: cannot start serving on {cfg.server.host}: {exc}", file=sys.stderr)
        service.stop(0)
        return 2
    log.info("serving gRPC on %s:%d, HTTP on %s:%d (policy %s, learner %s)", cfg.server.host, grpc_port,
             cfg.server.host, http_port, service.policies.guard.revision,
             service.engine.learner.name if service.engine else "?")
    if service.audit.database_url:
        log.info("audit log in %s", service.audit.database_url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=service.reload_policies, daemon=True).start())
    print(f"infermesh serving: grpc {cfg.server.host}:{grpc_port}  http http://{cfg.server.host}:{http_port}",
          flush=True)
    wait_until_set(stop)
    log.info("shutting down: finishing in-flight decisions, draining the audit queue")
    service.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from decision.demo import run_demo

    cfg, settings = _load(args.config)
    return run_demo(cfg, settings, duration_s=args.duration, concurrency=args.concurrency, seed=args.seed)


def cmd_bench_grpc(args: argparse.Namespace) -> int:
    from decision.bench import bench_grpc

    cfg, settings = _load(args.config)
    if args.server_kind is not None:
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"kind": args.server_kind})})
    return bench_grpc(cfg, settings, duration_s=args.duration, clients=args.clients, as_json=args.json,
                      blocks=args.blocks, ceiling=args.ceiling)


def cmd_bench_decide(args: argparse.Namespace) -> int:
    from decision.bench import bench_decide
    from policies.errors import BundleError

    try:
        return bench_decide(args.endpoints or [512, 65536], candidates=args.candidates, iterations=args.iterations,
                            policies=args.policies, learner=args.learner, as_json=args.json)
    except (BundleError, ValueError) as exc:  # --policies or --learner (each names what is wrong)
        print(f"infermesh bench decide: {exc}", file=sys.stderr)
        return 2
