"""``request_body_mode: STREAMED``: the route is chosen on the headers, and token quotas still charge the body.

Without ``send_body_without_waiting_for_header_response`` Envoy sends the request headers, waits for
the answer, lets them go upstream on it (the router picks the route then), and only then streams the
body through the picker chunk by chunk. So the decision is made before any of the body is seen: the
prompt is charged from the body's ``content-length`` (every byte a character, as for a body cut by
``BUFFERED_PARTIAL``), and a body that sent none is charged as the largest one the picker lets stream
past (``max_request_body_bytes``), and ended with 413 if it streams past that. Before, such a request
was charged 0 tokens until its outcome came, so a tenant's requests in flight could overshoot its
token quota.

Also here: the inline base64 images in a cut body's part seen are not charged as prompt text.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from decision.domain import Candidate, GuardResult, OutcomeStatus, RequestContext, Verdict
from decision.envoy_bootstrap import listener
from decision.extproc import ExtProcServicer, serve_extproc
from decision.extproc_config import ExtProcConfig
from decision.extproc_envoyrun import Backend, EnvoyProcess, ext_proc_filters, free_port, render_config
from decision.extproc_openai import (
    CHARS_PER_TOKEN,
    TOKENS_PER_IMAGE,
    inline_images,
    parse_cut_request,
    parse_request,
)
from decision.validation import MAX_TOKENS
from policies.quota import InMemoryQuotaCounters
from tests.envoy_support import MODEL, ResidencyGuard, build_fleet, make_engine, set_load

ADDR = {"eu-fast": "127.0.0.1:7001", "eu-stream": "127.0.0.1:7002", "us-stream": "127.0.0.1:7003"}
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
NONE = processing_mode_pb2.ProcessingMode.NONE
PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
HEADERS = {"x-infermesh-tenant": "acme", "x-infermesh-model": MODEL, ":path": "/v1/chat/completions"}


class TokenQuota(ResidencyGuard):
    """A tokens-per-minute quota held as the shipped quota rule holds it: each decision reserves its
    estimated tokens (prompt + ``max_tokens``) before it is judged, and keeps them while in flight."""

    QUOTA = "test.tokens"

    def __init__(self, tokens_per_min: int) -> None:
        super().__init__()
        self.limit = tokens_per_min
        self.counters = InMemoryQuotaCounters()

    @staticmethod
    def tokens(ctx: RequestContext) -> int:
        return ctx.estimated_input_tokens + ctx.expected_output_tokens

    def prefetch(self, ctx: RequestContext) -> Mapping[str, Any]:
        return {"tokens_before": self.counters.reserve(ctx.tenant, 0.0, 1, self.tokens(ctx)).tokens}

    def evaluate(self, ctx: RequestContext, candidates: Sequence[Candidate], state: Mapping[str, Any]) -> GuardResult:
        if state["tokens_before"] + self.tokens(ctx) > self.limit:
            v = Verdict(self.QUOTA, "test", "quota", False, f"{ctx.tenant} over {self.limit} tokens", self.revision)
            return GuardResult((), (v,), self.revision, quota_denied=True)
        return super().evaluate(ctx, candidates, state)

    def release(self, ctx: RequestContext, state: Mapping[str, Any]) -> None:
        self.counters.give_back(ctx.tenant, 0.0, 1, self.tokens(ctx))

    def held(self, tenant: str) -> int:
        return self.counters.read(tenant, 0.0).tokens


def _servicer(guard: ResidencyGuard | None = None, **config: Any) -> ExtProcServicer:
    return ExtProcServicer(make_engine(build_fleet(ADDR), guard or ResidencyGuard()), ExtProcConfig(**config))


def _headers(headers: Mapping[str, str], mode: int = STREAMED) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])
    # send_body_without_waiting_for_header_response left false: the header answer cannot wait for the body.
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hm),
                                protocol_config=pb.ProtocolConfiguration(request_body_mode=mode))


def _chunk(data: bytes, *, eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def _refused(reply: pb.ProcessingResponse) -> tuple[int, dict[str, Any]]:
    assert reply.WhichOneof("response") == "immediate_response", reply
    err = json.loads(reply.immediate_response.body)["error"]
    assert isinstance(err, dict)
    return int(reply.immediate_response.status.code), err


def _chat(prompt_chars: int) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "x" * prompt_chars}]}).encode()


def test_the_headers_decide_charging_the_body_by_its_content_length() -> None:
    s = _servicer()
    body = _chat(20_000)
    st = s.open_stream()
    first = _headers({**HEADERS, "content-length": str(len(body))})
    (reply,) = s.handle(st, first)
    assert reply.WhichOneof("response") == "request_headers"  # routed on the answer to the headers
    d = st.ex.decision
    assert d is not None and reply.request_headers.response.clear_route_cache
    mutation = reply.request_headers.response.header_mutation
    sets = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    assert sets["x-gateway-destination-endpoint"] == d.route.address
    whole = parse_request(body)
    assert whole is not None
    assert d.request.estimated_input_tokens == math.ceil(len(body) / CHARS_PER_TOKEN) >= whole.estimated_input_tokens
    assert d.request.expected_output_tokens == 0  # max_tokens is in the body: unknown, as if not sent
    assert {k: d.request.labels[k] for k in ("request_body", "request_body_bytes_seen", "request_body_bytes")} == {
        "request_body": "unseen", "request_body_bytes_seen": "0", "request_body_bytes": str(len(body))}
    assert not s.finished(st, first, [reply])  # the body still streams through the pick stream
    half = len(body) // 2
    assert [r.WhichOneof("response") for r in s.handle(st, _chunk(body[:half]))] == ["request_body"]
    last = _chunk(body[half:], eos=True)
    replies = s.handle(st, last)
    assert [r.WhichOneof("response") for r in replies] == ["request_body"] and s.finished(st, last, replies)


def test_in_flight_streamed_requests_cannot_overshoot_a_token_quota() -> None:
    # Before: each was charged 0 tokens at the headers, so all three were routed, 18,000 tokens of
    # prompt against a 10,000 quota, until their outcomes trued the count up.
    quota = TokenQuota(tokens_per_min=10_000)
    s = _servicer(quota)
    sized = {**HEADERS, "content-length": str(4 * 3_000)}  # 3,000 tokens of prompt each
    codes = []
    for _ in range(4):
        (reply,) = s.handle(s.open_stream(), _headers(sized))  # none of them has finished
        codes.append(200 if reply.WhichOneof("response") == "request_headers" else _refused(reply)[0])
    assert codes == [200, 200, 200, 429]
    assert quota.held("acme") == 9_000


def test_a_body_of_unknown_size_is_charged_as_the_largest_one_and_held_to_it() -> None:
    s = _servicer(max_request_body_bytes=40_000)
    st = s.open_stream()
    (reply,) = s.handle(st, _headers(HEADERS))  # chunked: no content-length
    d = st.ex.decision
    assert reply.WhichOneof("response") == "request_headers" and d is not None
    assert d.request.estimated_input_tokens == 10_000  # never 0: 40,000 bytes of prompt
    assert d.request.labels["request_body"] == "unseen" and d.request.labels["request_body_bytes"] == "unknown"
    for _ in range(4):  # up to the limit, it streams past
        assert [r.WhichOneof("response") for r in s.handle(st, _chunk(b"x" * 10_000))] == ["request_body"]
    over = _chunk(b"x")
    (cut,) = s.handle(st, over)  # one byte more than it was charged for: ended before it goes upstream
    code, err = _refused(cut)
    assert (code, err["type"], err["decision_id"]) == (413, "request_too_large", d.decision_id)
    assert "without content-length" in err["message"] and "max_request_body_bytes" in err["message"]
    assert s.finished(st, over, [cut])
    o = s.engine.outcomes[d.decision_id]  # type: ignore[attr-defined]
    assert o.status is OutcomeStatus.CANCELLED and "max_request_body_bytes" in o.error  # not the endpoint's fault
    assert d.decision_id not in s._unobserved  # no observer will come for it


def test_a_body_of_unknown_size_within_the_limit_streams_through() -> None:
    s = _servicer(max_request_body_bytes=40_000)
    st = s.open_stream()
    s.handle(st, _headers(HEADERS))
    last = _chunk(b"x" * 40_000, eos=True)
    replies = s.handle(st, last)
    assert [r.WhichOneof("response") for r in replies] == ["request_body"] and s.finished(st, last, replies)


def test_inline_mode_records_the_outcome_of_a_body_cut_for_its_size_once() -> None:
    s = _servicer(max_request_body_bytes=1_000, response_phase="inline")
    st = s.open_stream()
    s.handle(st, _headers(HEADERS))
    d = st.ex.decision
    assert d is not None and st.owner
    _refused(s.handle(st, _chunk(b"x" * 1_001))[0])
    s.close_stream(st)  # the stream ends: already reported, not again as "closed before the upstream responded"
    assert s.stats["outcomes"] == 1
    assert "max_request_body_bytes" in s.engine.outcomes[d.decision_id].error  # type: ignore[attr-defined]


def test_a_quota_that_denies_a_body_of_unknown_size_says_why() -> None:
    s = _servicer(TokenQuota(tokens_per_min=100_000))  # default limit: 16 MiB, charged 4,194,304 tokens
    (reply,) = s.handle(s.open_stream(), _headers(HEADERS))
    code, err = _refused(reply)
    assert (code, err["type"]) == (429, "quota_exceeded")
    assert "without content-length" in err["message"] and "send content-length" in err["message"]
    # The same request with its size is charged by it and routed.
    (reply,) = s.handle(s.open_stream(), _headers({**HEADERS, "content-length": "4000"}))
    assert reply.WhichOneof("response") == "request_headers"


def test_a_content_length_beyond_any_context_claims_the_most_a_request_may_not_a_400() -> None:
    s = _servicer()
    st = s.open_stream()
    s.handle(st, _headers({**HEADERS, "content-length": str(100 << 20)}))
    assert st.ex.decision is not None and st.ex.decision.request.estimated_input_tokens == MAX_TOKENS


def test_with_the_body_unseen_the_model_must_come_in_its_header() -> None:
    s = _servicer()
    (reply,) = s.handle(s.open_stream(), _headers({"x-infermesh-tenant": "acme", "content-length": "100"}))
    code, err = _refused(reply)
    assert code == 400 and "x-infermesh-model header" in err["message"] and "STREAMED" in err["message"]


def test_a_pick_filter_that_never_sends_the_body_charges_it_too() -> None:
    # request_body_mode NONE: the body goes upstream without ever passing the picker.
    s = _servicer()
    st = s.open_stream()
    s.handle(st, _headers({**HEADERS, "content-length": "4000"}, mode=NONE))
    assert st.ex.decision is not None and st.ex.decision.request.estimated_input_tokens == 1000


def test_a_bodiless_request_and_a_held_body_are_unchanged() -> None:
    s = _servicer()
    st = s.open_stream()
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in HEADERS.items()])
    s.handle(st, pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hm, end_of_stream=True),
                                      protocol_config=pb.ProtocolConfiguration(request_body_mode=STREAMED)))
    assert st.ex.decision is not None and st.ex.decision.request.estimated_input_tokens == 0
    assert "request_body" not in st.ex.decision.request.labels
    held = s.open_stream()
    assert s.handle(held, pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=hm),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=STREAMED,
                                                 send_body_without_waiting_for_header_response=True))) == []
    s.handle(held, _chunk(_chat(400), eos=True))
    d = held.ex.decision
    assert d is not None and d.request.expected_output_tokens == 32 and "request_body" not in d.request.labels


# -- inline base64 images in a cut body --

def _image_chat(image_bytes: int, text_chars: int, *, text_first: bool = False) -> tuple[bytes, int]:
    """A chat request with one inline PNG and some text; and the length of the image's data URL."""
    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\x00" * (image_bytes - 4)).decode()
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}},
                                   {"type": "text", "text": "y" * text_chars}]
    doc = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": parts[::-1] if text_first
                                                            else parts}]}
    return json.dumps(doc).encode(), len(url)


