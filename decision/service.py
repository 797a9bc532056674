"""The composition root: the only module that knows every concrete class.

``build_service`` turns a validated :class:`~decision.config.ServiceConfig` into a running set
of parts (engine, telemetry store and scraper, guard and its reloader, learner, audit writer,
metrics); ``Service.start_grpc`` / ``start_http`` put the front ends on top.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from fastapi import APIRouter

from decision import heap
from decision.config import ServiceConfig, Settings, learner_replica
from decision.contracts import AuditSink, FeatureBuilder, Guard, Learner, TraceReader
from decision.domain import Endpoint
from decision.edge import EdgeInterceptor, RequestLimits
from decision.engine import DecisionEngine
from decision.fleet import Fleet, load_fleet
from decision.grpc_server import SERVICE_NAME, DecisionServicer, build_server, handler_pool
from decision.grpc_serving import health_status
from decision.health_guard import BuiltinHealthGuard
from decision.http import HttpServer, create_app
from decision.metrics import ServiceMetrics
from decision.outcome_claims import RedisOutcomeClaims
from decision.scoring import BasicFeatures
from decision.scraper import Scraper
from decision.telemetry import TelemetryStore
from decision.tls import server_credentials, server_ssl_context
from decision.tracing import configure_tracing

if TYPE_CHECKING:
    from decision.extproc import RunningExtProc
    from decision.grpc_aio import AioDecisionServer
    from decision.split_server import SplitDecisionServer
    from learners.sync import LearnerSync

log = logging.getLogger("infermesh.service")


@dataclass
class AuditParts:
    """What the audit package contributes; all optional so the service runs without a database."""

    sink: AuditSink | None = None
    reader: TraceReader | None = None
    flush: Callable[[], None] | None = None
    close: Callable[[], None] | None = None
    routers: tuple[APIRouter, ...] = ()
    health: Callable[[], Mapping[str, Any]] | None = None
    gauges: Mapping[str, Callable[[], float]] = field(default_factory=dict)
    database_url: str = ""


@dataclass
class PolicyParts:
    guard: Guard
    reload: Callable[[], tuple[bool, str, str]] | None = None
    health: Callable[[], Mapping[str, Any]] | None = None
    stop: Callable[[], None] | None = None  # the bundle's file watcher
    close: Callable[[], None] | None = None  # the shared quota counters' Redis client, after the last decision


def load_guard(policies: str | Path, fleet: Fleet) -> Guard:
    """A guard from a policy bundle folder, or the built-in health rule for ``"builtin"``."""
    if str(policies) == "builtin":
        return BuiltinHealthGuard()
    from policies.integration import load_policy_guard  # the guardrail package's entry point

    guard: Guard = load_policy_guard(Path(policies))
    return guard


def build_policies(config: ServiceConfig, settings: Settings, fleet: Fleet, on_swap: Callable[[Guard], None],
                   on_failure: Callable[[str], None] | None = None) -> PolicyParts:
    if config.policies is None:
        return PolicyParts(BuiltinHealthGuard())
    from policies.integration import build_policy_parts

    parts: PolicyParts = build_policy_parts(config.policies, settings=settings, on_swap=on_swap,
                                            on_failure=on_failure)
    return parts


def make_features(name: str) -> FeatureBuilder:
    if name == "basic":
        return BasicFeatures()
    from learners.features import default_feature_builder

    return default_feature_builder()


def build_learner(config: ServiceConfig, n_features: int) -> tuple[Learner, tuple[Learner, ...]]:
    """The acting learner and the shadows; a bad name or parameter is a :class:`ConfigError` at its line."""
    from learners.registry import REGISTRY, learner_from_spec, make_learner

    section = config.learner
    with config.located("learner", "name" if section.name not in REGISTRY else "params"):
        acting: Learner = make_learner(section.name, n_features, **section.params)
    shadows = []
    for i, spec in enumerate(section.shadow):
        with config.located("learner", "shadow", i):
            shadows.append(learner_from_spec(spec, n_features))
    return acting, tuple(shadows)


def build_audit(config: ServiceConfig, settings: Settings,
                reload: Callable[[], str] | None = None) -> AuditParts:
    if not config.audit.get("enabled", True):
        return AuditParts()
    from audit.integration import build_audit_parts  # the audit package's entry point

    parts: AuditParts = build_audit_parts(config.audit, settings=settings, reload=reload)
    return parts


class Service:
    """A configured decision service and its front ends."""

    def __init__(self, config: ServiceConfig, settings: Settings, *, audit_enabled: bool | None = None) -> None:
        # What a step of the start starts (the bundle's file watcher, the audit writer and its upkeep, the
        # learner store's session holding the replica id) is stopped again if a later step fails, and the
        # error re-raised: an embedding caller (tests, demo, serve --workers) must not keep it running.
        started: list[Callable[[], None]] = []
        try:
            self._start(config, settings, audit_enabled, started)
        except BaseException:
            stop_started(started)
            raise

    def _start(self, config: ServiceConfig, settings: Settings, audit_enabled: bool | None,
               started: list[Callable[[], None]]) -> None:
        """Build the parts; each one that runs until stopped is added to ``started`` once it runs."""
        self.config = config
        self.settings = settings
        self.metrics = ServiceMetrics()
        configure_tracing(settings.otel_exporter)
        self.fleet = load_fleet(config.fleet)
        _check_scrape_targets(config, self.fleet)
        self.telemetry = TelemetryStore({e.endpoint_id: e.node_id for e in self.fleet.endpoints},
                                        stale_after_s=config.telemetry.stale_after_s)
        self.scraper = Scraper(self.telemetry, config.telemetry.scrape, interval_s=config.telemetry.scrape_interval_s,
                               timeout_s=config.telemetry.scrape_timeout_s)
        # Learners, reward and policies before the audit log starts (a database, migrations, a writer
        # process): a bad parameter or rule stops the start before anything is half-started.
        features = make_features(config.learner.features)
        learner, shadows = build_learner(config, len(features.names))
        reward = _build_reward(config)
        self.engine: DecisionEngine | None = None
        # A bundle the file watcher swaps in before the engine exists (the audit log takes seconds to
        # start) is kept here and given to the engine when it is built.
        self._guard_lock = threading.Lock()
        self._latest_guard: Guard | None = None
        self.policies = build_policies(config, settings, self.fleet, self._swap_guard,
                                       on_failure=lambda _error: self.metrics.policy_reload_failures.inc())
        if self.policies.stop is not None:
            started.append(self.policies.stop)  # the bundle's file watcher
        if self.policies.close is not None:
            started.append(self.policies.close)  # the quota counters' Redis connections
        if audit_enabled is False:
            self.audit = AuditParts()
        else:
            self.audit = build_audit(config, settings, reload=self._admin_reload)
        if self.audit.close is not None:
            started.append(self.audit.close)  # the writer (a process by default) and the partition upkeep
        # One process unless `serve --workers N` started it as one of N (it says so in INFERMESH_WORKERS):
        # server.workers is what serve starts, not what this process is part of (serve --workers 1).
        routers = config.decision.routers or settings.workers or 1
        self._claims = _outcome_claims(settings.redis_url, routers, config.decision.outcome_timeout_s)
        if self._claims is not None:
            started.append(self._claims.close)  # its Redis connections
        engine = DecisionEngine(
            self.fleet, self.telemetry, self.policies.guard, learner, features=features,
            audit=self.audit.sink, traces=self.audit.reader, reward=reward, shadow=shadows,
            max_fallbacks=config.decision.max_fallbacks, max_candidates=config.decision.max_candidates,
            count_inflight=config.decision.count_inflight,
            routers=routers,
            claims=self._claims,
            added_delay_weight=config.decision.added_delay_weight,
            cost_weight_ms=config.decision.cost_weight_ms,
            outcome_timeout_s=config.decision.outcome_timeout_s)
        with self._guard_lock:
            self.engine = engine
            if self._latest_guard is not None:
                engine.set_guard(self._latest_guard)
        engine.on_stages = self.metrics.record_stages
        self.metrics.gauge("infermesh_pending_outcomes", "Decisions awaiting an outcome.",
                           lambda: float(self.engine.pending_outcomes() if self.engine else 0))
        for name, read in self.audit.gauges.items():
            self.metrics.gauge(name, f"Audit writer: {name}.", read)
        self.metrics.counter("infermesh_telemetry_rejected_total", "Telemetry values dropped (negative, infinite, "
                             "or stamped too far ahead).", lambda: self.telemetry.rejected)
        self.metrics.counter("infermesh_telemetry_scrapes_total", "Scrapes of configured targets that answered.",
                             lambda: self.scraper.scrapes)
        self.metrics.counter("infermesh_telemetry_scrape_failures_total", "Scrapes of configured targets that failed.",
                             lambda: self.scraper.failures)
        self.learner_sync = _build_learner_sync(config, settings, self.audit, learner, features,
                                                barrier=engine.outcome_barrier)
        if self.learner_sync is not None:
            started.append(functools.partial(_discard_learner_sync, self.learner_sync))  # holds the replica id
        self.grpc_server: grpc.Server | AioDecisionServer | SplitDecisionServer | None = None
        self._grpc_pool: futures.ThreadPoolExecutor | None = None  # the threads kind's handlers
        self.grpc_port = 0
        self.extproc: RunningExtProc | None = None  # when config.extproc.enabled
        self.http: HttpServer | None = None
        self._expiry_stop = threading.Event()
        self.draining = False  # set by stop(): /healthz says so while in-flight calls finish
        self._stopped = False
        self._set_serving: Callable[[bool], None] | None = None  # DecisionService's gRPC health, once serving
        self._serving = True
        self._expiry = threading.Thread(target=self._expire_loop, name="outcome-expiry", daemon=True)
        heap.settle()  # fleet, policies, learners: alive for good, out of the collector's way

    def _swap_guard(self, guard: Guard) -> None:
        with self._guard_lock:
            self._latest_guard = guard
            if self.engine is not None:
                self.engine.set_guard(guard)
        self.metrics.policy_reloads.inc()

    def _admin_reload(self) -> str:
        """The auditors' API's admin reload: the new revision, or ValueError naming why it was refused."""
        ok, revision, error = self.reload_policies()
        if not ok:
            raise ValueError(error or "reload refused")
        return revision

    def reload_policies(self) -> tuple[bool, str, str]:
        if self.policies.reload is None:
            return False, self.policies.guard.revision, "no policy bundle configured"
        return self.policies.reload()  # a rejected bundle is counted by the reloader's on_failure

    def health(self) -> dict[str, Any]:
        assert self.engine is not None
        details: dict[str, Any] = {"status": "ok", "inventory_revision": self.fleet.revision,
                                   "policy_revision": self.engine.guard.revision,
                                   "learner": f"{self.engine.learner.name}@{self.engine.learner.version}",
                                   "decisions": dict(self.engine.stats),
                                   "telemetry_endpoints": self.telemetry.known_endpoints()}
        if self.scraper.targets:
            # Reported, not judged: a failing exporter ages its values until the guardrails treat them
            # as unknown, which is the decision's business, not a reason to restart the service.
            details["telemetry_scrape"] = self.scraper.status()
        if self.policies.health is not None:
            details["policies"] = dict(self.policies.health())
        quota = _quota_store_problem(self.engine.guard)
        if quota is not None:  # every Decide is UNAVAILABLE meanwhile: a balancer should look elsewhere
            details["quota_counters"] = quota
            details["status"] = "degraded"
        if self.audit.health is not None:
            audit = dict(self.audit.health())
            details["audit"] = audit
            if audit.get("status") not in (None, "ok"):
                details["status"] = "degraded"
        problem = getattr(self.grpc_server, "problem", None)  # a split server's front can go away
        transport = problem() if problem is not None else None
        if transport is not None:  # nothing answers on the gRPC port: restart the process
            details["grpc"] = transport
            details["status"] = "failed"
        if self.draining:  # stopping: Decide answers UNAVAILABLE; a balancer must look elsewhere now
            details["status"] = "draining"
        return details

    def _expire_loop(self) -> None:
        ticks = 0
        while not self._expiry_stop.wait(1.0):
            if self.engine is not None:
                self.engine.expire_outcomes()
                ticks += 1
                if ticks % 5 == 0:
                    self.watch_quota_store()

    def watch_quota_store(self) -> None:
        """gRPC health says NOT_SERVING for DecisionService while the shared quota counters cannot be
        read (every Decide is UNAVAILABLE meanwhile), and SERVING again once they can."""
        if self.engine is None or self._set_serving is None:
            return
        serving = _quota_store_problem(self.engine.guard) is None
        if serving != self._serving:
            self._set_serving(serving)
            self._serving = serving
            log.log(logging.INFO if serving else logging.WARNING, "DecisionService health: %s (quota counters %s)",
                    "SERVING" if serving else "NOT_SERVING", "reachable" if serving else "unreachable")

    def start_grpc(self, port: int | None = None, *, reuse_port: bool = False) -> int:
        assert self.engine is not None
        srv = self.config.server
        servicer = DecisionServicer(self.engine, self.metrics,
                                    reload_policies=self.reload_policies if self.policies.reload else None,
                                    flush_audit=self.audit.flush)
        address = f"{srv.host}:{srv.grpc_port if port is None else port}"
        self.grpc_server, self.grpc_port, set_serving = self.decision_server(servicer, address, reuse_port=reuse_port)
        self._set_serving = set_serving
        self.scraper.start()
        if self.learner_sync is not None:
            self.learner_sync.start(self.config.learner.sync_interval_s, self.config.learner.snapshot_every_s)
        if not self._expiry.is_alive():
            self._expiry.start()
        return self.grpc_port

    def decision_server(self, servicer: DecisionServicer, address: str, *,
                        reuse_port: bool = False) -> tuple[Any, int, Callable[[bool], None]]:
        """A started server of the configured kind for ``servicer`` (edge checks, limits, TLS as
        configured): (server, its port, a callable that reports DecisionService (not) serving)."""
        srv = self.config.server
        edge = EdgeInterceptor(RequestLimits(**self.config.limits.model_dump()), self.metrics)
        if srv.kind == "split":
            from decision.split_server import SplitDecisionServer

            split = SplitDecisionServer(servicer, address=address, max_message_bytes=srv.max_message_bytes,
                                        reuse_port=reuse_port, tls=self.config.tls, base=self.config.path.parent,
                                        edge=edge)
            return split, split.port, functools.partial(split.set_serving, SERVICE_NAME)
        if srv.kind == "asyncio":
            from decision.grpc_aio import AioDecisionServer

            aio = AioDecisionServer(servicer, address=address, max_message_bytes=srv.max_message_bytes,
                                    reuse_port=reuse_port, credentials=self._server_credentials(), edge=edge)
            return aio, aio.port, functools.partial(aio.set_serving, SERVICE_NAME)
        self._grpc_pool = handler_pool(srv.threads)
        server, port, health_servicer = build_server(
            servicer, address=address, max_message_bytes=srv.max_message_bytes, reuse_port=reuse_port,
            credentials=self._server_credentials(), interceptors=[edge], pool=self._grpc_pool)
        server.start()
        return server, port, lambda serving: health_servicer.set(SERVICE_NAME, health_status(serving))

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        """The ``tls:`` section's credentials, shared by the decision API and the ext_proc port."""
        tls = self.config.tls
        return server_credentials(tls, self.config.path.parent) if tls is not None else None

    def _extproc_tls(self, kind: str) -> dict[str, Any]:
        """The ``tls:`` section in the form the ext_proc server kind takes (grpclib: an SSLContext)."""
        tls = self.config.tls
        if tls is None:
            return {}
        if kind == "grpclib":
            return {"ssl_context": server_ssl_context(tls, self.config.path.parent)}
        return {"credentials": self._server_credentials()}

    def start_extproc(self, port: int | None = None, *, reuse_port: bool = False) -> int:
        """Serve the Envoy ext_proc endpoint picker on its own port (``deploy/envoy/README.md``)."""
        from decision.extproc import serve_extproc
        from decision.extproc_config import ExtProcConfig

        assert self.engine is not None
        ep = self.config.extproc
        server = serve_extproc(self.engine, ExtProcConfig.from_mapping(ep.settings),
                               address=f"{self.config.server.host}:{ep.port if port is None else port}",
                               max_streams=ep.max_streams, server_kind=ep.server, metrics=self.metrics,
                               reuse_port=reuse_port, **self._extproc_tls(ep.server))
        self.extproc = server
        _warn_unroutable_addresses(self.engine.fleet.endpoints)
        return server.port

    def start_http(self, port: int | None = None) -> int:
        app = create_app(self.metrics, self.health, self.audit.routers)
        srv = self.config.server
        self.http = HttpServer(app, srv.host, srv.http_port if port is None else port)
        self.http.start()
        return self.http.port

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful: stop accepting, let in-flight RPCs finish, then drain the audit queue.

        Then the connections go, each after its last use: the learner store's (after the final
        snapshot) and the Redis clients of the quota counters and outcome claims (after the audit
        drain). A second call does nothing.
        """
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        grace = self.config.server.grace_s if grace_s is None else grace_s
        if isinstance(self.grpc_server, grpc.Server):
            self.grpc_server.stop(grace).wait()
            if self._grpc_pool is not None:  # every handler has returned; grpc leaves the pool's threads idle
                self._grpc_pool.shutdown(wait=True)
        elif self.grpc_server is not None:
            self.grpc_server.stop(grace)
        if self.extproc is not None:
            self.extproc.stop(grace)
        if self.http is not None:
            self.http.stop()
        self.scraper.stop()
        self._expiry_stop.set()
        if self._expiry.is_alive():  # a timeout it is learning now must be in the final snapshot and the log
            self._expiry.join(10)
        if self.policies.stop is not None:
            self.policies.stop()
        try:
            self._stop_learner_sync()
            self._drain_audit()
        finally:
            self._close_redis_clients()

    def _stop_learner_sync(self) -> None:
        """The final snapshot, the replica id given back, and the store's session closed."""
        if self.learner_sync is None:
            return
        try:
            self.learner_sync.stop(final_snapshot=True)  # no learning lost on restart
        except Exception:  # the audit queue below must drain whatever the learner's database does
            log.exception("learner: the final snapshot on stop failed (what was learnt since the last sync "
                          "is not stored; a single instance replays it from the audit log on restart)")
        finally:
            _close_logged("the learner store", self.learner_sync.store.close)

    def _drain_audit(self) -> None:
        if self.audit.close is not None:
            started = time.monotonic()
            self.audit.close()
            log.info("audit queue drained in %.2fs", time.monotonic() - started)

    def _close_redis_clients(self) -> None:
        """The outcome claims' and the quota counters' Redis clients: nothing decides or learns any more."""
        if self._claims is not None:
            _close_logged("the outcome claims' Redis client", self._claims.close)
        if self.policies.close is not None:
            _close_logged("the quota counters' Redis client", self.policies.close)


