"""Fuzzing every RPC's request message and the HTTP API: ~10,000 random or malformed inputs in all.

No input may crash the service, end in INTERNAL/UNKNOWN/UNAVAILABLE (or HTTP 5xx), and every error
names its field (or, for guardrail denials, its rules). The RPCs are called in-process through the
same edge interceptor and servicer a real server uses (bytes in, status out); a smaller run goes
through a real server. Seeds are fixed (``derandomize``), so a failure reproduces.

Inputs per test (``max_examples``): Decide 1,700 structured + 1,000 malformed, ReportOutcome 1,500,
Explain 1,000, PushTelemetry 1,500, ReloadPolicies 500, real server 300, HTTP API 2,500: 10,000.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit import database, keys
from audit.api import build_router
from audit.repository import AuditRepository
from decision.http import create_app
from decision.metrics import ServiceMetrics
from infermesh.decision.v1 import decision_pb2 as pb
from tests.test_prod_support import Aborted, FakeContext, InProcessEdge, servicer_for

FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED}


class _NoTraces:
    def get_decision(self, decision_id: str) -> None:
        return None


@pytest.fixture(scope="module")
def edge() -> Iterator[InProcessEdge]:
    service, servicer = servicer_for()
    service.engine.traces = _NoTraces()  # Explain and late outcomes look decisions up in the audit log
    yield InProcessEdge(servicer)
    service.stop(0)  # its threads (the policy watcher...) must not outlive the module


def check(call: Callable[[FakeContext], Any]) -> Any:
    """Run one call; an error must be an allowed status that names its field or rules."""
    ctx = FakeContext()
    try:
        return call(ctx)
    except Aborted as exc:
        assert exc.code in ALLOWED, f"{exc.code.name}: {exc.details}"
        assert exc.details
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            field = ctx.trailers.get("infermesh-field", "")
            assert field and exc.details.startswith(f"{field}: "), (exc.details, ctx.trailers)
        elif exc.code == grpc.StatusCode.NOT_FOUND:
            assert ctx.trailers.get("infermesh-field"), exc.details
        else:
            assert "infermesh-rules" in ctx.trailers, exc.details
        return exc


# -- strategies ---------------------------------------------------------------------------------
text = st.text(max_size=40)
wild_text = st.one_of(text, st.text(max_size=400), st.sampled_from(["", " ", "\x00", "é" * 300, "../../etc"]))
floats = st.floats(allow_nan=True, allow_infinity=True)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FAMILIES = ["llama", "mistral", "qwen", "sdxl", "llava"]
MODELS = ["llama-3.1-8b", "llama-3.1-70b", "mixtral-8x7b"]


@st.composite
def decide_requests(draw: st.DrawFn) -> bytes:
    m = pb.DecideRequest(
        request_id=draw(st.one_of(st.just("r1"), wild_text)), tenant=draw(st.one_of(st.just("acme"), wild_text)),
        user_tier=draw(st.one_of(st.sampled_from(["free", "standard", "premium"]), text)),
        model=draw(st.one_of(st.just(""), st.sampled_from(MODELS), text)),
        model_family=draw(st.one_of(st.sampled_from(FAMILIES), wild_text)),
        modality=draw(st.one_of(st.sampled_from(["", "text", "image", "multimodal"]), text)),
        prompt_class=draw(text), estimated_input_tokens=draw(int64), expected_output_tokens=draw(int64),
        allowed_jurisdictions=draw(st.lists(st.one_of(st.sampled_from(["EU", "US", ""]), text), max_size=40)),
        data_class=draw(text), client_region=draw(st.one_of(st.sampled_from(["eu-west", "us-east", ""]), text)),
        session_id=draw(text), ttft_target_ms=draw(floats), max_cost_per_1k_tokens=draw(floats),
        labels=draw(st.dictionaries(wild_text, wild_text, max_size=70)))
    return m.SerializeToString()


@st.composite
def outcomes(draw: st.DrawFn) -> bytes:
    return pb.Outcome(decision_id=draw(wild_text), status=cast(Any, draw(st.integers(-5, 10))), ttft_ms=draw(floats),
                      latency_ms=draw(floats), input_tokens=draw(int64), output_tokens=draw(int64),
                      error=draw(st.one_of(text, st.text(min_size=4000, max_size=5000)))).SerializeToString()


@st.composite
def telemetry_batches(draw: st.DrawFn) -> list[bytes]:
    metric = st.one_of(st.sampled_from(["DCGM_FI_DEV_GPU_TEMP", "vllm:num_requests_waiting",
                                        "nv_inference_pending_request_count"]), text)
    sample = st.builds(pb.TelemetrySample, endpoint_id=wild_text, node_id=text, metric=metric, value=floats,
                       timestamp_unix_ms=int64)
    expo_text = st.one_of(text, st.just('vllm:num_requests_waiting{model_name="x"} 3\n'),
                          st.text(alphabet="abc{}=\"# \n0123456789.e+-", max_size=200))
    expo = st.builds(pb.Exposition, endpoint_id=text, node_id=text, text=expo_text, scraped_at_unix_ms=int64)
    batch = st.builds(pb.TelemetryBatch, samples=st.lists(sample, max_size=5), expositions=st.lists(expo, max_size=3))
    return [b.SerializeToString() for b in draw(st.lists(batch, max_size=3))]


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Raw bytes, and valid messages with bytes flipped, cut or appended."""
    def mutate(data: bytes, pos: int, junk: bytes, cut: bool) -> bytes:
        if not data:
            return junk
        p = pos % len(data)
        return data[:p] if cut else data[:p] + junk + data[p + len(junk):]
    return st.one_of(st.binary(max_size=300),
                     st.builds(mutate, valid, st.integers(0, 10_000), st.binary(min_size=1, max_size=8), st.booleans()))


