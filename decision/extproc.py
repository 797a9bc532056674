"""InferMesh as an Envoy ext_proc endpoint picker (Gateway API Inference Extension protocol).

Envoy (alone, or under Envoy Gateway, Istio, kgateway, GKE Gateway) opens one
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` stream per HTTP request. On it:

Request phase
    Headers arrive first; the body follows (``request_body_mode: BUFFERED``). From the headers
    (tenant, tier, region, session, compliance; names in :class:`ExtProcConfig`) and the
    OpenAI-compatible body (``model``, prompt size, ``max_tokens``) we build a
    :class:`~decision.domain.RequestContext` and run :meth:`DecisionEngine.decide`. The answer
    sets ``x-gateway-destination-endpoint: ip:port`` (overwriting whatever the client sent; an
    ``ORIGINAL_DST`` cluster routes on it), puts ``primary,fallback1,...`` under
    ``envoy.lb`` / ``x-gateway-destination-endpoint`` in dynamic metadata, and adds
    ``x-infermesh-decision-id``. The header carries the primary only because an ``ORIGINAL_DST``
    cluster reads a single ``ip:port``; the metadata carries the ordered list for proxies whose
    load balancer walks it (``envoy.load_balancing_policies.override_host``). No allowed
    endpoint: an immediate 503 whose JSON body names the rules; a quota: 429; a bad header or
    body: 400; an unknown model: 404. In ``BUFFERED_PARTIAL`` mode a body over Envoy's buffer
    comes cut short: we decide on what it shows, charging its full size (:meth:`_cut_request`).
    In ``STREAMED`` mode (unless ``send_body_without_waiting_for_header_response`` lets us hold
    the header answer for the body) the headers go upstream on our answer to them, before any of
    the body: we decide on the headers, charging the body's ``content-length``, or, when it sent
    none, the largest body we let stream past (:meth:`_unseen_request`).
Response phase
    A second ext_proc filter in ``observability_mode`` streams the response headers and body
    (``response_body_mode: STREAMED``) to us without Envoy ever waiting; we time the first body
    byte and read ``usage`` from the JSON body or the SSE stream. At the end of the stream the
    outcome goes to :meth:`DecisionEngine.report_outcome`, exactly as the ``ReportOutcome`` RPC
    would record it (an HTTP 200 stream with an error event, or that ends without its terminal
    event, ``data: [DONE]`` or ``response.completed``, is an error), so the learning loop closes
    without the proxy reporting anything. (One filter doing both phases inline also works:
    ``ExtProcConfig.response_phase = "inline"``.)

Where it is served: on its own port (default 9002, the inference extension's ext_proc port), in
the same process as the decision API. An ext_proc stream stays open for the whole upstream
response (seconds to minutes for a token stream). By default it is grpclib on an event loop of its
own (:mod:`decision.extproc_grpclib`): open streams cost no threads, and a message never leaves
that thread, which makes it the cheapest per request. ``extproc.server: asyncio`` selects grpcio's
asyncio server (:mod:`decision.extproc_aio`), ``threads`` grpcio's threaded server, which holds one
worker thread per open stream (sharing the decision API's small, CPU-sized pool would let a few
long generations starve ``Decide``). Either way it has its own health service (Envoy
health-checks the processor cluster there) and can be firewalled so only the proxies reach it.
:func:`add_extproc_to_server` still registers the servicer on any threaded server, for
single-port deployments.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from decision.domain import Decision, Outcome, OutcomeStatus, RequestContext
from decision.engine import DecisionEngine
from decision.errors import DecisionError, InvalidArgument, NoCandidate, NotFound, QuotaExceeded
from decision.extproc_config import DESTINATION_SERVED_KEY, EXTPROC_SERVICE, PROBED_NAMES, ExtProcConfig
from decision.extproc_openai import (
    OpenAIRequest,
    Usage,
    UsageReader,
    parse_cut_request,
    parse_request,
    terminal_event,
    unseen_request,
)
from decision.grpc_serving import bind_port
from decision.metrics import ServiceMetrics
from decision.reflection import enable_reflection
from decision.validation import MAX_TOKENS

__all__ = ["EXTPROC_SERVICE", "ExtProcConfig", "ExtProcServer", "ExtProcServicer", "RunningExtProc",
           "add_extproc_to_server",
           "outcome_status", "serve_extproc"]

log = logging.getLogger(__name__)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_CONTINUE_RESP_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
_CONTINUE_REQ_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
_BUFFERED_PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL


def outcome_status(http_status: int) -> OutcomeStatus:
    """Map an upstream HTTP status to an outcome status (what ``ReportOutcome`` callers send).

    Examples
    --------
    >>> [str(outcome_status(s)) for s in (200, 408, 499, 500, 504)]
    ['ok', 'timeout', 'cancelled', 'error', 'timeout']
    """
    if 200 <= http_status < 400:
        return OutcomeStatus.OK
    if http_status in (408, 504):
        return OutcomeStatus.TIMEOUT
    if http_status == 499:  # client closed the request (nginx/Envoy convention)
        return OutcomeStatus.CANCELLED
    return OutcomeStatus.ERROR


def _headers(hm: base_pb2.HeaderMap, repeated: set[str] | None = None) -> dict[str, str]:
    """Headers by lower-case name (the first copy of each); the names sent more than once go to ``repeated``."""
    # Envoy sends raw_value (bytes); older versions and test clients use value.
    out: dict[str, str] = {}
    for h in hm.headers:
        key = h.key.lower()
        if key in out:
            if repeated is not None:
                repeated.add(key)
            continue
        out[key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                                      append_action=_OVERWRITE)


def _immediate(code: int, error_type: str, message: str, decision_id: str, config: ExtProcConfig,
               rules: tuple[str, ...] = ()) -> pb.ProcessingResponse:
    body: dict[str, object] = {"error": {"type": error_type, "message": message, "code": code}}
    if rules:
        body["error"] = {**body["error"], "rules": list(rules)}  # type: ignore[dict-item]
    if decision_id:
        body["error"] = {**body["error"], "decision_id": decision_id}  # type: ignore[dict-item]
    headers = [_set("content-type", "application/json")]
    if decision_id:
        headers.append(_set(config.decision_id_header, decision_id))
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=code),
        headers=pb.HeaderMutation(set_headers=headers),
        body=json.dumps(body, separators=(",", ":")).encode(),
        details=f"infermesh_{error_type}"))


class _Refused(Exception):
    """A request refused before the engine is asked: its HTTP status and error type."""

    def __init__(self, code: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.error_type = error_type


def _content_length(headers: Mapping[str, str]) -> int | None:
    """The request's ``content-length``; ``None`` when it sent none (chunked) or one that is not a size."""
    raw = headers.get("content-length", "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else None  # no sign, no "1_000"


def _client_names(c: ExtProcConfig) -> dict[str, str]:
    """What the HTTP client sent for each :class:`RequestContext` field the engine may reject.

    Validation names the context field (``ttft_target_ms``); the client only knows its header or
    body field, so a 400 names that instead.
    """
    return {
        "request_id": c.request_id_header, "tenant": c.tenant_header, "user_tier": c.tier_header,
        "modality": c.modality_header, "prompt_class": c.prompt_class_header,
        "allowed_jurisdictions": c.jurisdictions_header, "data_class": c.data_class_header,
        "client_region": c.region_header, "session_id": c.session_header,
        "ttft_target_ms": c.ttft_target_header, "max_cost_per_1k_tokens": c.max_cost_header,
        "model_family": "model", "expected_output_tokens": "max_tokens", "estimated_input_tokens": "messages",
    }


def _client_message(exc: InvalidArgument, c: ExtProcConfig) -> str:
    return f"{_client_names(c).get(exc.field, exc.field)}: {exc.message}"


@dataclass(slots=True)
class _Exchange:
    """One HTTP exchange: its decision and what the response phase has seen so far."""

    t0: float = 0.0  # when the decision was made: the request can go upstream from then on
    headers: dict[str, str] | None = None
    repeated: set[str] = field(default_factory=set)  # request header names sent more than once
    served_by: str = ""  # the fallback endpoint that served instead of the route, if Envoy said so
    decision: Decision | None = None
    request: OpenAIRequest | None = None
    http_status: int = 0
    t_headers: float = 0.0
    t_first_byte: float = 0.0
    usage: UsageReader | None = None
    ended: bool = False
    reported: bool = False


@dataclass(slots=True)
class _Stream:
    """One ext_proc stream. ``owner``: this stream reports the outcome of ``ex``."""

    ex: _Exchange
    owner: bool = False
    hold_headers: bool = False  # the header reply waits for the body (send_body_without_waiting...)
    held_chunks: int = 0
    body: bytearray | None = None
    cut: bool = False  # decided on the first part of a body (BUFFERED_PARTIAL): no more of it comes
    # Decided at the headers on a body of unknown size (STREAMED, no content-length), charged as
    # max_request_body_bytes: the bytes it may still bring as it streams past (None: not counted).
    body_left: int | None = None


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The ext_proc servicer: decides in the request phase, records outcomes in the response phase.

    Two deployments of the filter are understood (``deploy/envoy/README.md``):

    * split (the shipped config): a *pick* filter handles the request phase only, and a second
      filter in ``observability_mode`` streams the response to us without Envoy ever waiting for
      an answer. The observer stream finds its exchange by the ``x-infermesh-decision-id`` request
      header the pick filter set. The response path then costs the client nothing.
    * inline: one filter sees both phases on one stream (Envoy waits for each answer).

    Parameters
    ----------
    engine
        The shared in-process :class:`DecisionEngine`.
    config
        Header names and defaults.
    clock
        Monotonic clock for TTFT and latency (seconds).
    max_unobserved
        Routed exchanges kept for an observer stream to claim; the oldest are dropped beyond it
        (the engine still times their outcome out).
    """

    def __init__(self, engine: DecisionEngine, config: ExtProcConfig | None = None,
                 clock: Callable[[], float] | None = None, max_unobserved: int = 65536,
                 metrics: ServiceMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics  # the service's Prometheus metrics, as the gRPC front end records them
        self.config = config or ExtProcConfig()
        self._now = clock or time.perf_counter
        self.max_unobserved = max_unobserved
        self._unobserved: OrderedDict[str, _Exchange] = OrderedDict()
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {"streams": 0, "routed": 0, "immediate": 0, "observed": 0,
                                      "outcomes": 0, "outcomes_failed": 0}

    # -- the RPC --
    def Process(self, request_iterator: Iterator[pb.ProcessingRequest],
                context: grpc.ServicerContext) -> Iterator[pb.ProcessingResponse]:
        st = self.open_stream()
        try:
            for req in request_iterator:
                replies = self.handle(st, req)
                yield from replies
                self.after_replies(st)
                if self.finished(st, req, replies):
                    return
        finally:
            self.close_stream(st)

    # -- one stream, sans I/O: the threaded servicer above and the asyncio one
    # (decision.extproc_aio) drive the same steps: handle, send, after_replies, finished --
    def open_stream(self) -> _Stream:
        self.stats["streams"] += 1
        return _Stream(_Exchange())

    def after_replies(self, st: _Stream) -> None:
        """Once the replies are sent: reporting after them keeps it off the client's last byte."""
        if st.owner and st.ex.ended and not st.ex.reported:
            self._report(st.ex, self._now())

    def close_stream(self, st: _Stream) -> None:
        if st.owner and st.ex.decision is not None and not st.ex.reported:
            # The stream closed before the response ended: client gone or upstream reset.
            self._report(st.ex, self._now(), cancelled=True)

    def finished(self, st: _Stream, req: pb.ProcessingRequest, replies: list[pb.ProcessingResponse]) -> bool:
        """Whether this stream has nothing left to do, once ``replies`` are sent and reported.

        The server then closes it, which frees a threaded server's worker now instead of when
        Envoy tears the stream down (observer streams linger for ``deferred_close_timeout``);
        Envoy carries on with the request unprocessed.
        """
        if any(r.WhichOneof("response") == "immediate_response" for r in replies):
            return True  # Envoy sends nothing more after an immediate response
        if req.observability_mode:
            return not st.owner or st.ex.reported  # unknown decision, or outcome recorded
        if self.config.response_phase != "observer" or st.hold_headers or not replies:
            return False
        which = req.WhichOneof("request")
        # The pick stream is done once the last request-phase message is answered.
        return bool((which == "request_headers" and req.request_headers.end_of_stream) or
                    (which == "request_body" and (req.request_body.end_of_stream or st.cut)))

    def handle(self, st: _Stream, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """Answer one message of the stream (sans I/O, so it is testable without gRPC)."""
        which = req.WhichOneof("request")
        if req.observability_mode:
            self._observe(st, req, which)
            return []  # Envoy does not wait for, nor read, answers in observability mode
        if which == "request_headers":
            st.ex.headers = _headers(req.request_headers.headers, st.ex.repeated)
            if req.request_headers.end_of_stream:
                return [self._decide(st, b"")]
            pc = req.protocol_config
            if pc.send_body_without_waiting_for_header_response and pc.request_body_mode == _STREAMED:
                st.hold_headers, st.body = True, bytearray()  # decide once the body is in: one round trip
                return []
            if pc.request_body_mode == _BUFFERED:
                return [_CONTINUE_HEADERS]  # the whole body comes next, in one message
            if pc.request_body_mode == _BUFFERED_PARTIAL:
                return [self._partial_headers_reply()]  # the body, or as much as fits Envoy's buffer
            # STREAMED (or NONE): the body goes upstream after the headers, which wait for this answer,
            # so the route is chosen now, before any of the body is seen (_unseen_request).
            return [self._decide(st, b"", unseen=True)]
        if which == "request_body":
            return self._request_body(st, req.request_body)
        if which == "request_trailers":
            if st.hold_headers:  # a body that ends in trailers has no end_of_stream chunk: decide now
                replies = self._decide_held(st)
                if replies[0].WhichOneof("response") == "immediate_response":
                    return replies
                return [*replies, pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
            return [pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
        self._response_message(st, req, which)
        if which == "response_headers":
            return [self._response_headers_reply(st)]
        if which == "response_body":
            return [_CONTINUE_RESP_BODY]
        if which == "response_trailers":
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        return []

    # -- request phase --
    def _request_body(self, st: _Stream, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if st.hold_headers:
            assert st.body is not None
            st.body += body.body
            st.held_chunks += 1
            if len(st.body) > self.config.max_request_body_bytes:  # held in memory: bounded
                st.hold_headers, st.body = False, None
                return [self._deny(_immediate(
                    413, "request_too_large", f"request body over {self.config.max_request_body_bytes} bytes "
                                              "(extproc.settings.max_request_body_bytes)", "", self.config))]
            if not body.end_of_stream:
                return []
            return self._decide_held(st)
        if st.ex.decision is not None:  # chunks after the decision (streamed mode): pass them on
            if st.body_left is not None:
                st.body_left -= len(body.body)
                if st.body_left < 0:
                    return [self._unsized_body_over(st)]
            return [_CONTINUE_REQ_BODY]
        # Not the end of the body, yet no decision: BUFFERED_PARTIAL sends only what fits in Envoy's
        # buffer when the body is bigger, and the rest goes upstream without passing here.
        st.cut = not body.end_of_stream
        return [self._decide(st, body.body, in_body=True, cut=st.cut)]

    def _partial_headers_reply(self) -> pb.ProcessingResponse:
        """The answer to the headers in ``BUFFERED_PARTIAL`` mode: clear the route cache now.

        A body over Envoy's buffer comes in part, and Envoy (1.40) passes that part on down the
        chain, where the router takes the cached route, before it clears the route cache as the
        answer to it asks (too late, and an ENVOY_BUG besides): the route the filters before us
        cached on the bare headers, not one matched on the pick's metadata. Cleared here, it is
        matched when the body goes on, with the pick's metadata in place. Envoy clears it only with
        a header mutation: the client's destination header goes (it is overwritten later anyway).
        """
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(remove_headers=[self.config.destination_header]),
            clear_route_cache=True)))

    def _unsized_body_over(self, st: _Stream) -> pb.ProcessingResponse:
        """A body of unknown size, decided on at the headers, has streamed past ``max_request_body_bytes``.

        It was charged as that many bytes of prompt (:meth:`_unseen_request`): beyond them the charge
        would no longer cover it, so the request ends here with 413, before the chunk goes upstream
        (the model server has not had the whole body, so it has generated nothing). The decision's
        outcome is recorded now, as cancelled: no response phase will come for it.
        """
        ex, c = st.ex, self.config
        assert ex.decision is not None
        st.body_left = None
        why = (f"request body over {c.max_request_body_bytes} bytes without content-length "
               "(extproc.settings.max_request_body_bytes)")
        with self._lock:  # not claimed by an observer stream yet: ours to report
            mine = st.owner or self._unobserved.pop(ex.decision.decision_id, None) is not None
        if mine and not ex.reported:
            self._report(ex, self._now(), cancelled=True, error=why)
        return self._deny(_immediate(413, "request_too_large", f"{why}: send content-length",
                                     ex.decision.decision_id, c))

    def _decide_held(self, st: _Stream) -> list[pb.ProcessingResponse]:
        """Decide on the held headers and body chunks: the decision, then a continue for each chunk."""
        assert st.body is not None
        first = self._decide(st, bytes(st.body))
        if first.WhichOneof("response") == "immediate_response":
            return [first]
        st.hold_headers, st.body = False, None
        return [first] + [_CONTINUE_REQ_BODY] * st.held_chunks

    def context_of(self, headers: Mapping[str, str], body: OpenAIRequest | None) -> RequestContext:
        """Build the decision context from request headers and the parsed body."""
        c = self.config
        fleet = self.engine.fleet
        name = (body.model if body is not None else "") or headers.get(c.model_header, "")
        name = c.model_aliases.get(name, name)
        model, family = (name, "") if name in fleet.models or name not in fleet.by_family else ("", name)

        def number(header: str) -> float:
            raw = headers.get(header, "")
            try:
                value = float(raw) if raw else 0.0
            except ValueError:
                raise InvalidArgument(header, f"not a number: {raw[:40]!r}") from None
            if not math.isfinite(value) or value < 0:  # float() takes "nan", "inf", "-5"
                raise InvalidArgument(header, f"must be a finite number >= 0, not {raw[:40]!r}")
            return value

        tenant = headers.get(c.tenant_header, "") or c.default_tenant
        if not tenant:
            raise InvalidArgument(c.tenant_header, "required header missing")
        if not name:
            if body is not None and body.body_read == "unseen":
                raise InvalidArgument("model", f"no {c.model_header} header, and the body streams past unseen "
                                               "(request_body_mode: STREAMED): send the header")
            raise InvalidArgument("model", f"no model in the body and no {c.model_header} header")
        juris = tuple(j.strip() for j in headers.get(c.jurisdictions_header, "").split(",") if j.strip())
        labels = {"via": "envoy-ext-proc", "path": headers.get(":path", "")[:256]}
        if body is not None and body.body_read != "whole":  # the trace says the decision saw part of the body, or none
            labels.update({"request_body": body.body_read, "request_body_bytes_seen": str(body.seen_bytes),
                           "request_body_bytes": str(body.body_bytes or "unknown")})
            if body.image_bytes:
                labels["request_body_image_bytes"] = str(body.image_bytes)  # charged as images, not as prompt
        if body is not None and body.images:  # each charged TOKENS_PER_IMAGE in the input estimate
            labels["request_images"] = str(body.images)
        return RequestContext(
            request_id=headers.get(c.request_id_header, "")[:256] or "envoy",
            tenant=tenant,
            user_tier=headers.get(c.tier_header, "") or "standard",
            model=model,
            model_family=family,
            modality=headers.get(c.modality_header, ""),
            prompt_class=headers.get(c.prompt_class_header, "") or "general",
            estimated_input_tokens=body.estimated_input_tokens if body is not None else 0,
            expected_output_tokens=body.max_tokens if body is not None else 0,
            allowed_jurisdictions=juris,
            data_class=headers.get(c.data_class_header, "") or "public",
            client_region=headers.get(c.region_header, ""),
            session_id=headers.get(c.session_header, "")[:256],
            ttft_target_ms=number(c.ttft_target_header),
            max_cost_per_1k_tokens=number(c.max_cost_header),
            labels=labels,
        )

    def _cut_request(self, headers: Mapping[str, str], prefix: bytes) -> OpenAIRequest:
        """The request of a body Envoy passed only the first ``prefix`` bytes of (``BUFFERED_PARTIAL``).

        Never refused merely for being cut: what is whole before the cut is read, and the prompt
        estimate comes from the body's full size (:func:`parse_cut_request`), so a bigger body
        cannot buy a smaller token charge. Refused, naming the fix, when the model is nowhere to be
        read (413), or when a JSON body's full size is unknown (411: no ``content-length``).
        """
        c = self.config
        size = _content_length(headers)
        whole = parse_request(prefix)  # the object closed before the cut (only whitespace was left)
        if whole is not None:
            return replace(whole, seen_bytes=len(prefix), body_bytes=size or 0, body_read="partial")
        req = parse_cut_request(prefix, max(size or 0, len(prefix)))
        if req is None:  # not JSON (multipart audio, say): as a whole such body, model from the header
            return OpenAIRequest("", 0, 0, False, seen_bytes=len(prefix), body_bytes=size or 0, body_read="partial")
        over = f"request body over the proxy's buffer (its first {len(prefix)} bytes seen)"
        if not req.model and not headers.get(c.model_header):
            raise _Refused(413, "request_too_large", f"{over} and no model in them nor a {c.model_header} "
                                                     f"header: send the header, or put model first in the body")
        if size is None:
            raise _Refused(411, "length_required", f"{over} without content-length: the prompt's size, which "
                                                   "token quotas charge, cannot be estimated; send content-length")
        # Over 40 MB of body is more than any context, but a 400 for the estimate would be a refusal
        # for being big: the most a request may claim stands in (any token quota still denies it).
        return replace(req, estimated_input_tokens=min(req.estimated_input_tokens, MAX_TOKENS))

    def _unseen_request(self, st: _Stream, headers: Mapping[str, str]) -> OpenAIRequest:
        """The request whose body will stream past after the decision (``STREAMED``): none of it is seen.

        The token quotas still charge its prompt, as for a cut body: every byte of the body, from
        its ``content-length``, a character of prompt (:func:`unseen_request`). A body of unknown
        size (chunked, or HTTP/2 without ``content-length``) is charged as the largest a streamed
        body may be, ``max_request_body_bytes``, and held to it as it streams past
        (:meth:`_unsized_body_over`): never charged 0, nor less than it brings. The output budget
        (``max_tokens``, in the body) is unknown, as for a request that sends none: the outcome
        charges what was generated. Nothing is known of the model but the model header.
        """
        size = _content_length(headers)
        if size is None:
            st.body_left = self.config.max_request_body_bytes
            charged = replace(unseen_request(self.config.max_request_body_bytes), body_bytes=0)
        else:
            charged = unseen_request(size)
        # More than any context, but a 400 for the estimate would be a refusal for being big (as _cut_request).
        return replace(charged, estimated_input_tokens=min(charged.estimated_input_tokens, MAX_TOKENS))

    def _decide(self, st: _Stream, body: bytes, *, in_body: bool = False, cut: bool = False,
                unseen: bool = False) -> pb.ProcessingResponse:
        c = self.config
        ex = st.ex
        try:
            twice = [h for h in c.context_headers if h in ex.repeated] if ex.repeated else []
            if twice:
                # Which copy is the gateway's? A gateway that appends its authenticated tenant to the
                # client's would otherwise let the client's copy decide.
                raise InvalidArgument(twice[0], "sent more than once; a gateway must replace a client's copy "
                                                "of a context header, not add to it")
            if unseen:
                ex.request = self._unseen_request(st, ex.headers or {})
            else:
                ex.request = self._cut_request(ex.headers or {}, body) if cut else parse_request(body)
            decision = self.engine.decide(self.context_of(ex.headers or {}, ex.request))
        except _Refused as exc:
            return self._deny(_immediate(exc.code, exc.error_type, str(exc), "", c))
        except NoCandidate as exc:
            if self.metrics is not None:
                self.metrics.record_denial(exc)
            if isinstance(exc, QuotaExceeded):
                message = str(exc)
                if st.body_left is not None:  # charged as the largest body: say so, and how to be charged less
                    message += (f" (the request body streams past unseen without content-length, so it is charged "
                                f"as {c.max_request_body_bytes} bytes of prompt: send content-length)")
                return self._deny(_immediate(429, "quota_exceeded", message, exc.decision_id, c, exc.rules))
            return self._deny(_immediate(503, "no_candidate", str(exc), exc.decision_id, c, exc.rules))
        except InvalidArgument as exc:
            return self._deny(_immediate(400, "invalid_argument", _client_message(exc, c), "", c))
        except NotFound as exc:
            return self._deny(_immediate(404, "not_found", str(exc), "", c))
        except DecisionError as exc:  # Unavailable: the service itself cannot decide
            return self._deny(_immediate(503, "unavailable", str(exc), "", c))
        except Exception:  # a bug: answer this request; an escaped exception kills the stream (Envoy 5xx's)
            log.exception("ext_proc: no decision for %s", (ex.headers or {}).get(c.request_id_header, "a request"))
            return self._deny(_immediate(503, "unavailable", "internal error; the decision could not be made", "", c))
        # An exchange waiting for its response (up to max_unobserved of them) keeps what the outcome
        # needs (id, route, fallbacks), not the trace (the audit log took it) nor up to Envoy's 60 KiB
        # of request headers.
        ex.decision = replace(decision, trace={}, stored_trace={})
        ex.headers = None
        ex.repeated.clear()
        # The endpoint's TTFT and latency count from here, not from the request headers: a client
        # uploading its body slowly (buffered mode waits for all of it) must not be charged to the
        # endpoint, whose slowness the learner and the ledger learn from these outcomes.
        ex.t0 = self._now()
        self.stats["routed"] += 1
        if self.metrics is not None:
            self.metrics.record_decision(decision)
        if c.response_phase == "observer":
            with self._lock:
                self._unobserved[decision.decision_id] = ex
                while len(self._unobserved) > self.max_unobserved:
                    self._unobserved.popitem(last=False)
        else:
            st.owner = True
        primary = decision.route.address
        chain = ",".join([primary, *(r.address for r in decision.fallbacks)])
        common = pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[
                _set(c.destination_header, primary), _set(c.decision_id_header, decision.decision_id)]),
            # The route is chosen on the header we just set, and the metadata. Not for a cut body:
            # its part is already on its way to the router (see _partial_headers_reply).
            clear_route_cache=not cut)
        meta = struct_pb2.Struct()
        meta.update({c.metadata_namespace: {c.destination_header: chain}})
        if in_body:
            return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=meta)
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=meta)

    def _deny(self, resp: pb.ProcessingResponse) -> pb.ProcessingResponse:
        self.stats["immediate"] += 1
        return resp

    # -- response phase --
    def _observe(self, st: _Stream, req: pb.ProcessingRequest, which: str | None) -> None:
        """A message from the observer filter: claim the exchange, then watch the response.

        The decision id comes in the request headers, or, when the observer skips them (the
        shipped config), in the response headers, where the route copies it from the request.
        """
        if not st.owner and which in ("request_headers", "response_headers"):
            hm = req.request_headers.headers if which == "request_headers" else req.response_headers.headers
            did = _headers(hm).get(self.config.decision_id_header, "")
            with self._lock:
                ex = self._unobserved.pop(did, None)
            if ex is None:
                return
            st.ex, st.owner = ex, True
            self.stats["observed"] += 1
        if st.owner and which != "request_headers":
            self._response_message(st, req, which)

    def _response_message(self, st: _Stream, req: pb.ProcessingRequest, which: str | None) -> None:
        ex = st.ex
        now = self._now()
        if which == "response_headers":
            ex.t_headers = now
            h = _headers(req.response_headers.headers)
            try:
                ex.http_status = int(h.get(":status", "0"))
            except ValueError:
                ex.http_status = 0
            if req.response_headers.end_of_stream:
                ex.ended = True
            else:
                path = ex.decision.request.labels.get("path", "") if ex.decision is not None else ""
                ex.usage = UsageReader(sse=h.get("content-type", "").startswith("text/event-stream"),
                                       max_json_bytes=self.config.max_response_json_bytes,
                                       terminal=terminal_event(path))
            served = self._served(req)
            if served and ex.decision is not None and served != ex.decision.route.address:
                ex.served_by = next((r.endpoint_id for r in ex.decision.fallbacks if r.address == served), "")
                log.info("decision %s served by fallback %s (%s)", ex.decision.decision_id, served,
                         ex.served_by or "not one of its fallbacks")
        elif which == "response_body":
            body = req.response_body.body
            if body and not ex.t_first_byte:
                ex.t_first_byte = now
            if ex.usage is not None:
                ex.usage.feed(body)
            if req.response_body.end_of_stream or req.response_body.end_of_stream_without_message:
                ex.ended = True
        elif which == "response_trailers":
            ex.ended = True

    def _response_headers_reply(self, st: _Stream) -> pb.ProcessingResponse:
        if st.ex.decision is None:
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[
                _set(self.config.decision_id_header, st.ex.decision.decision_id)]))))

    def _served(self, req: pb.ProcessingRequest) -> str:
        """``envoy.lb/x-gateway-destination-endpoint-served``, when the proxy forwards it."""
        ns = req.metadata_context.filter_metadata.get(self.config.metadata_namespace)
        if ns is None or DESTINATION_SERVED_KEY not in ns.fields:
            return ""
        return str(ns.fields[DESTINATION_SERVED_KEY].string_value)

    @staticmethod
    def _usage(ex: _Exchange) -> Usage | None:
        """The response's ``usage``; ``None`` (unknown) when it cannot be read.

        Nothing in a backend's body may keep the outcome from being recorded: ``reported`` is
        already set, so an exception here would lose the outcome for good.
        """
        if ex.usage is None:
            return None
        try:
            return ex.usage.result()
        except Exception:
            log.exception("usage of %s unreadable; reporting it as unknown",
                          ex.decision.decision_id if ex.decision else "?")
            return None

    def _report(self, ex: _Exchange, now: float, *, cancelled: bool = False, error: str = "") -> None:
        decision = ex.decision
        assert decision is not None
        ex.reported = True
        if cancelled and not ex.http_status:
            status, error = OutcomeStatus.CANCELLED, error or "stream closed before the upstream responded"
        elif cancelled:
            status, error = OutcomeStatus.CANCELLED, f"stream closed mid-response (HTTP {ex.http_status})"
        else:
            status = outcome_status(ex.http_status)
            error = "" if status is OutcomeStatus.OK else f"HTTP {ex.http_status}"
        first = ex.t_first_byte or ex.t_headers or now
        usage = self._usage(ex)
        if status is OutcomeStatus.OK and ex.usage is not None and ex.usage.error:
            status, error = OutcomeStatus.ERROR, ex.usage.error  # HTTP 200, then the generation failed
        elif status is OutcomeStatus.OK and ex.usage is not None and ex.usage.unfinished():
            # HTTP 200 and a clean end without [DONE] (or response.completed): stopped mid-generation.
            status, error = OutcomeStatus.ERROR, ex.usage.unfinished()
        if usage:
            tokens_in, tokens_out = usage.prompt_tokens, usage.completion_tokens
        elif ex.usage is not None and ex.usage.content_chunks:  # a stream without usage: a chunk a token
            tokens_in = ex.request.estimated_input_tokens if ex.request is not None else 0
            tokens_out = ex.usage.content_chunks
        else:  # unknown (no usage object, a body too big to read): 0 says so, and the quota keeps the estimate
            tokens_in = tokens_out = 0
        outcome = Outcome(
            decision_id=decision.decision_id, status=status,
            ttft_ms=max(0.0, (first - ex.t0) * 1000.0), latency_ms=max(0.0, (now - ex.t0) * 1000.0),
            input_tokens=tokens_in, output_tokens=tokens_out, error=error, served_endpoint_id=ex.served_by)
        try:
            result = self.engine.report_outcome(outcome)
            self.stats["outcomes"] += 1
            if self.metrics is not None:
                self.metrics.record_outcome(status, result)
        except DecisionError as exc:  # e.g. the decision expired from the pending table
            self.stats["outcomes_failed"] += 1
            log.warning("outcome for %s not recorded: %s", decision.decision_id, exc)