def _cut_exchange(s: ExtProcServicer, body: bytes, seen: int | None) -> RequestContext:
    """The request Envoy's BUFFERED_PARTIAL mode has decided on: ``body`` cut at ``seen`` (None: whole)."""
    st = s.open_stream()
    s.handle(st, _headers({**HEADERS, "content-length": str(len(body))}, mode=PARTIAL))
    (reply,) = s.handle(st, _chunk(body[:seen]) if seen is not None else _chunk(body, eos=True))
    assert reply.WhichOneof("response") == "request_body", reply
    assert st.ex.decision is not None
    return st.ex.decision.request


def test_an_inline_image_in_the_part_seen_is_charged_as_an_image_not_as_prompt_text() -> None:
    body, url_len = _image_chat(300_000, 40_000)
    whole = parse_request(body)
    assert whole is not None and whole.estimated_input_tokens == 10_000 + 4 + TOKENS_PER_IMAGE and whole.images == 1
    ctx = _cut_exchange(_servicer(), body, 16_384)  # the cut falls in the image
    assert ctx.estimated_input_tokens == math.ceil(
        (len(body) - (16_384 - body.index(b"data:image"))) / CHARS_PER_TOKEN) + TOKENS_PER_IMAGE
    assert ctx.labels["request_body_image_bytes"] == str(16_384 - body.index(b"data:image"))
    assert ctx.labels["request_images"] == "1"
    ctx = _cut_exchange(_servicer(), body, len(body) - 30_000)  # the whole image seen, most of the text not
    assert ctx.estimated_input_tokens == math.ceil((len(body) - url_len) / CHARS_PER_TOKEN) + TOKENS_PER_IMAGE
    assert whole.estimated_input_tokens <= ctx.estimated_input_tokens < whole.estimated_input_tokens + 100
    # Before, the image's 400,000 base64 characters were charged as 100,000 tokens of prompt.