def stop_started(started: Sequence[Callable[[], None]]) -> None:
    """Stop what a failed start had started, newest first.

    One that fails to stop is logged, and the others are stopped all the same: the start's own
    error is what the caller hears (the caller re-raises it).

    Parameters
    ----------
    started
        The stop (or close) of each part that runs until stopped, in the order the parts started.
    """
    for stop in reversed(started):
        try:
            stop()
        except Exception:
            log.exception("stopping %r after a failed start failed", stop)


def _close_logged(what: str, close: Callable[[], None]) -> None:
    """Close one part on stop; a failure is logged, and what is left to stop is stopped all the same."""
    try:
        close()
    except Exception:
        log.exception("service stop: closing %s failed", what)


def _discard_learner_sync(sync: LearnerSync) -> None:
    """Give back the replica id a failed start claimed and end the store's session, saving nothing:
    the learner learnt nothing yet (no sync thread runs before start_grpc)."""
    try:
        sync.stop(final_snapshot=False)
    finally:
        sync.store.close()


def _outcome_claims(redis_url: str, routers: int, outcome_timeout_s: float) -> RedisOutcomeClaims | None:
    """Shared outcome claims when several processes take outcomes (``routers`` > 1) and share a
    Redis: an outcome retried at another replica is then learnt once (decision.outcome_claims)."""
    if not redis_url or routers <= 1:
        return None
    # Longer than any retry of an outcome can come: a decision is remembered that long at most.
    return RedisOutcomeClaims(redis_url, ttl_s=2 * outcome_timeout_s + 60)


