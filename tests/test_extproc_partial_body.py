"""``request_body_mode: BUFFERED_PARTIAL``: a body bigger than Envoy's buffer reaches the picker cut short.

Envoy then sends the body's first part (what fits its buffer) with ``end_of_stream: false``, holds
the request headers for the answer, and lets the rest go upstream unseen. A valid request is never
refused for being cut: the model comes from the header or from the part seen, and the input-token
estimate from the whole body's ``content-length``, so a big body cannot dodge a token quota. What
cannot be determined is refused with a reason: no model anywhere (413), a JSON body of unknown size
(411). The trace's labels say the body was partial.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from decision.envoy_bootstrap import listener
from decision.extproc import ExtProcServicer, serve_extproc
from decision.extproc_config import ExtProcConfig
from decision.extproc_envoyrun import Backend, EnvoyProcess, ext_proc_filters, free_port, render_config
from decision.extproc_openai import CHARS_PER_TOKEN, parse_cut_request, parse_request
from decision.validation import MAX_TOKENS
from tests.envoy_support import MODEL, ResidencyGuard, build_fleet, make_engine, set_load

ADDR = {"eu-fast": "127.0.0.1:7001", "eu-stream": "127.0.0.1:7002", "us-stream": "127.0.0.1:7003"}
PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
TENANT = {"x-infermesh-tenant": "acme"}


def _servicer() -> ExtProcServicer:
    return ExtProcServicer(make_engine(build_fleet(ADDR), ResidencyGuard(over_quota=["greedy"])), ExtProcConfig())


def _chat(prompt_chars: int, *, model_first: bool = True, **extra: Any) -> bytes:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x" * prompt_chars}]
    doc = {"model": MODEL, "max_tokens": 32, **extra, "messages": messages} if model_first else \
        {"messages": messages, "model": MODEL, "max_tokens": 32, **extra}  # as the OpenAI Python SDK orders it
    return json.dumps(doc).encode()


def _exchange(s: ExtProcServicer, headers: dict[str, str], body: bytes, seen: int,
              ) -> tuple[pb.ProcessingResponse, Any, bool]:
    """Envoy's two messages for a body cut after ``seen`` bytes: (the answer to the body, the stream, finished)."""
    st = s.open_stream()
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hm),
                                 protocol_config=pb.ProtocolConfiguration(request_body_mode=PARTIAL))
    (cont,) = s.handle(st, first)
    # The route cache is cleared at the headers: for a cut body, the answer to the body is too late.
    assert cont.request_headers.response.clear_route_cache
    assert list(cont.request_headers.response.header_mutation.remove_headers) == ["x-gateway-destination-endpoint"]
    cut = pb.ProcessingRequest(request_body=pb.HttpBody(body=body[:seen], end_of_stream=seen >= len(body)))
    (reply,) = s.handle(st, cut)
    return reply, st, s.finished(st, cut, [reply])


def _routed(reply: pb.ProcessingResponse) -> dict[str, str]:
    assert reply.WhichOneof("response") == "request_body", reply
    return {h.header.key: h.header.raw_value.decode() for h in reply.request_body.response.header_mutation.set_headers}


def _refused(reply: pb.ProcessingResponse) -> tuple[int, dict[str, Any]]:
    assert reply.WhichOneof("response") == "immediate_response", reply
    err = json.loads(reply.immediate_response.body)["error"]
    assert isinstance(err, dict)
    return int(reply.immediate_response.status.code), err


def test_a_cut_body_routes_on_what_it_shows_and_charges_its_full_size() -> None:
    s = _servicer()
    body = _chat(40_000, stream=True)
    reply, st, finished = _exchange(s, {**TENANT, "content-length": str(len(body)), ":path": "/v1/chat/completions"},
                                    body, 4096)
    h = _routed(reply)  # routed on the body reply, whose header mutation Envoy applies (it held the headers)
    d = st.ex.decision
    assert d is not None and h["x-gateway-destination-endpoint"] == d.route.address
    assert not reply.request_body.response.clear_route_cache  # the cut part is on its way to the router
    assert d.request.model == MODEL and d.request.expected_output_tokens == 32  # read from the part seen
    assert d.request.estimated_input_tokens == math.ceil(len(body) / CHARS_PER_TOKEN)  # not 0, not 4096's
    whole = parse_request(body)
    assert whole is not None and d.request.estimated_input_tokens >= whole.estimated_input_tokens
    assert st.ex.request is not None and st.ex.request.stream
    assert {k: d.request.labels[k] for k in ("request_body", "request_body_bytes_seen", "request_body_bytes")} == {
        "request_body": "partial", "request_body_bytes_seen": "4096", "request_body_bytes": str(len(body))}
    assert finished  # nothing more of the request comes: the pick stream can close (observer mode)