def test_image_parts_are_charged_per_image_in_each_api() -> None:
    # Chat completions (by URL or inline), the Responses API (input_image in a message, or as an input
    # item), and a message of text only for comparison; an image counts whatever its size.
    chat = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x" * 400}, {"type": "image_url", "image_url": {"url": "https://img/1.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    r = parse_request(json.dumps(chat).encode())
    assert r is not None and (r.images, r.estimated_input_tokens) == (2, 100 + 4 + 2 * TOKENS_PER_IMAGE)
    responses = {"model": MODEL, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "x" * 40},
                                     {"type": "input_image", "image_url": "https://img/2.png"}]},
        {"type": "input_image", "image_url": "https://img/3.png"}, "y" * 40]}
    r = parse_request(json.dumps(responses).encode())
    assert r is not None and (r.images, r.estimated_input_tokens) == (2, 20 + 2 * TOKENS_PER_IMAGE)
    nested = {"model": MODEL, "input": [["abcd", "efgh"], {"type": "input_text", "text": "x" * 8}]}
    r = parse_request(json.dumps(nested).encode())  # a list of parts, and a part as an input item
    assert r is not None and (r.images, r.estimated_input_tokens) == (0, 4)
    text_only = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 400}]}
    r = parse_request(json.dumps(text_only).encode())
    assert r is not None and (r.images, r.estimated_input_tokens) == (0, 104)
    # Through the picker, the whole body in one message: the request's estimate, and a label for the trace.
    ctx = _cut_exchange(_servicer(), json.dumps(chat).encode(), None)
    assert ctx.estimated_input_tokens == 100 + 4 + 2 * TOKENS_PER_IMAGE and ctx.labels["request_images"] == "2"


