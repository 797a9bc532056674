"""The ext_proc servicer's protocol logic, message by message, without Envoy or a network."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from decision.domain import OutcomeStatus
from decision.extproc import ExtProcServicer, _Exchange, _Stream, outcome_status
from decision.extproc_config import ExtProcConfig
from decision.extproc_openai import TOKENS_PER_IMAGE, Usage, UsageReader, parse_request
from tests.envoy_support import FAMILY, MODEL, ResidencyGuard, build_fleet, make_engine, set_load

ADDR = {"eu-fast": "127.0.0.1:7001", "eu-stream": "127.0.0.1:7002", "us-stream": "127.0.0.1:7003"}
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


def headers_msg(h: dict[str, str] | list[tuple[str, str]], *, eos: bool = False, mode: int = STREAMED,
                no_wait: bool = True, observe: bool = False) -> pb.ProcessingRequest:
    pairs = h.items() if isinstance(h, dict) else h  # a list may repeat a header
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=hm, end_of_stream=eos), observability_mode=observe,
        protocol_config=pb.ProtocolConfiguration(request_body_mode=mode,
                                                 send_body_without_waiting_for_header_response=no_wait))


def body_msg(doc: object, *, eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(doc).encode(), end_of_stream=eos))


def resp_headers(status: int, ctype: str, *, observe: bool = True) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
                                     base_pb2.HeaderValue(key="content-type", raw_value=ctype.encode())])
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm), observability_mode=observe)


def resp_body(data: bytes, *, eos: bool, observe: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos), observability_mode=observe)


@pytest.fixture()
def servicer() -> ExtProcServicer:
    engine = make_engine(build_fleet(ADDR), ResidencyGuard(over_quota=["greedy"]))
    return ExtProcServicer(engine, ExtProcConfig())


CHAT = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "x" * 400}]}


def set_headers(resp: pb.ProcessingResponse) -> dict[str, str]:
    which = resp.WhichOneof("response")
    common = getattr(resp, which).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def test_one_round_trip_holds_the_header_reply_until_the_body_is_in(servicer: ExtProcServicer) -> None:
    st = _Stream(_Exchange())
    assert servicer.handle(st, headers_msg({"x-infermesh-tenant": "acme", ":path": "/v1/chat/completions"})) == []
    half = json.dumps(CHAT).encode()
    assert servicer.handle(st, pb.ProcessingRequest(request_body=pb.HttpBody(body=half[:20]))) == []
    replies = servicer.handle(st, pb.ProcessingRequest(request_body=pb.HttpBody(body=half[20:], end_of_stream=True)))
    # The header reply carries the decision, then one body reply per chunk, in order.
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body", "request_body"]
    d = st.ex.decision
    assert d is not None
    h = set_headers(replies[0])
    assert h["x-gateway-destination-endpoint"] == d.route.address
    assert h["x-infermesh-decision-id"] == d.decision_id
    assert replies[0].request_headers.response.clear_route_cache
    chain = replies[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"]
    assert chain.string_value.split(",") == [d.route.address, *(r.address for r in d.fallbacks)]
    assert len(d.fallbacks) == 2
    # The body fed the decision context: model, prompt size estimate, output budget.
    assert d.request.model == MODEL and d.request.expected_output_tokens == 16
    assert d.request.estimated_input_tokens == 100 + 4


def test_a_held_body_that_ends_in_trailers_is_decided_at_the_trailers(servicer: ExtProcServicer) -> None:
    st = _Stream(_Exchange())
    servicer.handle(st, headers_msg({"x-infermesh-tenant": "acme"}))
    assert servicer.handle(st, body_msg(CHAT, eos=False)) == []
    replies = servicer.handle(st, pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body", "request_trailers"]
    assert st.ex.decision is not None and not st.hold_headers


def test_a_held_body_is_bounded(servicer: ExtProcServicer) -> None:
    servicer.config = dataclasses.replace(servicer.config, max_request_body_bytes=1000)
    st = _Stream(_Exchange())
    servicer.handle(st, headers_msg({"x-infermesh-tenant": "acme"}))
    assert servicer.handle(st, pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x" * 600))) == []
    (resp,) = servicer.handle(st, pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x" * 600)))
    code, doc = immediate(resp)
    err = doc["error"]
    assert code == 413 and isinstance(err, dict) and err["type"] == "request_too_large"
    assert st.body is None and st.ex.decision is None


def test_destination_header_is_overwritten_not_appended(servicer: ExtProcServicer) -> None:
    st = _Stream(_Exchange())
    servicer.handle(st, headers_msg({"x-infermesh-tenant": "acme", "x-gateway-destination-endpoint": "10.6.6.6:1"}))
    (first, _) = servicer.handle(st, body_msg(CHAT))
    opts = first.request_headers.response.header_mutation.set_headers
    dest = [o for o in opts if o.header.key == "x-gateway-destination-endpoint"]
    assert len(dest) == 1 and dest[0].header.raw_value.decode() in ADDR.values()
    assert dest[0].append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def test_buffered_mode_decides_on_the_body_reply(servicer: ExtProcServicer) -> None:
    st = _Stream(_Exchange())
    (cont,) = servicer.handle(st, headers_msg({"x-infermesh-tenant": "acme"}, mode=BUFFERED, no_wait=False))
    assert cont.WhichOneof("response") == "request_headers" and not set_headers(cont)
    (reply,) = servicer.handle(st, body_msg(CHAT))
    assert reply.WhichOneof("response") == "request_body"
    assert set_headers(reply)["x-gateway-destination-endpoint"] in ADDR.values()


def test_family_name_and_header_model(servicer: ExtProcServicer) -> None:
    st = _Stream(_Exchange())
    (reply,) = servicer.handle(st, headers_msg({"x-infermesh-tenant": "acme", "x-infermesh-model": FAMILY},
                                               eos=True))
    assert st.ex.decision is not None and st.ex.decision.request.model_family == FAMILY
    assert reply.WhichOneof("response") == "request_headers"


def test_residency_restricts_the_choice(servicer: ExtProcServicer) -> None:
    set_load(servicer.engine, {"eu-fast": 400.0, "eu-stream": 400.0})  # the US endpoint looks best
    for allowed, expect in (("EU", {"eu-fast", "eu-stream"}), ("US", {"us-stream"})):
        st = _Stream(_Exchange())
        servicer.handle(st, headers_msg({"x-infermesh-tenant": "acme",
                                         "x-infermesh-model": MODEL,
                                         "x-infermesh-allowed-jurisdictions": allowed}, eos=True,
                                        mode=0, no_wait=False))
        assert st.ex.decision is not None and st.ex.decision.route.endpoint_id in expect
        assert all(r.endpoint_id in expect for r in st.ex.decision.fallbacks)


def immediate(resp: pb.ProcessingResponse) -> tuple[int, dict[str, object]]:
    assert resp.WhichOneof("response") == "immediate_response"
    return int(resp.immediate_response.status.code), json.loads(resp.immediate_response.body)


@pytest.mark.parametrize(("headers", "code", "etype"), [
    ({"x-infermesh-tenant": "acme", "x-infermesh-allowed-jurisdictions": "APAC"}, 503, "no_candidate"),
    ({"x-infermesh-tenant": "greedy"}, 429, "quota_exceeded"),
    ({}, 400, "invalid_argument"),
    ({"x-infermesh-tenant": "acme", "x-infermesh-ttft-target-ms": "soon"}, 400, "invalid_argument"),
])
def test_denials_are_immediate_responses(servicer: ExtProcServicer, headers: dict[str, str], code: int,
                                         etype: str) -> None:
    st = _Stream(_Exchange())
    servicer.handle(st, headers_msg(headers))
    (resp,) = servicer.handle(st, body_msg(CHAT))
    got, doc = immediate(resp)
    assert got == code
    err = doc["error"]
    assert isinstance(err, dict) and err["type"] == etype
    if code == 503:
        assert err["rules"] == ["test.residency"] and err["decision_id"]
    if code == 429:
        assert err["rules"] == ["test.quota"]
    assert st.ex.decision is None


def test_unknown_model_is_404(servicer: ExtProcServicer) -> None:
    st = _Stream(_Exchange())
    servicer.handle(st, headers_msg({"x-infermesh-tenant": "acme"}))
    (resp,) = servicer.handle(st, body_msg({**CHAT, "model": "gpt-17"}))
    assert immediate(resp)[0] == 404


def test_observer_stream_records_the_outcome(servicer: ExtProcServicer) -> None:
    clock = iter([0.0, 0.010, 0.050, 0.060, 0.090, 0.100]).__next__
    servicer._now = clock
    pick = _Stream(_Exchange())
    servicer.handle(pick, headers_msg({"x-infermesh-tenant": "acme"}))  # t0 = 0.0
    servicer.handle(pick, body_msg({**CHAT, "stream": True}))
    d = pick.ex.decision
    assert d is not None and not pick.owner  # the pick stream hands the outcome to the observer
    obs = _Stream(_Exchange())
    assert servicer.handle(obs, headers_msg({"x-infermesh-decision-id": d.decision_id}, observe=True)) == []
    assert obs.owner
    servicer.handle(obs, resp_headers(200, "text/event-stream"))  # 0.010
    servicer.handle(obs, resp_body(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', eos=False))  # 0.050
    servicer.handle(obs, resp_body(b'data: {"choices": [], "usage": {"prompt_tokens": 99, '
                                   b'"completion_tokens": 7}}\n\ndata: [DONE]\n\n', eos=True))  # 0.060
    assert obs.ex.ended
    servicer._report(obs.ex, 0.090)
    o = servicer.engine.outcomes[d.decision_id]  # type: ignore[attr-defined]
    assert o.status is OutcomeStatus.OK
    assert o.ttft_ms == pytest.approx(50.0) and o.latency_ms == pytest.approx(90.0)
    assert (o.input_tokens, o.output_tokens) == (99, 7)


def test_a_context_header_sent_twice_is_refused_not_resolved_by_order(servicer: ExtProcServicer) -> None:
    # A gateway that appends its authenticated tenant to the client's copy, instead of replacing it.
    st = _Stream(_Exchange())
    servicer.handle(st, headers_msg([("x-infermesh-tenant", "victim-corp"), ("X-InferMesh-Tenant", "acme"),
                                     ("x-custom", "a"), ("x-custom", "b")]))
    (resp,) = servicer.handle(st, body_msg(CHAT))
    code, doc = immediate(resp)
    err = doc["error"]
    assert code == 400 and isinstance(err, dict) and err["type"] == "invalid_argument"
    assert str(err["message"]).startswith("x-infermesh-tenant: sent more than once")
    assert st.ex.decision is None
    ok = _Stream(_Exchange())  # a repeated header the decision does not read is no reason to refuse
    servicer.handle(ok, headers_msg([("x-infermesh-tenant", "acme"), ("x-custom", "a"), ("x-custom", "b")]))
    servicer.handle(ok, body_msg(CHAT))
    assert ok.ex.decision is not None


def test_a_response_served_by_a_fallback_is_not_credited_to_the_route(servicer: ExtProcServicer) -> None:
    # Envoy walked the route's chain: the route refused, its first fallback answered (envoy.lb says which).
    from decision.extproc_config import DESTINATION_SERVED_KEY

    learnt: list[float] = []
    engine = servicer.engine
    real_learn = engine._learn

    def learn(features: Any, reward: float) -> None:
        learnt.append(reward)
        real_learn(features, reward)

    engine._learn = learn  # type: ignore[method-assign]
    pick = _Stream(_Exchange())
    servicer.handle(pick, headers_msg({"x-infermesh-tenant": "acme"}))
    servicer.handle(pick, body_msg(CHAT))
    d = pick.ex.decision
    assert d is not None and d.fallbacks
    obs = _Stream(_Exchange())
    servicer.handle(obs, headers_msg({"x-infermesh-decision-id": d.decision_id}, observe=True))
    served = resp_headers(200, "application/json")
    served.metadata_context.filter_metadata[servicer.config.metadata_namespace].fields[
        DESTINATION_SERVED_KEY].string_value = d.fallbacks[0].address
    servicer.handle(obs, served)
    servicer.handle(obs, resp_body(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 3}}', eos=True))
    servicer._report(obs.ex, servicer._now())
    o = engine.outcomes[d.decision_id]  # type: ignore[attr-defined]
    assert o.served_endpoint_id == d.fallbacks[0].endpoint_id and o.status is OutcomeStatus.OK
    assert learnt and learnt[-1] < 0  # the route's arm learns that it did not serve
    assert engine.stats["outcomes_by_fallback"] == 1


def test_a_slow_body_upload_is_not_charged_to_the_endpoint(servicer: ExtProcServicer) -> None:
    # Buffered mode decides once the whole body is in: the client's upload time is not the endpoint's TTFT
    # (any client could otherwise make every endpoint look slow to the learner and the ledger).
    now = [0.0]
    servicer._now = lambda: now[0]
    pick = _Stream(_Exchange())
    servicer.handle(pick, headers_msg({"x-infermesh-tenant": "acme"}))
    now[0] = 30.0  # the body took 30 s to arrive
    servicer.handle(pick, body_msg(CHAT))
    d = pick.ex.decision
    assert d is not None
    obs = _Stream(_Exchange())
    servicer.handle(obs, headers_msg({"x-infermesh-decision-id": d.decision_id}, observe=True))
    now[0] = 30.010
    servicer.handle(obs, resp_headers(200, "application/json"))
    now[0] = 30.020
    servicer.handle(obs, resp_body(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 4}}', eos=True))
    servicer._report(obs.ex, 30.025)
    o = servicer.engine.outcomes[d.decision_id]  # type: ignore[attr-defined]
    assert o.ttft_ms == pytest.approx(20.0) and o.latency_ms == pytest.approx(25.0)


def test_observer_claims_by_response_header_when_request_headers_are_skipped(servicer: ExtProcServicer) -> None:
    pick = _Stream(_Exchange())
    servicer.handle(pick, headers_msg({"x-infermesh-tenant": "acme"}))
    last = servicer.handle(pick, body_msg(CHAT))
    assert servicer.finished(pick, body_msg(CHAT), last)  # the pick stream may close now
    d = pick.ex.decision
    assert d is not None
    obs = _Stream(_Exchange())
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in
                                     ((":status", "200"), ("x-infermesh-decision-id", d.decision_id))])
    servicer.handle(obs, pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm), observability_mode=True))
    assert obs.owner and obs.ex.http_status == 200 and obs.ex.t_headers > 0
    # A second observer cannot claim the same decision.
    other = _Stream(_Exchange())
    servicer.handle(other, pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm), observability_mode=True))
    assert not other.owner


def test_observer_ignores_unknown_decisions(servicer: ExtProcServicer) -> None:
    obs = _Stream(_Exchange())
    servicer.handle(obs, headers_msg({"x-infermesh-decision-id": "forged"}, observe=True))
    assert not obs.owner
    assert servicer.finished(obs, headers_msg({}, observe=True), [])


def test_inline_mode_reports_on_the_same_stream() -> None:
    engine = make_engine(build_fleet(ADDR), ResidencyGuard())
    s = ExtProcServicer(engine, ExtProcConfig(response_phase="inline"))
    msgs = [headers_msg({"x-infermesh-tenant": "acme"}), body_msg(CHAT),
            resp_headers(503, "application/json", observe=False),
            resp_body(b'{"error": "overloaded"}', eos=True, observe=False)]
    replies = list(s.Process(iter(msgs), None))
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body", "response_headers",
                                                          "response_body"]
    (o,) = engine.outcomes.values()
    assert o.status is OutcomeStatus.ERROR and o.error == "HTTP 503"
    # No usage in the body: unknown, reported as 0 (the quota then keeps the estimate charged).
    assert (o.input_tokens, o.output_tokens) == (0, 0)


def test_a_200_json_answer_without_usage_reports_its_tokens_unknown() -> None:
    # Reported as (estimate, 0) it read as "used the prompt only": the whole max_tokens share went
    # back to the tenant's token quota for an answer of any length.
    engine = make_engine(build_fleet(ADDR), ResidencyGuard())
    s = ExtProcServicer(engine, ExtProcConfig(response_phase="inline"))
    answer = json.dumps({"choices": [{"message": {"content": "y" * 20000}}]}).encode()
    msgs = [headers_msg({"x-infermesh-tenant": "acme"}), body_msg(CHAT),
            resp_headers(200, "application/json", observe=False), resp_body(answer, eos=True, observe=False)]
    list(s.Process(iter(msgs), None))
    (o,) = engine.outcomes.values()
    assert o.status is OutcomeStatus.OK and (o.input_tokens, o.output_tokens) == (0, 0)


def test_stream_closed_mid_response_is_cancelled() -> None:
    engine = make_engine(build_fleet(ADDR), ResidencyGuard())
    s = ExtProcServicer(engine, ExtProcConfig(response_phase="inline"))
    msgs = [headers_msg({"x-infermesh-tenant": "acme"}), body_msg(CHAT),
            resp_headers(200, "text/event-stream", observe=False)]
    list(s.Process(iter(msgs), None))
    (o,) = engine.outcomes.values()
    assert o.status is OutcomeStatus.CANCELLED


@pytest.mark.parametrize(("code", "status"), [(200, OutcomeStatus.OK), (204, OutcomeStatus.OK),
                                              (408, OutcomeStatus.TIMEOUT), (504, OutcomeStatus.TIMEOUT),
                                              (499, OutcomeStatus.CANCELLED), (500, OutcomeStatus.ERROR),
                                              (429, OutcomeStatus.ERROR)])
def test_outcome_status_from_http(code: int, status: OutcomeStatus) -> None:
    assert outcome_status(code) is status


def test_request_body_parsing() -> None:
    r = parse_request(json.dumps({"model": "m", "max_completion_tokens": 32, "stream": True, "messages": [
        {"role": "system", "content": "abcd" * 10},
        {"role": "user", "content": [{"type": "text", "text": "abcd" * 5}, {"type": "image_url"}]}]}).encode())
    assert r is not None and (r.model, r.estimated_input_tokens, r.max_tokens, r.stream) == (
        "m", 15 + 8 + TOKENS_PER_IMAGE, 32, True)  # an image part costs tokens too
    assert parse_request(b"not json") is None and parse_request(b"[1, 2]") is None and parse_request(b"") is None
    legacy = parse_request(b'{"model": "m", "prompt": "abcdefgh", "max_tokens": 3}')
    assert legacy is not None and (legacy.estimated_input_tokens, legacy.max_tokens) == (2, 3)
    # Prompts given as token ids count a token each: at 0 they slipped past the tenant's token quota.
    for doc, tokens in (({"prompt": list(range(5000))}, 5000), ({"prompt": [[1, 2, 3], [4, 5]]}, 5),
                        ({"input": [7] * 800}, 800), ({"input": ["abcdefgh", [1, 2]]}, 2 + 2)):
        r = parse_request(json.dumps({"model": "m", **doc}).encode())
        assert r is not None and r.estimated_input_tokens == tokens, (doc, r)


def test_an_error_event_in_a_stream_that_began_with_200_is_an_error_outcome(servicer: ExtProcServicer) -> None:
    pick = _Stream(_Exchange())
    servicer.handle(pick, headers_msg({"x-infermesh-tenant": "acme"}))
    servicer.handle(pick, body_msg({**CHAT, "stream": True}))
    d = pick.ex.decision
    assert d is not None and pick.ex.headers is None  # what waits for the response keeps no headers...
    assert not d.trace and not d.stored_trace  # ...nor the trace (the audit log took it)
    obs = _Stream(_Exchange())
    servicer.handle(obs, headers_msg({"x-infermesh-decision-id": d.decision_id}, observe=True))
    servicer.handle(obs, resp_headers(200, "text/event-stream"))
    servicer.handle(obs, resp_body(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
                                   b'data: {"error": {"message": "EngineDeadError", "code": 500}}\n\n'
                                   b'data: [DONE]\n\n', eos=True))
    servicer._report(obs.ex, servicer._now())
    o = servicer.engine.outcomes[d.decision_id]  # type: ignore[attr-defined]
    assert o.status is OutcomeStatus.ERROR and o.error == "error event in the stream: EngineDeadError"


def _streamed_outcome(servicer: ExtProcServicer, body: bytes, path: str = "") -> tuple[OutcomeStatus, str]:
    """(status, error) recorded for an HTTP 200 event stream whose body is ``body``, then end_of_stream."""
    pick = _Stream(_Exchange())
    servicer.handle(pick, headers_msg({"x-infermesh-tenant": "acme", ":path": path}))
    servicer.handle(pick, body_msg({**CHAT, "stream": True}))
    d = pick.ex.decision
    assert d is not None
    obs = _Stream(_Exchange())
    servicer.handle(obs, headers_msg({"x-infermesh-decision-id": d.decision_id}, observe=True))
    servicer.handle(obs, resp_headers(200, "text/event-stream"))
    servicer.handle(obs, resp_body(body, eos=True))
    assert obs.ex.ended
    servicer.after_replies(obs)
    o = servicer.engine.outcomes[d.decision_id]  # type: ignore[attr-defined]
    return o.status, o.error


CHUNK = b'data: {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "a"}}]}\n\n'
RESPONSES = (b'event: response.created\ndata: {"type": "response.created", "response": {"status": "in_progress"}}\n\n'
             b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", '
             b'"delta": "response.completed"}\n\n')  # a delta whose text names the event ends nothing


@pytest.mark.parametrize(("body", "path", "expect"), [
    # Chat and text completions (OpenAI, vLLM) always end with [DONE]: without it the stream was cut.
    (CHUNK * 3, "/v1/chat/completions", (OutcomeStatus.ERROR, "stream ended without its terminal event "
                                                              "(data: [DONE])")),
    (CHUNK * 3, "", (OutcomeStatus.ERROR, "stream ended without its terminal event (data: [DONE])")),
    (CHUNK * 3 + b"data: [DONE]", "/v1/chat/completions", (OutcomeStatus.OK, "")),  # last line, no newline
    # The Responses API ends with response.completed (or response.incomplete), not [DONE].
    (RESPONSES, "/v1/responses", (OutcomeStatus.ERROR, "stream ended without its terminal event "
                                                       "(response.completed)")),
    (RESPONSES + b'event: response.completed\ndata: {"type": "response.completed", "response": {"usage": '
                 b'{"input_tokens": 9, "output_tokens": 2}}}\n\n', "/v1/responses", (OutcomeStatus.OK, "")),
    (RESPONSES + b'data: {"type": "response.incomplete", "response": {"incomplete_details": '
                 b'{"reason": "max_output_tokens"}}}\n\n', "", (OutcomeStatus.OK, "")),
    # An error event already says what went wrong.
    (CHUNK + b'data: {"error": {"message": "EngineDeadError"}}\n\n', "/v1/chat/completions",
     (OutcomeStatus.ERROR, "error event in the stream: EngineDeadError")),
    # No event at all: the API says which end was due; an API not known to have one stays ok.
    (b"", "/v1/chat/completions", (OutcomeStatus.ERROR, "stream ended without its terminal event (data: [DONE])")),
    (b"", "/generate_stream", (OutcomeStatus.OK, "")),
    # A format with no terminal event (TGI's native stream) is ok however it ends.
    (b'data: {"token": {"text": "a"}}\n\ndata: {"token": {"text": "b"}, "generated_text": "ab"}\n\n',
     "/generate_stream", (OutcomeStatus.OK, "")),
])
def test_a_stream_that_ends_without_its_terminal_event_is_an_error(
        servicer: ExtProcServicer, body: bytes, path: str, expect: tuple[OutcomeStatus, str]) -> None:
    assert _streamed_outcome(servicer, body, path) == expect


def test_usage_from_json_and_sse_split_anywhere() -> None:
    j = UsageReader(sse=False)
    doc = json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 34}}).encode()
    for i in range(0, len(doc), 7):
        j.feed(doc[i:i + 7])
    assert j.result() is not None and (j.result().prompt_tokens, j.result().completion_tokens) == (12, 34)  # type: ignore[union-attr]
    stream = (b'data: {"choices": [{"delta": {"content": "a"}}], "usage": null}\n\n' * 3 +
              b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}\n\ndata: [DONE]\n\n')
    for step in (1, 5, 64, len(stream)):
        r = UsageReader(sse=True)
        for i in range(0, len(stream), step):
            r.feed(stream[i:i + step])
        u = r.result()
        assert u is not None and (u.prompt_tokens, u.completion_tokens) == (5, 3) and r.content_chunks == 3
    # The Responses API reports usage inside its response.completed event.
    responses = UsageReader(sse=True)
    responses.feed(b'event: response.completed\ndata: {"type": "response.completed", "response": '
                   b'{"usage": {"input_tokens": 1200, "output_tokens": 50}}}\n\n')
    assert responses.result() == Usage(1200, 50) and not responses.error
    no_usage = UsageReader(sse=True)
    no_usage.feed(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n' * 4)
    assert no_usage.result() is None and no_usage.content_chunks == 4
    big = UsageReader(sse=False, max_json_bytes=10)
    big.feed(doc)
    assert big.result() is None


def test_config_from_mapping_rejects_unknown_keys() -> None:
    c = ExtProcConfig.from_mapping({"tenant_header": "X-Org", "default_tenant": "anon"})
    assert c.tenant_header == "x-org" and c.default_tenant == "anon"
    with pytest.raises(ValueError, match="tenant_heder"):
        ExtProcConfig.from_mapping({"tenant_heder": "x"})
    with pytest.raises(ValueError, match="response_phase"):
        ExtProcConfig(response_phase="sometimes")
    for bad, field in (({"tenant_header": 5}, "tenant_header"), ({"model_header": "x model"}, "model_header"),
                       ({"max_request_body_bytes": "16M"}, "max_request_body_bytes"),
                       ({"max_response_json_bytes": True}, "max_response_json_bytes"),
                       ({"model_aliases": {"gpt-4o": 3}}, "model_aliases"),
                       ({"default_tenant": None}, "default_tenant")):
        with pytest.raises(ValueError, match=f"extproc.{field}: must"):
            ExtProcConfig.from_mapping(bad)


def _drive_threaded(s: ExtProcServicer, msgs: list[pb.ProcessingRequest]) -> int:
    consumed = 0

    def feed() -> Any:
        nonlocal consumed
        for m in msgs:
            consumed += 1
            yield m

    list(s.Process(feed(), None))
    return consumed


def _drive_asyncio(s: ExtProcServicer, msgs: list[pb.ProcessingRequest]) -> int:
    import asyncio

    from decision.extproc_aio import AioExtProcServicer

    consumed = 0

    async def feed() -> Any:
        nonlocal consumed
        for m in msgs:
            consumed += 1
            yield m

    async def run() -> None:
        async for _ in AioExtProcServicer(s).Process(feed(), None):
            pass

    asyncio.run(run())
    return consumed


def _drive_grpclib(s: ExtProcServicer, msgs: list[pb.ProcessingRequest]) -> int:
    import asyncio

    from decision.extproc_grpclib import _ExtProc

    frames = [b"\0" + len(b).to_bytes(4, "big") + b for b in (m.SerializeToString() for m in msgs)]
    starts = {sum(map(len, frames[:i])) for i in range(len(frames))}

    class Raw:  # grpclib's protocol stream: the handler reads each length prefix, then the message
        def __init__(self) -> None:
            self.data, self.pos, self.consumed = b"".join(frames), 0, 0

        async def recv_data(self, n: int) -> bytes:
            self.consumed += self.pos in starts and self.pos < len(self.data)
            chunk = self.data[self.pos:self.pos + n]
            self.pos += len(chunk)
            return chunk

    class Codec:
        def decode(self, data: bytes, message_type: Any) -> Any:
            return message_type.FromString(data)

    class Stream:  # what the handler uses of grpclib's server stream
        def __init__(self) -> None:
            self._stream, self._codec = Raw(), Codec()

        async def send_message(self, reply: pb.ProcessingResponse) -> None:
            pass

    stream = Stream()

    async def run() -> None:
        await _ExtProc(s).process(stream)  # type: ignore[arg-type]

    asyncio.run(run())
    return stream._stream.consumed


@pytest.mark.parametrize("drive", [_drive_threaded, _drive_asyncio, _drive_grpclib])
def test_every_server_kind_closes_a_stream_once_it_has_nothing_left_to_do(drive: Any) -> None:
    """A pick stream ends after its last request-phase answer, an observer stream once its outcome
    is reported: the messages Envoy might still send on them are never waited for (on the threaded
    server a lingering stream holds a worker thread; 64 of them starved the processor once)."""
    s = ExtProcServicer(make_engine(build_fleet(ADDR), ResidencyGuard()))
    extra = headers_msg({}, observe=True)
    assert drive(s, [headers_msg({"x-infermesh-tenant": "acme"}), body_msg(CHAT), extra]) == 2
    (did,) = tuple(s._unobserved)
    observer = [headers_msg({"x-infermesh-decision-id": did}, observe=True),
                resp_headers(200, "application/json"),
                resp_body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}', eos=True), extra, extra]
    assert drive(s, observer) == 3
    assert s.stats["outcomes"] == 1