# -- the RPCs, in-process through the edge ---------------------------------------------------------
@settings(FUZZ, max_examples=1700)
@given(payload=decide_requests())
def test_fuzz_decide_fields(edge: InProcessEdge, payload: bytes) -> None:
    check(lambda ctx: edge.call("Decide", payload, ctx))


@settings(FUZZ, max_examples=1000)
@given(payload=mutated(decide_requests()))
def test_fuzz_decide_malformed(edge: InProcessEdge, payload: bytes) -> None:
    check(lambda ctx: edge.call("Decide", payload, ctx))


@settings(FUZZ, max_examples=1500)
@given(payload=st.one_of(outcomes(), mutated(outcomes())))
def test_fuzz_report_outcome(edge: InProcessEdge, payload: bytes) -> None:
    check(lambda ctx: edge.call("ReportOutcome", payload, ctx))


@settings(FUZZ, max_examples=1000)
@given(payload=st.one_of(st.builds(lambda d: pb.ExplainRequest(decision_id=d).SerializeToString(), wild_text),
                         st.binary(max_size=200)))
def test_fuzz_explain(edge: InProcessEdge, payload: bytes) -> None:
    check(lambda ctx: edge.call("Explain", payload, ctx))


@settings(FUZZ, max_examples=1500)
@given(batches=st.one_of(telemetry_batches(), st.lists(st.binary(max_size=120), max_size=3)))
def test_fuzz_push_telemetry(edge: InProcessEdge, batches: list[bytes]) -> None:
    check(lambda ctx: edge.call("PushTelemetry", batches, ctx))


@settings(FUZZ, max_examples=500)
@given(payload=st.binary(max_size=100))
def test_fuzz_reload_policies(edge: InProcessEdge, payload: bytes) -> None:
    out = check(lambda ctx: edge.call("ReloadPolicies", payload, ctx))
    assert isinstance(out, pb.ReloadPoliciesResponse) or out.code == grpc.StatusCode.INVALID_ARGUMENT