def test_the_model_header_stands_in_when_the_model_is_past_the_cut() -> None:
    s = _servicer()
    body = _chat(40_000, model_first=False)
    reply, st, _ = _exchange(s, {**TENANT, "x-infermesh-model": MODEL, "content-length": str(len(body))}, body, 4096)
    _routed(reply)
    d = st.ex.decision
    assert d is not None and d.request.model == MODEL
    assert d.request.estimated_input_tokens == math.ceil(len(body) / CHARS_PER_TOKEN)
    assert d.request.expected_output_tokens == 0  # max_tokens is past the cut: unknown, as if not sent


def test_no_model_anywhere_is_413_naming_the_fix() -> None:
    s = _servicer()
    body = _chat(40_000, model_first=False)
    code, err = _refused(_exchange(s, {**TENANT, "content-length": str(len(body))}, body, 4096)[0])
    assert (code, err["type"]) == (413, "request_too_large")
    assert err["message"] == ("request body over the proxy's buffer (its first 4096 bytes seen) and no model in "
                              "them nor a x-infermesh-model header: send the header, or put model first in the body")
    assert s.engine.decisions == {}  # type: ignore[attr-defined]


def test_a_cut_json_body_of_unknown_size_is_411() -> None:
    s = _servicer()
    body = _chat(40_000)
    code, err = _refused(_exchange(s, TENANT, body, 4096)[0])  # chunked: no content-length
    assert (code, err["type"]) == (411, "length_required")
    assert "without content-length" in err["message"] and "token quotas" in err["message"]
    code, _ = _refused(_exchange(s, {**TENANT, "content-length": "lots"}, body, 4096)[0])
    assert code == 411


def test_a_quota_still_applies_to_a_cut_body() -> None:
    s = _servicer()
    body = _chat(40_000)
    code, err = _refused(_exchange(s, {"x-infermesh-tenant": "greedy", "content-length": str(len(body))},
                                   body, 4096)[0])
    assert (code, err["type"]) == (429, "quota_exceeded")


def test_a_body_too_big_for_any_context_claims_the_most_a_request_may_not_a_400() -> None:
    s = _servicer()
    body = _chat(40_000)
    reply, st, _ = _exchange(s, {**TENANT, "content-length": str(100 << 20)}, body, 4096)
    _routed(reply)
    d = st.ex.decision
    assert d is not None and d.request.estimated_input_tokens == MAX_TOKENS


def test_a_cut_body_that_is_not_json_is_read_as_a_whole_one_would_be() -> None:
    s = _servicer()
    body = b"--boundary\r\ncontent-disposition: form-data; name=file\r\n\r\n" + b"\x00\x01" * 20_000
    reply, st, _ = _exchange(s, {**TENANT, "x-infermesh-model": MODEL}, body, 4096)
    _routed(reply)  # no content-length needed: a body that is not JSON gets no prompt estimate, whole or cut
    d = st.ex.decision
    assert d is not None and d.request.estimated_input_tokens == 0
    assert d.request.labels["request_body"] == "partial" and d.request.labels["request_body_bytes"] == "unknown"


def test_an_object_whole_before_the_cut_is_read_whole() -> None:
    s = _servicer()
    doc = _chat(400)
    body = doc + b" " * 10_000  # whitespace after the object: valid JSON, no prompt
    reply, st, _ = _exchange(s, TENANT, body, len(doc) + 10)  # no content-length needed either
    _routed(reply)
    whole = parse_request(doc)
    d = st.ex.decision
    assert whole is not None and d is not None and d.request.estimated_input_tokens == whole.estimated_input_tokens


def test_a_whole_body_in_partial_mode_is_a_whole_body() -> None:
    s = _servicer()
    body = _chat(400)
    reply, st, finished = _exchange(s, TENANT, body, len(body))  # it fit: end_of_stream, as in BUFFERED
    _routed(reply)
    assert reply.request_body.response.clear_route_cache  # the headers are still held: as in BUFFERED
    d = st.ex.decision
    assert d is not None and "request_body" not in d.request.labels and finished


