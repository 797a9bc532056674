"""The gRPC front end: DecisionService, standard health and server reflection.

A thin adapter over :class:`decision.engine.DecisionEngine`. Typed errors from the pipeline
become gRPC statuses here and only here; every error's details name the field or the rules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from decision.convert import decision_to_pb, outcome_from_pb, request_from_pb, trace_to_pb
from decision.domain import Decision, RequestContext
from decision.edge import metadata_value
from decision.engine import DecisionEngine
from decision.errors import (
    DecisionError,
    InvalidArgument,
    NoCandidate,
    NotFound,
    QuotaExceeded,
    Unavailable,
)
from decision.grpc_serving import bind_port
from decision.metrics import ServiceMetrics
from decision.reflection import enable_reflection
from decision.telemetry import (
    KEPT_EXPORTER_METRICS,
    Sample,
    TelemetryStore,
    canonical_name,
    canonicalize,
    parse_exposition,
    refused_value,
    timestamp_problem,
    unusable_samples,
    value_rule,
)
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

log = logging.getLogger("infermesh.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DecisionService"].full_name
T = TypeVar("T")


_DETAILS_MAX = 1024
_MESSAGE_MAX = 640  # of a refused push's message, leaving room in _DETAILS_MAX for the field and the batch note


def status_of(exc: DecisionError) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """The gRPC status, details and trailing metadata for a pipeline error.

    The details are capped: an error that quotes a huge value (a 20 KB jurisdiction) would exceed
    gRPC's metadata limit, and the client would see RESOURCE_EXHAUSTED, this service's quota status.
    """
    code, details, trailers = _status_of(exc)
    if len(details) > _DETAILS_MAX:
        details = details[:_DETAILS_MAX - 3] + "..."
    return code, details, trailers


def _status_of(exc: DecisionError) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), [("infermesh-field", metadata_value(exc.field))]
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc), [("infermesh-field", exc.field)]
    if isinstance(exc, QuotaExceeded):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                [("infermesh-rules", ",".join(exc.rules)), ("infermesh-decision-id", exc.decision_id)])
    if isinstance(exc, NoCandidate):
        return (grpc.StatusCode.FAILED_PRECONDITION, str(exc),
                [("infermesh-rules", ",".join(exc.rules)), ("infermesh-decision-id", exc.decision_id)])
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc), []
    return grpc.StatusCode.INTERNAL, str(exc), []


def still_wanted(context: Any) -> bool:
    """Whether the caller still waits for the answer: not cancelled, deadline not passed."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return False
    return bool(context.is_active())


