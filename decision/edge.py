"""The gRPC edge: what every DecisionService call passes before the servicer sees it.

One interceptor, so each call pays for one wrapper:

* bytes that do not parse as the method's request message end in ``INVALID_ARGUMENT`` naming
  ``request`` (grpcio's own answer would be ``INTERNAL``);
* a call whose deadline has already passed is not decided (``DEADLINE_EXCEEDED``);
* per-request limits (labels, jurisdictions, telemetry batch size, error text) are checked, each
  rejection naming its field;
* the caller's ``traceparent`` metadata continues its trace (:mod:`decision.tracing`), and the
  trace and decision ids reach the JSON logs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from decision.errors import InvalidArgument
from decision.logging_json import decision_id_var, trace_id_var
from decision.metrics import ServiceMetrics
from decision.tracing import note_decision, server_span
from infermesh.decision.v1 import decision_pb2 as pb

log = logging.getLogger("infermesh.rpc")
SERVICE_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["DecisionService"].full_name + "/"
_TRACE_KEYS = ("traceparent", "tracestate")


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-request limits checked at the edge (the engine's own validation still runs after)."""

    max_labels: int = 64
    max_label_bytes: int = 256
    max_jurisdictions: int = 32
    max_telemetry_items: int = 10_000
    max_exposition_bytes: int = 1 << 20
    max_error_bytes: int = 4096
    max_field_chars: int = 256  # ids and names; an error echoing a megabyte would not fit in a trailer


def metadata_value(text: str) -> str:
    """``text`` as a legal gRPC metadata value (printable ASCII; anything else escaped).

    >>> metadata_value("labels['é']")
    "labels['\\\\xe9']"
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c.isascii() and c.isprintable() else ascii(c)[1:-1] for c in text)


class _Malformed:
    """Stands in for a request message that could not be parsed."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


_Handlers = dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]