# -- a smaller run through a real server ----------------------------------------------------------
@pytest.fixture(scope="module")
def real_channel() -> Iterator[grpc.Channel]:
    from decision.config import Settings
    from decision.service import Service
    from tests.test_prod_support import demo_config

    service = Service(demo_config(), Settings(), audit_enabled=False)
    port = service.start_grpc(0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    service.stop(0)


@settings(FUZZ, max_examples=300)
# ReloadPolicies recompiles and tests the whole bundle on each call: fuzzed in-process only.
@given(method=st.sampled_from(["Decide", "ReportOutcome", "Explain"]),
       payload=st.one_of(decide_requests(), outcomes(), st.binary(max_size=200)))
def test_fuzz_real_server(real_channel: grpc.Channel, method: str, payload: bytes) -> None:
    call = real_channel.unary_unary(f"/infermesh.decision.v1.DecisionService/{method}")
    try:
        call(payload, timeout=10)
    except grpc.RpcError as exc:
        # Explain without an audit log is UNAVAILABLE by contract.
        ok = ALLOWED | ({grpc.StatusCode.UNAVAILABLE} if method == "Explain" else set())
        assert exc.code() in ok, f"{method}: {exc.code().name}: {exc.details()}"
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert exc.details().startswith(dict(exc.trailing_metadata())["infermesh-field"] + ": ")


# -- the HTTP API ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(pg_url: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    database.prepare(pg_url)
    repo = AuditRepository(pg_url)
    with repo.pool.connection() as conn:
        secrets = {"auditor": keys.create_key(conn, name="fuzz-a", role="auditor"),
                   "admin": keys.create_key(conn, name="fuzz-b", role="admin"),
                   "tenant": keys.create_key(conn, name="fuzz-c", role="auditor", tenant="acme")}
    # The service's audit integration mounts the router without ``reload`` (POST /v1/admin/reload is then a
    # deliberate 501); here it is wired, so every route answers as it would in a complete deployment.
    app = create_app(ServiceMetrics(), lambda: {"status": "ok"}, (build_router(repo, reload=lambda: "fuzz-rev"),))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, secrets
    repo.close()


PATHS = ["/v1/decisions", "/v1/decisions/{id}", "/v1/decisions/{id}/why", "/v1/export", "/v1/stats",
         "/v1/admin/retention", "/v1/admin/reload", "/healthz", "/metrics", "/audit", "/{id}"]
PARAMS = ["from", "to", "tenant", "region", "site", "tier", "model", "endpoint", "rule", "status", "outcome",
          "cursor", "limit", "format", "trace"]
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), text),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(text, c, max_size=3)),
                           max_leaves=8)


@settings(FUZZ, max_examples=2500)
@given(method=st.sampled_from(["GET", "GET", "POST", "DELETE"]), path=st.sampled_from(PATHS),
       pid=st.one_of(st.from_regex(r"\A[0-9a-f\-]{1,40}\Z"), text), who=st.sampled_from(["", "auditor", "admin",
                                                                                        "tenant", "junk"]),
       params=st.dictionaries(st.one_of(st.sampled_from(PARAMS), text), st.one_of(text, st.just("2025-01-01")),
                              max_size=5),
       body=st.one_of(st.none(), json_values, st.binary(max_size=50)))
def test_fuzz_http_api(http: tuple[TestClient, dict[str, str]], method: str, path: str, pid: str, who: str,
                       params: dict[str, str], body: Any) -> None:
    client, secrets = http
    url = path.replace("{id}", urllib.parse.quote(pid, safe="")) or "/"
    headers = {"authorization": f"Bearer {secrets[who]}"} if who in secrets else (
        {"x-api-key": "imk_nope"} if who == "junk" else {})
    kwargs: dict[str, Any] = {"params": params, "headers": headers}
    if isinstance(body, bytes):
        kwargs["content"] = body
    elif body is not None:
        kwargs["content"] = json.dumps(body)
        headers["content-type"] = "application/json"
    r = client.request(method, url, **kwargs)
    assert r.status_code < 500, (method, url, params, r.status_code, r.text[:300])
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        detail = r.json().get("detail")
        assert detail, r.text
        if r.status_code == 422 and isinstance(detail, list):
            assert all(d.get("loc") for d in detail), detail  # each validation error names its field