class DecisionServicer(pb_grpc.DecisionServiceServicer):
    def __init__(self, engine: DecisionEngine, metrics: ServiceMetrics,
                 reload_policies: Callable[[], tuple[bool, str, str]] | None = None,
                 flush_audit: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.reload_policies = reload_policies
        self.flush_audit = flush_audit

    def _guarded(self, method: str, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DecisionError as exc:
            code, details, trailers = status_of(exc)
            self.metrics.rpc_errors.labels(method, code.name).inc()
            context.set_trailing_metadata(tuple(trailers))
            context.abort(code, details)
        except Exception:
            log.exception("%s failed", method)
            self.metrics.rpc_errors.labels(method, "UNAVAILABLE").inc()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: internal failure (logged); retry")
        raise AssertionError("unreachable")  # context.abort raises

    def decide(self, ctx: RequestContext, alive: Callable[[], bool] | None = None) -> Decision:
        """The decision a ``Decide`` call answers with (``bench grpc --ceiling`` replaces it)."""
        return self.engine.decide(ctx, alive=alive)

    def Decide(self, request: pb.DecideRequest, context: grpc.ServicerContext) -> pb.DecideResponse:
        def run() -> pb.DecideResponse:
            try:
                d = self.decide(request_from_pb(request), lambda: still_wanted(context))
            except NoCandidate as exc:
                self.metrics.record_denial(exc)
                raise
            self.metrics.record_decision(d)
            return decision_to_pb(d, self.engine.fleet.revision)

        return self._guarded("Decide", context, run)

    def ReportOutcome(self, request: pb.Outcome, context: grpc.ServicerContext) -> pb.OutcomeAck:
        def run() -> pb.OutcomeAck:
            outcome = outcome_from_pb(request)
            res = self.engine.report_outcome(outcome)
            self.metrics.record_outcome(outcome.status, res)
            ack = pb.OutcomeAck(decision_id=res.decision_id, accepted=res.accepted, duplicate=res.duplicate)
            if res.reward is not None:
                ack.reward = res.reward
            return ack

        return self._guarded("ReportOutcome", context, run)

    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.Trace:
        def run() -> pb.Trace:
            if not request.decision_id:
                raise InvalidArgument("decision_id", "required")
            reader = self.engine.traces
            if reader is None:
                raise Unavailable("Explain needs the audit log, which is not configured")
            record = reader.get_decision(request.decision_id)
            if record is None and self.flush_audit is not None:
                self.flush_audit()  # the decision may still be in the writer's queue
                record = reader.get_decision(request.decision_id)
            if record is None:
                raise NotFound("decision", request.decision_id, "decision_id")
            answer = trace_to_pb(record)
            # The log keeps where a route ran (site, region, GPU), not how to reach it: address and node
            # come from the inventory, while the endpoint is still in it.
            ep = self.engine.fleet.by_id.get(answer.route.endpoint_id)
            if ep is not None:
                answer.route.address, answer.route.node_id = ep.address, ep.node_id
            return answer

        return self._guarded("Explain", context, run)

    def PushTelemetry(self, request_iterator: Iterator[pb.TelemetryBatch],
                      context: grpc.ServicerContext) -> pb.TelemetryAck:
        def run() -> pb.TelemetryAck:
            accepted = batches = 0  # batches: those stored so far, so also the index of the next
            try:
                for batch in request_iterator:  # the edge's per-message checks raise here
                    accepted += self.ingest_batch(batch)
                    batches += 1
            except DecisionError as exc:
                raise self.push_refused(batches, accepted, exc) from None
            return self.telemetry_ack(accepted, batches)

        return self._guarded("PushTelemetry", context, run)

    def ingest_stream_batch(self, index: int, accepted: int, batch: pb.TelemetryBatch) -> int:
        """:meth:`ingest_batch` for batch ``index`` of a stream whose earlier batches stored ``accepted`` samples."""
        try:
            return self.ingest_batch(batch)
        except DecisionError as exc:
            raise self.push_refused(index, accepted, exc) from None

    def push_refused(self, index: int, accepted: int, exc: DecisionError) -> DecisionError:
        """The error that ends a push at batch ``index``, once the ``accepted`` samples stored before it are counted.

        The batches before it stay stored (each is all or nothing; the stream is not), so an error
        in a later batch names it (``batch[2].samples[0].value: ...``, the edge's name for a stream
        message) and says so: the pusher resends from that batch, not from the start. An error with
        no ``batch[i]`` prefix is in the first batch, as it always was.
        """
        self.metrics.telemetry_samples.labels("push").inc(accepted)  # stored, though no ack reports them
        if index == 0 or not isinstance(exc, InvalidArgument):
            return exc
        prefix = f"batch[{index}]"
        field = exc.field if exc.field == prefix else f"{prefix}.{exc.field}"  # the edge's parse error names it
        earlier = "batch[0] before it was applied" if index == 1 else f"batches 0-{index - 1} before it were applied"
        message = exc.message if len(exc.message) <= _MESSAGE_MAX else exc.message[:_MESSAGE_MAX - 3] + "..."
        # Shortened so the status's 1 KB cap cannot cut off what happened to the stream.
        return InvalidArgument(field, f"{message} ({earlier}; this batch and any after it were not)")

    def ingest_batch(self, batch: pb.TelemetryBatch) -> int:
        """Store one pushed batch; returns samples accepted.

        All or nothing, as the edge's per-message limits: every item is checked before any is
        stored, and the first bad one raises InvalidArgument naming it (an unknown metric or
        target, ``samples[3].value: must be finite and >= 0``, a timestamp that is negative or more
        than the store's clock-skew allowance in the future, exposition text that does not parse
        or gives a kept series a negative or infinite value). A rejected batch stores nothing;
        batches before it in the stream stay stored (:meth:`push_refused` says so). A NaN value
        means "no value", as in exposition text: accepted, and stores nothing.
        """
        store: TelemetryStore = self.engine.telemetry
        fleet = self.engine.fleet
        nodes = fleet.node_ids
        now = store.now()
        writes = [_checked_sample(store, now, fleet.by_id, nodes, i, s) for i, s in enumerate(batch.samples)]
        texts = [_checked_exposition(store, now, fleet.by_id, nodes, i, x) for i, x in enumerate(batch.expositions)]
        for node, endpoint, name, value, ts in writes:
            if node:
                store.update_node(node, {name: value}, ts)
            else:
                store.update_endpoint(endpoint, {name: value}, ts)
        accepted = len(writes)
        for x, samples, ts in texts:
            accepted += store.ingest_samples(samples, node_id=x.node_id, endpoint_id=x.endpoint_id, ts=ts)
        return accepted

    def telemetry_ack(self, accepted: int, batches: int) -> pb.TelemetryAck:
        self.metrics.telemetry_samples.labels("push").inc(accepted)
        return pb.TelemetryAck(samples_accepted=accepted, batches=batches)

    def ReloadPolicies(self, request: pb.ReloadPoliciesRequest,
                       context: grpc.ServicerContext) -> pb.ReloadPoliciesResponse:
        def run() -> pb.ReloadPoliciesResponse:
            if self.reload_policies is None:
                raise Unavailable("no policy bundle is configured (the built-in health rule is in use)")
            ok, revision, error = self.reload_policies()
            return pb.ReloadPoliciesResponse(reloaded=ok, revision=revision, error=error)

        return self._guarded("ReloadPolicies", context, run)


def _checked_stamp(store: TelemetryStore, now: float, field: str, unix_ms: int) -> float | None:
    """A pushed timestamp in seconds (None: 0, "now"); raises InvalidArgument if it is negative or too far ahead."""
    if not unix_ms:
        return None
    ts = unix_ms / 1000.0
    problem = timestamp_problem(ts, now, store.max_clock_skew_s)
    if problem is not None:
        raise InvalidArgument(field, problem)
    return ts


def _checked_sample(store: TelemetryStore, now: float, by_id: dict[str, Any], nodes: frozenset[str], i: int,
                    s: pb.TelemetrySample) -> tuple[str, str, str, float, float | None]:
    """(node id or "", endpoint id or "", canonical metric, value, timestamp) of sample ``i``, checked."""
    known = canonical_name(s.metric)
    if known is None:
        raise InvalidArgument(f"samples[{i}].metric", f"unknown metric {s.metric!r}")
    name, node_level = known
    if refused_value(s.value, name):  # NaN passes: "no value", skipped by the store
        raise InvalidArgument(f"samples[{i}].value", f"{name} {value_rule(name)}, got {s.value!r}")
    ts = _checked_stamp(store, now, f"samples[{i}].timestamp_unix_ms", s.timestamp_unix_ms)
    if node_level:
        if s.node_id:
            if s.node_id not in nodes:
                raise InvalidArgument(f"samples[{i}].node_id", f"unknown node {s.node_id!r}")
            return s.node_id, "", name, s.value, ts
        if s.endpoint_id not in by_id:  # a node-level metric for an endpoint: that endpoint's node
            raise InvalidArgument(f"samples[{i}].endpoint_id", f"unknown endpoint {s.endpoint_id!r}" if s.endpoint_id
                                  else "required (or node_id) for a node-level metric")
        return by_id[s.endpoint_id].node_id, "", name, s.value, ts
    if s.endpoint_id not in by_id:
        raise InvalidArgument(f"samples[{i}].endpoint_id", f"unknown endpoint {s.endpoint_id!r}")
    return "", s.endpoint_id, name, s.value, ts


def _checked_exposition(store: TelemetryStore, now: float, by_id: dict[str, Any], nodes: frozenset[str], i: int,
                        x: pb.Exposition) -> tuple[pb.Exposition, list[Sample], float | None]:
    """(exposition, its parsed samples, timestamp) of exposition ``i``, checked."""
    if not x.endpoint_id and not x.node_id:  # else nothing it says could be stored, yet it would be acked
        raise InvalidArgument(f"expositions[{i}].endpoint_id", "one of endpoint_id or node_id is required")
    if x.endpoint_id and x.endpoint_id not in by_id:
        raise InvalidArgument(f"expositions[{i}].endpoint_id", f"unknown endpoint {x.endpoint_id!r}")
    if x.node_id and x.node_id not in nodes:
        raise InvalidArgument(f"expositions[{i}].node_id", f"unknown node {x.node_id!r}")
    ts = _checked_stamp(store, now, f"expositions[{i}].scraped_at_unix_ms", x.scraped_at_unix_ms)
    try:
        samples = parse_exposition(x.text)
    except ValueError as exc:
        raise InvalidArgument(f"expositions[{i}].text", str(exc)) from None
    bad = unusable_samples(samples)
    if bad:  # refused, not dropped as a scrape's would be: the pusher is there to be told
        raise InvalidArgument(f"expositions[{i}].text", f"{bad[0].name} {value_rule(bad[0].name)}, "
                                                        f"got {bad[0].value!r}")
    if samples and not any(s.name in KEPT_EXPORTER_METRICS for s in samples):  # acked, yet nothing stored
        raise InvalidArgument(f"expositions[{i}].text", f"none of its {len(samples)} samples is of a series "
                                                        f"InferMesh reads (e.g. {samples[0].name!r}; see "
                                                        "decision.telemetry)")
    if not x.endpoint_id and canonicalize(samples)[1]:
        raise InvalidArgument(f"expositions[{i}].endpoint_id", "the text has endpoint metrics (vLLM, Triton), "
                                                               "which need the endpoint_id they describe")
    return x, samples, ts


def handler_pool(threads: int) -> futures.ThreadPoolExecutor:
    """The pool a threads-kind decision server runs its handlers on."""
    return futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc")


def build_server(servicer: DecisionServicer, *, address: str, threads: int = 32,
                 max_message_bytes: int = 4 * 1024 * 1024, reuse_port: bool = False,
                 extra_services: Sequence[str] = (),
                 credentials: grpc.ServerCredentials | None = None,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 pool: futures.ThreadPoolExecutor | None = None,
                 ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not started) server with DecisionService, health and reflection; returns its port.

    ``pool`` runs the handlers (default: a new :func:`handler_pool` of ``threads``). grpc never
    shuts it down: a caller that stops the server and lives on should pass its own and shut it
    down after the stop.
    """
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 1 if reuse_port else 0)]
    server = grpc.server(pool or handler_pool(threads), options=options, interceptors=list(interceptors))
    pb_grpc.add_DecisionServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME, *extra_services), server)
    port = bind_port(server, address, credentials, "gRPC server")
    return server, port, health_servicer


def wait_for_ready(target: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=max(0.1, deadline - time.monotonic()))