def wrap_once(cache: _Handlers, method: str, handler: grpc.RpcMethodHandler | None,
              wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> grpc.RpcMethodHandler | None:
    """``handler`` wrapped by ``wrap`` if it is a DecisionService method, built once per method."""
    if handler is None or not method.startswith(SERVICE_PREFIX):
        return handler
    hit = cache.get(method)
    if hit is not None and hit[0] is handler:
        return hit[1]
    wrapped = wrap(method, handler)
    cache[method] = (handler, wrapped)
    return wrapped


def request_parser(handler: grpc.RpcMethodHandler) -> Callable[[bytes], Any]:
    """The handler's deserializer, answering :class:`_Malformed` instead of raising."""
    deser = handler.request_deserializer
    type_name = getattr(getattr(deser, "__self__", None), "DESCRIPTOR", None)
    return _safe(deser, type_name.full_name if type_name is not None else "the request message")


def _safe(deserialize: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, and anything else a hostile payload provokes
            return _Malformed(f"cannot be parsed as {type_name}: {type(exc).__name__}")
    return parse


_DECIDE_STRINGS = ("request_id", "tenant", "user_tier", "model", "model_family", "modality", "prompt_class",
                   "data_class", "client_region", "session_id")
_SAMPLE_STRINGS = ("endpoint_id", "node_id", "metric")


def _short(msg: Any, fields: tuple[str, ...], limit: int, prefix: str = "") -> None:
    for f in fields:
        if len(getattr(msg, f)) > limit:
            raise InvalidArgument(prefix + f, f"longer than {limit} characters")


def check_limits(request: Any, limits: RequestLimits) -> None:
    """Raise :class:`InvalidArgument` naming the field when ``request`` exceeds a limit."""
    if isinstance(request, pb.DecideRequest):
        _short(request, _DECIDE_STRINGS, limits.max_field_chars)
        if len(request.labels) > limits.max_labels:
            raise InvalidArgument("labels", f"at most {limits.max_labels} labels")
        for k, v in request.labels.items():
            if len(k.encode()) > limits.max_label_bytes or len(v.encode()) > limits.max_label_bytes:
                raise InvalidArgument(f"labels[{k[:32]!a}]",  # ASCII: it travels in a trailer
                                      f"keys and values at most {limits.max_label_bytes} bytes")
        if len(request.allowed_jurisdictions) > limits.max_jurisdictions:
            raise InvalidArgument("allowed_jurisdictions", f"at most {limits.max_jurisdictions} entries")
    elif isinstance(request, pb.TelemetryBatch):
        if len(request.samples) + len(request.expositions) > limits.max_telemetry_items:
            raise InvalidArgument("samples", f"at most {limits.max_telemetry_items} samples and expositions a batch")
        for i, smp in enumerate(request.samples):
            _short(smp, _SAMPLE_STRINGS, limits.max_field_chars, f"samples[{i}].")
        for i, x in enumerate(request.expositions):
            _short(x, ("endpoint_id", "node_id"), limits.max_field_chars, f"expositions[{i}].")
            if len(x.text) > limits.max_exposition_bytes:
                raise InvalidArgument(f"expositions[{i}].text", f"at most {limits.max_exposition_bytes} bytes")
    elif isinstance(request, pb.Outcome):
        _short(request, ("decision_id",), limits.max_field_chars)
        if len(request.error.encode()) > limits.max_error_bytes:
            raise InvalidArgument("error", f"at most {limits.max_error_bytes} bytes")
        for f in ("ttft_ms", "latency_ms"):  # a NaN reward would poison the learner's statistics
            if not math.isfinite(getattr(request, f)):
                raise InvalidArgument(f, "must be a finite number")
    elif isinstance(request, pb.ExplainRequest):
        _short(request, ("decision_id",), limits.max_field_chars)


class EdgeInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpcio ships no stubs
    """Parse safely, refuse expired deadlines, enforce limits and trace every DecisionService call.

    Parameters
    ----------
    limits : RequestLimits
        The per-request limits.
    metrics : ServiceMetrics, optional
        Where refusals are counted (``infermesh_rpc_errors_total``).
    """

    def __init__(self, limits: RequestLimits | None = None, metrics: ServiceMetrics | None = None) -> None:
        self.limits = limits or RequestLimits()
        self.metrics = metrics
        self._cache: _Handlers = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return wrap_once(self._cache, handler_call_details.method, continuation(handler_call_details), self._wrap)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        name = method.rsplit("/", 1)[1]
        parse = request_parser(handler)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                self._admit(name, context, request)
                return self._traced(method, name, context, lambda: inner(request, context))

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=parse,
                                                       response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            inner_s = handler.stream_unary

            def stream(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                self._admit(name, context, None)
                checked = self._checked_stream(request_iterator)
                return self._traced(method, name, context, lambda: inner_s(checked, context))

            return grpc.stream_unary_rpc_method_handler(stream, request_deserializer=parse,
                                                        response_serializer=handler.response_serializer)
        return handler  # no other shapes in this service

    def _refuse(self, name: str, context: grpc.ServicerContext, code: grpc.StatusCode, details: str,
                field: str) -> None:
        if self.metrics is not None:
            self.metrics.rpc_errors.labels(name, code.name).inc()
        context.set_trailing_metadata((("infermesh-field", metadata_value(field)),))
        context.abort(code, details)

    def _admit(self, name: str, context: grpc.ServicerContext, request: Any) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            self._refuse(name, context, grpc.StatusCode.DEADLINE_EXCEEDED,
                         "deadline: expired before the service started on the request", "deadline")
        if isinstance(request, _Malformed):
            self._refuse(name, context, grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.error}", "request")
        if request is not None:
            try:
                check_limits(request, self.limits)
            except InvalidArgument as exc:
                self._refuse(name, context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field)

    def _checked_stream(self, messages: Iterator[Any]) -> Iterator[Any]:
        # Raised inside the servicer's loop, so its error mapping names the field.
        for i, m in enumerate(messages):
            yield self.checked_message(i, m)

    def checked_message(self, i: int, m: Any) -> Any:
        """Message ``i`` of a request stream, if it parsed and is within the limits."""
        if isinstance(m, _Malformed):
            raise InvalidArgument(f"batch[{i}]", m.error)
        check_limits(m, self.limits)
        return m

    def _traced(self, method: str, name: str, context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        with self.call_scope(method, name, context) as note:
            response = call()
            note(response)
            return response

    @contextmanager
    def call_scope(self, method: str, name: str, context: Any) -> Iterator[Callable[[Any], None]]:
        """The trace span and log context of one call; yields ``note(response)`` (shared with asyncio)."""
        carrier = {k: v for k, v in context.invocation_metadata() if k in _TRACE_KEYS}
        started = time.perf_counter()
        with server_span(method, carrier, **{"rpc.system": "grpc", "rpc.method": name}):
            code = "OK"
            d_token = decision_id_var.set("")
            try:
                yield _note_response
            except Exception:
                code = "ERROR"
                raise
            finally:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("rpc %s %s in %.2f ms", name, code, (time.perf_counter() - started) * 1e3,
                              extra={"decision_id": decision_id_var.get(), "trace_id": trace_id_var.get()})
                decision_id_var.reset(d_token)


def _note_response(response: Any) -> None:
    did = getattr(response, "decision_id", "")
    if did:
        note_decision(did)