def add_extproc_to_server(server: grpc.Server, engine: DecisionEngine, config: ExtProcConfig | None,
                          health_servicer: health.HealthServicer | None,
                          metrics: ServiceMetrics | None = None) -> ExtProcServicer:
    """Register the ext_proc servicer on ``server`` and mark it SERVING in ``health_servicer``.

    Returns
    -------
    ExtProcServicer
        The registered servicer (its ``stats`` count streams, routes and outcomes).
    """
    servicer = ExtProcServicer(engine, config, metrics=metrics)
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    if health_servicer is not None:
        health_servicer.set(EXTPROC_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return servicer


class RunningExtProc(Protocol):
    """A started ext_proc server, of either kind (see :func:`serve_extproc`)."""

    port: int
    servicer: ExtProcServicer

    def stop(self, grace_s: float = 1.0) -> None: ...


@dataclass
class ExtProcServer:
    """A running ext_proc server on its own port (see the module docstring for why)."""

    server: grpc.Server
    port: int
    servicer: ExtProcServicer
    health: health.HealthServicer
    pool: futures.ThreadPoolExecutor | None = None  # the handlers' threads (grpc never shuts them down)

    def stop(self, grace_s: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while streams drain
        self.server.stop(grace_s).wait()
        if self.pool is not None:  # every handler has returned: its idle threads end
            self.pool.shutdown(wait=True)


def serve_extproc(engine: DecisionEngine, config: ExtProcConfig | None = None, *,
                  address: str = "0.0.0.0:9002", max_streams: int = 512,
                  credentials: grpc.ServerCredentials | None = None,
                  server_kind: str = "grpclib", metrics: ServiceMetrics | None = None,
                  reuse_port: bool = False, ssl_context: ssl.SSLContext | None = None) -> RunningExtProc:
    """Start an ext_proc server with gRPC health and reflection on ``address``.

    Parameters
    ----------
    engine, config
        As for :class:`ExtProcServicer`.
    address
        ``host:port`` to bind; port 0 picks a free one (see ``ExtProcServer.port``).
    max_streams
        Streams served at once, i.e. HTTP requests in flight through the proxy; more wait.
    credentials, ssl_context
        TLS or mutual TLS for the grpcio kinds (``decision.tls.server_credentials``) and for
        grpclib (``decision.tls.server_ssl_context``); plaintext when None.
    metrics
        The service's Prometheus metrics: decisions, denials and outcomes are counted as on gRPC.
    server_kind
        ``"grpclib"`` (default: gRPC over h2 on one event loop thread, see
        :mod:`decision.extproc_grpclib`), ``"asyncio"`` (grpcio's asyncio server, see
        :mod:`decision.extproc_aio`) or ``"threads"`` (grpcio's threaded server, one worker thread
        per open stream).
    reuse_port
        Bind with SO_REUSEPORT, as ``infermesh serve --workers`` does: every worker on one port.
    """
    if server_kind == "grpclib":
        from decision.extproc_grpclib import GrpclibExtProcServer

        return GrpclibExtProcServer(ExtProcServicer(engine, config, metrics=metrics), address,
                                    max_streams=max_streams, ssl_context=ssl_context, reuse_port=reuse_port)
    if server_kind == "asyncio":
        from decision.extproc_aio import AioExtProcServer

        return AioExtProcServer(ExtProcServicer(engine, config, metrics=metrics), address, max_streams=max_streams,
                                credentials=credentials, reuse_port=reuse_port)
    if server_kind != "threads":
        raise ValueError(f"server_kind must be 'grpclib', 'asyncio' or 'threads', not {server_kind!r}")
    pool = futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="extproc")
    server = grpc.server(pool,
                         options=[("grpc.so_reuseport", 1 if reuse_port else 0),
                                  ("grpc.max_concurrent_streams", max_streams)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    servicer = add_extproc_to_server(server, engine, config, health_servicer, metrics)
    for name in PROBED_NAMES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    enable_reflection((EXTPROC_SERVICE, health.SERVICE_NAME), server)
    port = bind_port(server, address, credentials, "the ext_proc server", RuntimeError)
    server.start()
    return ExtProcServer(server, port, servicer, health_servicer, pool)