def test_the_members_read_from_a_cut_body_are_only_those_whole_before_the_cut() -> None:
    body = b'{"model": "m", "stream": true, "max_tokens": 1280, "messages": [{"role": "user", "content": "hi"}]}'
    for seen in range(len(body)):
        r = parse_cut_request(body[:seen], len(body))
        if seen == 0:
            assert r is None
            continue
        assert r is not None
        assert r.model in ("", "m") and r.max_tokens in (0, 1280), (seen, r)  # never 1 or 12 or 128
        assert r.estimated_input_tokens == math.ceil(len(body) / CHARS_PER_TOKEN)
    assert parse_cut_request(b"not json", 100) is None
    assert parse_cut_request('{"model": "é'.encode()[:-1], 100) is not None  # a character cut in two at the end
    assert parse_cut_request(b'{"model": "\xff", "x": 1', 100) is None  # not UTF-8 before the cut: not JSON
    # JSON a backend in Python reads (a UTF-8 BOM, UTF-16) is JSON here too: it cannot pass as "not JSON".
    for enc in ("utf-8-sig", "utf-16", "utf-32-le"):
        encoded = body.decode().encode(enc)
        r = parse_cut_request(encoded[:len(encoded) * 3 // 4 + 1], len(encoded))  # an odd cut, in messages
        assert r is not None and r.model == "m" and r.max_tokens == 1280, enc


# -- through a real Envoy 1.40 with BUFFERED_PARTIAL and a small buffer --

@pytest.mark.envoy
def test_a_body_over_envoys_buffer_is_routed_whole_through_a_real_envoy() -> None:
    backend = Backend("eu-fast", streaming=False)
    extproc = None
    try:
        engine = make_engine(build_fleet({**ADDR, "eu-fast": backend.address}), ResidencyGuard())
        set_load(engine, {"eu-fast": 0.0, "eu-stream": 500.0, "us-stream": 500.0})  # only eu-fast listens
        extproc = serve_extproc(engine, address="127.0.0.1:0", max_streams=8)
        listen, admin = free_port(), free_port()
        cfg = render_config(listen_port=listen, admin_port=admin, extproc_port=extproc.port)
        inference = listener(cfg, "inference")
        inference["per_connection_buffer_limit_bytes"] = 16384
        ext_proc_filters(inference)[0]["processing_mode"]["request_body_mode"] = "BUFFERED_PARTIAL"
        with EnvoyProcess(cfg, admin) as envoy, \
                httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10.0) as client:
            json_type = {"content-type": "application/json"}
            # A body that fits the buffer comes whole, as in BUFFERED.
            r = client.post("/v1/chat/completions", content=_chat(400), headers={**TENANT, **json_type})
            assert r.status_code == 200, r.text
            assert "request_body" not in engine.decisions[r.headers["x-infermesh-decision-id"]].request.labels
            body = _chat(200_000, model_first=False)
            r = client.post("/v1/chat/completions", content=body,
                            headers={**TENANT, **json_type, "x-infermesh-model": MODEL})
            assert r.status_code == 200, r.text
            d = engine.decisions[r.headers["x-infermesh-decision-id"]]
            assert d.route.endpoint_id == "eu-fast"
            # The backend read the whole body (its prompt count), though InferMesh saw only its start.
            assert r.json()["usage"]["prompt_tokens"] == math.ceil((200_000 + len("be brief")) / 4)
            seen = int(d.request.labels["request_body_bytes_seen"])
            assert d.request.labels["request_body"] == "partial" and 0 < seen < len(body)
            assert d.request.labels["request_body_bytes"] == str(len(body))
            assert d.request.estimated_input_tokens == math.ceil(len(body) / CHARS_PER_TOKEN)
            before = backend.stats()["requests"]
            # Without the header the model is past the cut: refused with the reason, never routed.
            r = client.post("/v1/chat/completions", content=body, headers={**TENANT, **json_type})
            assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
            # A chunked upload (no content-length) of a JSON body: its size is unknown, so 411.
            r = client.post("/v1/chat/completions", content=iter([body[:100_000], body[100_000:]]),
                            headers={**TENANT, **json_type, "x-infermesh-model": MODEL})
            assert r.status_code == 411 and r.json()["error"]["type"] == "length_required", r.text
            assert backend.stats()["requests"] == before
            assert envoy.stats("envoy_bug")["server.envoy_bug_failures"] == 0  # no route cache cleared too late
    finally:
        if extproc is not None:
            extproc.stop(0)
        backend.stop()
