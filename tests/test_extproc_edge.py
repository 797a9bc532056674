"""Hostile and malformed input on the ext_proc path: no exception may kill a stream or lose an outcome,
and a 400 names what the HTTP client sent, not the decision context's internal fields."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from decision.domain import OutcomeStatus, RequestContext
from decision.errors import InvalidArgument
from decision.extproc import ExtProcServicer
from decision.extproc_config import ExtProcConfig
from decision.extproc_openai import UsageReader, parse_request
from tests.envoy_support import MODEL, ResidencyGuard, build_fleet, make_engine

ADDR = {"eu-fast": "127.0.0.1:7001", "eu-stream": "127.0.0.1:7002", "us-stream": "127.0.0.1:7003"}
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
CHAT = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "x" * 400}]}
DEPTH = 100_000  # far past the JSON parser's recursion limit
NESTED = b"[" * DEPTH + b"]" * DEPTH


def _servicer(config: ExtProcConfig | None = None) -> ExtProcServicer:
    return ExtProcServicer(make_engine(build_fleet(ADDR), ResidencyGuard()), config or ExtProcConfig())


def _hm(items: list[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items])


def _headers(h: dict[str, str], *, observe: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_hm(list(h.items()))),
                                observability_mode=observe,
                                protocol_config=pb.ProtocolConfiguration(request_body_mode=BUFFERED))


def _body(data: bytes | dict[str, Any]) -> pb.ProcessingRequest:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True))


def _resp_headers(status: int, ctype: str, decision_id: str) -> pb.ProcessingRequest:
    hm = _hm([(":status", str(status)), ("content-type", ctype), ("x-infermesh-decision-id", decision_id)])
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm), observability_mode=True)


def _resp_body(data: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=True), observability_mode=True)


def _run(s: ExtProcServicer, msgs: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    """Drive one stream as ``Process`` does, returning every reply."""
    st = s.open_stream()
    out: list[pb.ProcessingResponse] = []
    try:
        for m in msgs:
            replies = s.handle(st, m)
            out += replies
            s.after_replies(st)
            if s.finished(st, m, replies):
                break
    finally:
        s.close_stream(st)
    return out


def _immediate(resp: pb.ProcessingResponse) -> tuple[int, dict[str, Any]]:
    assert resp.WhichOneof("response") == "immediate_response"
    err = json.loads(resp.immediate_response.body)["error"]
    assert isinstance(err, dict)
    return int(resp.immediate_response.status.code), err


def _decide(s: ExtProcServicer, headers: dict[str, str], body: bytes | dict[str, Any]) -> pb.ProcessingResponse:
    """The request phase of one exchange: its last reply (the decision or an immediate response)."""
    return _run(s, [_headers(headers), _body(body)])[-1]


# -- 1. a request body nested past the parser's recursion limit --

def test_deeply_nested_request_body_is_unparseable_not_a_crash() -> None:
    assert parse_request(b'{"model": "m", "x": ' + NESTED + b"}") is None


def test_deeply_nested_request_body_routes_on_the_header_model() -> None:
    s = _servicer()
    nested = b'{"model": "%s", "x": ' % MODEL.encode() + NESTED + b"}"
    reply = _decide(s, {"x-infermesh-tenant": "acme", "x-infermesh-model": MODEL}, nested)
    assert reply.WhichOneof("response") == "request_body"  # routed, as a non-JSON body is
    assert s.stats["routed"] == 1


def test_an_unexpected_engine_error_is_an_immediate_503(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    s = _servicer()

    def broken(ctx: RequestContext) -> None:
        raise RuntimeError("engine bug")

    monkeypatch.setattr(s.engine, "decide", broken)
    with caplog.at_level(logging.ERROR, logger="decision.extproc"):
        replies = list(s.Process(iter([_headers({"x-infermesh-tenant": "acme"}), _body(CHAT)]), None))
    code, err = _immediate(replies[-1])
    assert code == 503 and err["type"] == "unavailable"
    assert "engine bug" not in err["message"]  # internals stay in the log
    assert any(r.exc_info and "engine bug" in str(r.exc_info[1]) for r in caplog.records)


def test_an_unexpected_context_error_is_an_immediate_503(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _servicer()

    def broken(headers: object, body: object) -> None:
        raise KeyError("oops")

    monkeypatch.setattr(s, "context_of", broken)
    code, err = _immediate(_decide(s, {"x-infermesh-tenant": "acme"}, CHAT))
    assert code == 503 and err["type"] == "unavailable"


# -- 2. an upstream response body nested past the parser's recursion limit --

def _observe(s: ExtProcServicer, status: int, ctype: str, payload: bytes) -> str:
    """Route one request, then stream its response on an observer stream; the decision id."""
    _decide(s, {"x-infermesh-tenant": "acme"}, CHAT)
    (did,) = tuple(s._unobserved)
    _run(s, [_resp_headers(status, ctype, did), _resp_body(payload)])
    return did


@pytest.mark.parametrize(("status", "expect"), [(200, OutcomeStatus.OK), (500, OutcomeStatus.ERROR)])
def test_deeply_nested_json_response_still_records_the_outcome(status: int, expect: OutcomeStatus) -> None:
    s = _servicer()
    did = _observe(s, status, "application/json", b'{"x": ' + NESTED + b"}")
    o = s.engine.outcomes[did]  # type: ignore[attr-defined]
    assert o.status is expect and s.stats["outcomes"] == 1
    assert (o.input_tokens, o.output_tokens) == (0, 0)  # usage unknown: 0, the quota keeps the estimate


def test_deeply_nested_sse_event_still_records_the_outcome() -> None:
    s = _servicer()
    event = b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "x": ' + NESTED + b"}\n\n"
    did = _observe(s, 200, "text/event-stream", event)
    o = s.engine.outcomes[did]  # type: ignore[attr-defined]
    assert o.status is OutcomeStatus.OK and s.stats["outcomes"] == 1
    assert (o.input_tokens, o.output_tokens) == (0, 0)  # usage unknown


def test_usage_reader_survives_nesting_and_keeps_reading() -> None:
    sse = UsageReader(sse=True)
    sse.feed(b'data: {"usage": {"prompt_tokens": 1}, "tokens": ' + NESTED + b"}\n\n")
    sse.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}\n\n')
    u = sse.result()
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == (5, 3)
    unterminated = UsageReader(sse=True)  # the nested line is the stream's last, with no newline
    unterminated.feed(b'data: {"usage": 1, "tokens": ' + NESTED + b"}")
    assert unterminated.result() is None
    body = UsageReader(sse=False)
    body.feed(b'{"usage": ' + NESTED + b"}")
    assert body.result() is None


def test_a_line_that_fails_to_parse_is_not_parsed_again() -> None:
    seen: list[bytes] = []

    class Flaky(UsageReader):
        def _line(self, line: bytes) -> None:
            seen.append(line)
            if line == b"data: bad":
                raise RuntimeError("parser bug")
            super()._line(line)

    r = Flaky(sse=True)
    with pytest.raises(RuntimeError):
        r.feed(b"data: bad\n")
    assert r.result() is None and seen == [b"data: bad"]  # result() found nothing left over


def test_unreadable_usage_cannot_stop_the_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: UsageReader) -> None:
        raise RuntimeError("reader bug")

    monkeypatch.setattr(UsageReader, "result", broken)
    s = _servicer()
    did = _observe(s, 200, "application/json", b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
    o = s.engine.outcomes[did]  # type: ignore[attr-defined]
    assert o.status is OutcomeStatus.OK and s.stats["outcomes"] == 1
    assert (o.input_tokens, o.output_tokens) == (0, 0)  # usage unknown


# -- 3. a 400 names the header or body field the client sent --

@pytest.mark.parametrize(("header", "value"), [
    ("x-infermesh-ttft-target-ms", "abc"), ("x-infermesh-ttft-target-ms", "nan"),
    ("x-infermesh-ttft-target-ms", "-5"), ("x-infermesh-ttft-target-ms", "1e999"),
    ("x-infermesh-max-cost-per-1k-tokens", "inf"), ("x-infermesh-max-cost-per-1k-tokens", "-0.5"),
    ("x-infermesh-tenant", "t" * 300),
])
def test_bad_header_400_names_the_header(header: str, value: str) -> None:
    code, err = _immediate(_decide(_servicer(), {"x-infermesh-tenant": "acme", header: value}, CHAT))
    assert code == 400 and err["type"] == "invalid_argument"
    assert err["message"].startswith(f"{header}: ")


def test_400_names_the_configured_header() -> None:
    s = _servicer(ExtProcConfig(tenant_header="x-org", ttft_target_header="x-slo-ms"))
    for headers, name in (({"x-org": "acme", "x-slo-ms": "-1"}, "x-slo-ms"), ({"x-org": "o" * 300}, "x-org")):
        code, err = _immediate(_decide(s, headers, CHAT))
        assert (code, err["message"].split(":")[0]) == (400, name)


def test_valid_header_numbers_still_route() -> None:
    s = _servicer()
    reply = _decide(s, {"x-infermesh-tenant": "acme", "x-infermesh-ttft-target-ms": "250.5",
                        "x-infermesh-max-cost-per-1k-tokens": "0"}, CHAT)
    assert reply.WhichOneof("response") == "request_body"
    (d,) = s.engine.decisions.values()  # type: ignore[attr-defined]
    assert (d.request.ttft_target_ms, d.request.max_cost_per_1k_tokens) == (250.5, 0.0)


def test_body_400_names_max_tokens() -> None:
    code, err = _immediate(_decide(_servicer(), {"x-infermesh-tenant": "acme"}, {**CHAT, "max_tokens": 20_000_000}))
    assert code == 400 and err["message"] == "max_tokens: must be between 0 and 10000000"


@pytest.mark.parametrize(("field", "client"), [("estimated_input_tokens", "messages"), ("model", "model"),
                                                ("modality", "x-infermesh-modality"), ("labels", "labels")])
def test_context_field_maps_to_what_the_client_sent(monkeypatch: pytest.MonkeyPatch, field: str,
                                                    client: str) -> None:
    s = _servicer()

    def reject(ctx: RequestContext) -> None:
        raise InvalidArgument(field, "rejected")

    monkeypatch.setattr(s.engine, "decide", reject)
    code, err = _immediate(_decide(s, {"x-infermesh-tenant": "acme"}, CHAT))
    assert code == 400 and err["message"] == f"{client}: rejected"
