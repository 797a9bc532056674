"""OpenTelemetry tracing: W3C ``traceparent`` in from gRPC metadata and HTTP headers, spans out.

The exporter is off by default (``INFERMESH_OTEL_EXPORTER=none``): spans are then not recorded,
yet the caller's trace id still reaches the JSON logs, because :func:`trace_id_of` reads it from
the ``traceparent`` header without any SDK. ``console`` prints finished spans; tests install an
in-memory exporter with :func:`use_exporter`.

>>> trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
'4bf92f3577b34da6a3ce929d0e0e4736'
>>> trace_id_of("garbage") is None
True
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter

from decision.logging_json import decision_id_var, trace_id_var

TRACER_NAME = "infermesh.decision"
EXPORTERS = ("none", "console")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_provider: TracerProvider | None = None
_console = False
_recording = False


def trace_id_of(traceparent: str) -> str | None:
    """The trace id of a W3C ``traceparent`` value, or ``None`` when it is malformed or all zero."""
    m = _TRACEPARENT.match(traceparent.strip().lower())
    if m is None or m.group(1) == "0" * 32:
        return None
    return m.group(1)


def configure_tracing(exporter: str = "none") -> None:
    """Install the process's tracer provider; ``none`` leaves tracing off (no spans recorded).

    Parameters
    ----------
    exporter : {"none", "console"}
        Where finished spans go.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"tracing exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    global _console
    if exporter == "console" and not _console:
        use_exporter(ConsoleSpanExporter())
        _console = True


def use_exporter(exporter: SpanExporter) -> TracerProvider:
    """Record spans and send each finished one to ``exporter`` (synchronously; tests and debugging)."""
    global _provider, _recording
    _recording = True
    if _provider is None:
        _provider = TracerProvider()
        trace.set_tracer_provider(_provider)
    _provider.add_span_processor(SimpleSpanProcessor(exporter))
    return _provider


def enabled() -> bool:
    """Whether spans are recorded in this process (an exporter was configured)."""
    return _provider is not None and _recording


def stop_recording() -> None:
    """Stop creating spans (exporters stay installed; :func:`use_exporter` starts again)."""
    global _recording
    _recording = False


@contextlib.contextmanager
def server_span(name: str, carrier: Mapping[str, str], **attributes: Any) -> Iterator[Any]:
    """A SERVER span continuing the caller's trace, with the trace id in the log context.

    Parameters
    ----------
    name : str
        The span name (the RPC's full method or the HTTP route).
    carrier : mapping
        Incoming headers or metadata, lower-case keys (``traceparent``, ``tracestate``).
    """
    tid = trace_id_of(carrier.get("traceparent", ""))
    if not enabled():
        token = trace_id_var.set(tid or "")
        try:
            yield None
        finally:
            trace_id_var.reset(token)
        return
    parent = extract(dict(carrier))
    span_cm = trace.get_tracer(TRACER_NAME).start_as_current_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
    with span_cm as span:
        token = trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
        try:
            yield span
        finally:
            trace_id_var.reset(token)


def note_decision(decision_id: str) -> None:
    """Put a decision id on the current span and in the log context of this request."""
    decision_id_var.set(decision_id)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("infermesh.decision_id", decision_id)


def install_http_tracing(app: Any) -> None:
    """Wrap every HTTP request of a FastAPI/Starlette app in :func:`server_span`."""

    async def _traced(request: Any, call_next: Any) -> Any:
        carrier = {k: v for k, v in request.headers.items() if k in ("traceparent", "tracestate")}
        with server_span(f"HTTP {request.method} {request.url.path}", carrier,
                         **{"http.request.method": request.method, "url.path": request.url.path}) as span:
            d_token = decision_id_var.set("")
            try:
                response = await call_next(request)
            finally:
                decision_id_var.reset(d_token)
            if span is not None:
                span.set_attribute("http.response.status_code", response.status_code)
            return response

    app.middleware("http")(_traced)