def test_an_image_past_the_cut_and_text_that_quotes_a_data_url_are_still_charged() -> None:
    body, _ = _image_chat(300_000, 40_000, text_first=True)
    ctx = _cut_exchange(_servicer(), body, 16_384)  # only text seen: the image cannot be told from text
    assert ctx.estimated_input_tokens == math.ceil(len(body) / CHARS_PER_TOKEN)
    assert "request_body_image_bytes" not in ctx.labels
    # A data URL written in a text part is text the model reads: charged.
    quoted = json.dumps({"url": "data:image/png;base64," + "A" * 1000})
    text = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": quoted * 20}]})
    assert inline_images(text) == (0, 0)
    r = parse_cut_request(text.encode()[:5000], len(text))
    assert r is not None and r.estimated_input_tokens == math.ceil(len(text) / CHARS_PER_TOKEN) and not r.image_bytes


def test_inline_images_are_found_in_each_encoding_and_form() -> None:
    body, url_len = _image_chat(30_000, 1000)  # cut in the text after the image
    for enc, width in (("utf-8", 1), ("utf-16", 2), ("utf-32-le", 4)):
        encoded = body.decode().encode(enc)
        r = parse_cut_request(encoded[:len(encoded) - 200 * width], len(encoded))
        assert r is not None and r.image_bytes == url_len * width, enc
    # The Responses API's input_image, and a writer that escapes "/" as "\/".
    resp = '{"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", ' \
           '"image_url": "data:image/jpeg;base64,/9j/' + "Q" * 5000 + '"}]}], "x": "'
    assert inline_images(resp) == (len("data:image/jpeg;base64,/9j/") + 5000, 1)
    assert inline_images(resp.replace("/9j/", "\\/9j\\/")) == (len("data:image/jpeg;base64,\\/9j\\/") + 5000, 1)
    # Not an image: a data URL of another type, or one that is not base64.
    assert inline_images(resp.replace("image/jpeg", "application/pdf")) == (0, 0)
    assert inline_images(resp.replace("QQQQ", "Q Q!", 1)) == (0, 0)