def _build_learner_sync(config: ServiceConfig, settings: Settings, audit: AuditParts, learner: Learner,
                        features: FeatureBuilder, *, barrier: AbstractContextManager[Any]) -> Any:
    """Restore the learner from its newest snapshot (+ replica deltas, + replayed outcomes); None without a DB."""
    if not audit.database_url or not hasattr(learner, "state_dict"):
        return None
    from learners.store import LearnerStore
    from learners.sync import LearnerSync

    replica = learner_replica(config, settings)
    store = LearnerStore(audit.database_url, delta_page_rows=config.learner.delta_page_rows,
                         delta_page_bytes=config.learner.delta_page_bytes)
    sync = LearnerSync(learner, store, features.names, replica=replica, barrier=barrier)
    try:
        report = sync.restore()
    except BaseException:  # e.g. ReplicaInUse: the session must not outlive the refused start
        sync.store.close()
        raise
    log.info("learner %s@%s restored: snapshot %s, %d replica deltas, %d outcomes replayed", learner.name,
             learner.version, report.snapshot_id, report.deltas, report.replayed)
    return sync


def _build_reward(config: ServiceConfig) -> Any:
    """The learners' reward (``learner.reward``; its documented defaults when the section is left out);
    it prices cost as the score stage does (``decision.cost_weight_ms``)."""
    from learners.reward import reward_from_config

    with config.located("learner", "reward"):
        return reward_from_config(config.learner.reward or {}, cost_weight_ms=config.decision.cost_weight_ms)