# -- through a real Envoy 1.40 with STREAMED request bodies --

@pytest.mark.envoy
def test_streamed_bodies_are_charged_through_a_real_envoy() -> None:
    backend = Backend("eu-fast", streaming=False)
    extproc = None
    try:
        engine = make_engine(build_fleet({**ADDR, "eu-fast": backend.address}), ResidencyGuard())
        set_load(engine, {"eu-fast": 0.0, "eu-stream": 500.0, "us-stream": 500.0})  # only eu-fast listens
        extproc = serve_extproc(engine, ExtProcConfig(max_request_body_bytes=64 << 10),
                                address="127.0.0.1:0", max_streams=8)
        listen, admin = free_port(), free_port()
        cfg = render_config(listen_port=listen, admin_port=admin, extproc_port=extproc.port)
        ext_proc_filters(listener(cfg, "inference"))[0]["processing_mode"]["request_body_mode"] = "STREAMED"
        with EnvoyProcess(cfg, admin) as envoy, \
                httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10.0) as client:
            headers = {**HEADERS, "content-type": "application/json"}
            del headers[":path"]
            body = _chat(40_000)
            r = client.post("/v1/chat/completions", content=body, headers=headers)
            assert r.status_code == 200, r.text
            d = engine.decisions[r.headers["x-infermesh-decision-id"]]
            assert d.route.endpoint_id == "eu-fast" and d.request.labels["request_body"] == "unseen"
            assert d.request.labels["request_body_bytes"] == str(len(body))  # Envoy passes content-length on
            assert d.request.estimated_input_tokens == math.ceil(len(body) / CHARS_PER_TOKEN)
            assert r.json()["usage"]["prompt_tokens"] == 10_000  # the backend got the whole body

            def chunked(total: int) -> Iterator[bytes]:
                doc = _chat(total - len(_chat(0)))
                yield from (doc[i:i + 8192] for i in range(0, len(doc), 8192))

            r = client.post("/v1/chat/completions", content=chunked(60_000), headers=headers)
            assert r.status_code == 200, r.text
            d = engine.decisions[r.headers["x-infermesh-decision-id"]]
            assert d.request.labels["request_body_bytes"] == "unknown"
            assert d.request.estimated_input_tokens == (64 << 10) // 4
            r = client.post("/v1/chat/completions", content=chunked(200_000), headers=headers)
            assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
            did = r.json()["error"]["decision_id"]
            assert engine.outcomes[did].status is OutcomeStatus.CANCELLED
            assert envoy.stats("envoy_bug")["server.envoy_bug_failures"] == 0
    finally:
        if extproc is not None:
            extproc.stop(0)
        backend.stop()