def _warn_unroutable_addresses(endpoints: Sequence[Endpoint]) -> None:
    """Envoy's ORIGINAL_DST cluster (``deploy/envoy/envoy.yaml``) dials the picked address as given and
    takes IP literals only: a host name there fails every request routed to it (503), though the
    decision is logged as routed. Said once at start-up; other Envoy set-ups may resolve names."""
    named = sorted({e.endpoint_id for e in endpoints if not _ip_literal(e.address.rsplit(":", 1)[0])})
    if named:
        log.warning("ext_proc: %d endpoint(s) have a host name, not an IP, as address (e.g. %s): Envoy's "
                    "ORIGINAL_DST cluster cannot dial those; see deploy/envoy/README.md", len(named), named[0])


def _ip_literal(host: str) -> bool:
    """
    >>> _ip_literal("10.0.0.7"), _ip_literal("[::1]"), _ip_literal("gpu-node-7.internal")
    (True, True, False)
    """
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _check_scrape_targets(config: ServiceConfig, fleet: Fleet) -> None:
    """A scrape target names an endpoint or node of the fleet: one that does not would scrape
    successfully every time while its values went nowhere."""
    for i, t in enumerate(config.telemetry.scrape):
        if t.endpoint_id and t.endpoint_id not in fleet.by_id:
            with config.located("telemetry", "scrape", i, "endpoint_id"):
                raise ValueError(f"no endpoint {t.endpoint_id!r} in the fleet")
        node = fleet.by_id[t.endpoint_id].node_id if t.endpoint_id else ""
        if t.node_id and t.node_id not in fleet.node_ids:
            with config.located("telemetry", "scrape", i, "node_id"):
                raise ValueError(f"no node {t.node_id!r} with a deployment in the fleet")
        if t.node_id and node and t.node_id != node:
            with config.located("telemetry", "scrape", i, "node_id"):
                raise ValueError(f"endpoint {t.endpoint_id!r} runs on node {node!r}, not {t.node_id!r}")


def _quota_store_problem(guard: Guard) -> str | None:
    """Why the guard's shared quota counters cannot be read now (None: they can, or it has none)."""
    counters = getattr(guard, "counters", None)
    if counters is None or not getattr(guard, "reads_state", False):
        return None
    try:
        counters.read("infermesh-healthz", time.time())
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    return None
