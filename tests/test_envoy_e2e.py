"""End to end through a real Envoy 1.40: InferMesh picks, Envoy routes, outcomes come back.

Envoy runs the shipped ``deploy/envoy/envoy.yaml`` (only ports changed), in front of three local
OpenAI-compatible backends whose addresses are the test fleet's deployment addresses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decision.domain import Outcome, OutcomeStatus
from decision.extproc import EXTPROC_SERVICE, RunningExtProc, serve_extproc
from decision.extproc_envoyrun import Backend, EnvoyProcess, free_port, render_config
from tests.envoy_support import BACKENDS, MODEL, RecordingEngine, ResidencyGuard, build_fleet, make_engine, set_load

pytestmark = pytest.mark.envoy

EU_TENANT = {"x-infermesh-tenant": "acme", "x-infermesh-allowed-jurisdictions": "EU"}


@dataclass
class Stack:
    backends: dict[str, Backend]
    engine: RecordingEngine
    extproc: RunningExtProc
    envoy: EnvoyProcess
    client: httpx.Client

    def counts(self) -> dict[str, int]:
        return {n: int(b.stats()["requests"]) for n, b in self.backends.items()}

    def chat(self, headers: dict[str, str], **body: Any) -> httpx.Response:
        doc = {"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "hello " * 40}], **body}
        return self.client.post("/v1/chat/completions", json=doc, headers=headers)

    def outcome(self, decision_id: str, timeout_s: float = 5.0) -> Outcome:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            o = self.engine.outcomes.get(decision_id)
            if o is not None:
                return o  # type: ignore[no-any-return]
            time.sleep(0.01)
        raise AssertionError(f"no outcome recorded for {decision_id}; stats {self.extproc.servicer.stats}")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    backends: dict[str, Backend] = {}
    try:
        for b in BACKENDS:
            backends[b.name] = Backend(b.name, ttft_ms=b.ttft_ms, token_ms=b.token_ms, streaming=b.streaming)
        engine = make_engine(build_fleet({n: b.address for n, b in backends.items()}),
                             ResidencyGuard(over_quota=["greedy"]))
        extproc = serve_extproc(engine, address="127.0.0.1:0", max_streams=64)
        listen, admin = free_port(), free_port()
        envoy = EnvoyProcess(render_config(listen_port=listen, admin_port=admin, extproc_port=extproc.port),
                             admin).start()
        with httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10.0) as client:
            yield Stack(backends, engine, extproc, envoy, client)
        envoy.stop()
        extproc.stop(0)
    finally:
        for be in backends.values():
            be.stop()


@pytest.fixture(autouse=True)
def _idle(stack: Stack) -> None:
    set_load(stack.engine, {b.name: 0.0 for b in BACKENDS})


def test_requests_land_where_the_decision_said(stack: Stack) -> None:
    seen: set[str] = set()
    for target in ("eu-fast", "eu-stream", "us-stream", "eu-fast"):
        # Make every other endpoint look busy, so the least-TTFT choice is `target`.
        set_load(stack.engine, {b.name: (0.0 if b.name == target else 500.0) for b in BACKENDS})
        before = stack.counts()
        r = stack.chat({"x-infermesh-tenant": "acme"}, stream=target != "eu-fast")
        assert r.status_code == 200, r.text
        decision = stack.engine.decisions[r.headers["x-infermesh-decision-id"]]
        assert decision.route.endpoint_id == target
        assert r.headers["x-backend-name"] == target
        after = stack.counts()
        assert {n: after[n] - before[n] for n in after} == {n: int(n == target) for n in after}
        # The backend saw the destination header and decision id InferMesh set.
        last = stack.backends[target].stats()["last_headers"]
        assert last["x-gateway-destination-endpoint"] == stack.backends[target].address
        assert last["x-infermesh-decision-id"] == decision.decision_id
        seen.add(target)
    assert seen == {"eu-fast", "eu-stream", "us-stream"}


def test_residency_restricted_tenant_never_reaches_a_forbidden_backend(stack: Stack) -> None:
    set_load(stack.engine, {"eu-fast": 300.0, "eu-stream": 300.0, "us-stream": 0.0})  # US looks best
    before = stack.counts()
    for i in range(12):
        r = stack.chat(EU_TENANT, stream=i % 2 == 0)
        assert r.status_code == 200, r.text
        assert r.headers["x-backend-name"] in ("eu-fast", "eu-stream")
    after = stack.counts()
    assert after["us-stream"] == before["us-stream"]
    assert sum(after.values()) - sum(before.values()) == 12
    # Without the restriction the same load sends the tenant to the US.
    r = stack.chat({"x-infermesh-tenant": "acme"}, stream=True)
    assert r.headers["x-backend-name"] == "us-stream"


def test_spoofed_destination_header_is_overwritten(stack: Stack) -> None:
    us = stack.backends["us-stream"]
    before = stack.counts()
    r = stack.chat({**EU_TENANT, "x-gateway-destination-endpoint": us.address,
                    "x-infermesh-decision-id": "forged"})
    assert r.status_code == 200, r.text
    assert r.headers["x-backend-name"] != "us-stream"
    assert stack.counts()["us-stream"] == before["us-stream"]
    did = r.headers["x-infermesh-decision-id"]
    assert did != "forged" and did in stack.engine.decisions


def test_streaming_outcome_has_ttft_and_usage_tokens(stack: Stack) -> None:
    set_load(stack.engine, {"eu-fast": 500.0, "us-stream": 500.0})  # eu-stream: 15 ms TTFT, 2 ms/token
    r = stack.chat(EU_TENANT, stream=True, stream_options={"include_usage": True}, max_tokens=10)
    assert r.status_code == 200 and r.headers["x-backend-name"] == "eu-stream"
    usage_line = [ln for ln in r.text.splitlines() if '"usage"' in ln][-1]
    assert '"prompt_tokens": 60' in usage_line and '"completion_tokens": 10' in usage_line
    o = stack.outcome(r.headers["x-infermesh-decision-id"])
    assert o.status is OutcomeStatus.OK
    assert (o.input_tokens, o.output_tokens) == (60, 10)
    # First token after the backend's 15 ms; the last of 10 tokens at least 9 x 2 ms later.
    assert 15.0 <= o.ttft_ms < 1000.0
    assert o.latency_ms >= o.ttft_ms + 18.0


def test_json_outcome_and_sse_without_usage(stack: Stack) -> None:
    set_load(stack.engine, {"eu-stream": 500.0, "us-stream": 500.0})
    r = stack.chat(EU_TENANT, max_tokens=4)
    assert r.headers["x-backend-name"] == "eu-fast"
    o = stack.outcome(r.headers["x-infermesh-decision-id"])
    assert o.status is OutcomeStatus.OK and (o.input_tokens, o.output_tokens) == (60, 4)
    assert o.ttft_ms >= 2.0
    set_load(stack.engine, {"eu-fast": 500.0, "eu-stream": 0.0, "us-stream": 500.0})
    r = stack.chat(EU_TENANT, stream=True, max_tokens=5)  # no include_usage: chunks are counted
    assert r.headers["x-backend-name"] == "eu-stream"
    o = stack.outcome(r.headers["x-infermesh-decision-id"])
    assert o.output_tokens == 5 and o.input_tokens == 60 + 4  # the request's own estimate


def test_upstream_error_is_recorded_as_error(stack: Stack) -> None:
    r = stack.chat(EU_TENANT, fail_with=500)
    assert r.status_code == 500
    o = stack.outcome(r.headers["x-infermesh-decision-id"])
    assert o.status is OutcomeStatus.ERROR and o.error == "HTTP 500"


def test_no_allowed_endpoint_is_503_naming_the_rules(stack: Stack) -> None:
    before = stack.counts()
    r = stack.chat({"x-infermesh-tenant": "acme", "x-infermesh-allowed-jurisdictions": "APAC"})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["type"] == "no_candidate" and err["rules"] == ["test.residency"]
    assert r.headers["x-infermesh-decision-id"] == err["decision_id"]
    assert stack.counts() == before


def test_quota_is_429(stack: Stack) -> None:
    before = stack.counts()
    r = stack.chat({"x-infermesh-tenant": "greedy"})
    assert r.status_code == 429 and r.json()["error"]["rules"] == ["test.quota"]
    assert stack.counts() == before


def test_bad_requests_are_4xx(stack: Stack) -> None:
    assert stack.chat({}).status_code == 400  # no tenant header
    assert stack.chat({"x-infermesh-tenant": "acme"}, model="no-such-model").status_code == 404


def test_grpc_health_for_the_ext_proc_service(stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.extproc.port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=EXTPROC_SERVICE),
                                                    timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("fail_open", [False, True])
def test_processor_down_never_reaches_a_backend(stack: Stack, fail_open: bool) -> None:
    """Fail-closed (shipped): a 503 from the ext_proc filter. Fail-open: the request continues
    unpicked, and the client-supplied destination header was stripped, so it routes nowhere."""
    dead = free_port()  # nothing listens there
    listen, admin = free_port(), free_port()
    cfg = render_config(listen_port=listen, admin_port=admin, extproc_port=dead,
                        failure_mode_allow=fail_open or None)
    before = stack.counts()
    with EnvoyProcess(cfg, admin) as envoy, httpx.Client(base_url=f"http://127.0.0.1:{listen}") as c:
        for target in stack.backends.values():
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": []},
                       headers={"x-infermesh-tenant": "acme", "x-gateway-destination-endpoint": target.address})
            assert r.status_code == 503
            assert "x-backend-name" not in r.headers
            if fail_open:
                assert r.json()["error"]["type"] == "no_endpoint_picked"
        ext = envoy.stats("ext_proc")
    assert stack.counts() == before
    assert sum(v for k, v in ext.items() if k.endswith("streams_failed") or k.endswith("failure_mode_allowed")) >= 3


def test_unreachable_endpoint_is_recorded_as_an_error() -> None:
    """Envoy's own 503 (connect failure) still reaches the observer, so the learner hears of it."""
    dead = f"127.0.0.1:{free_port()}"
    engine = make_engine(build_fleet({"eu-fast": dead, "eu-stream": "127.0.0.1:1", "us-stream": "127.0.0.1:2"}),
                         ResidencyGuard())
    set_load(engine, {"eu-stream": 500.0, "us-stream": 500.0})
    extproc = serve_extproc(engine, address="127.0.0.1:0", max_streams=8)
    listen, admin = free_port(), free_port()
    try:
        with EnvoyProcess(render_config(listen_port=listen, admin_port=admin, extproc_port=extproc.port), admin):
            r = httpx.post(f"http://127.0.0.1:{listen}/v1/chat/completions", timeout=10.0,
                           json={"model": MODEL, "messages": []}, headers={"x-infermesh-tenant": "acme"})
            assert r.status_code == 503
            did = r.headers["x-infermesh-decision-id"]
            assert engine.decisions[did].route.address == dead
            deadline = time.monotonic() + 5
            while did not in engine.outcomes and time.monotonic() < deadline:
                time.sleep(0.01)
        o = engine.outcomes[did]
        assert o.status is OutcomeStatus.ERROR and o.error == "HTTP 503"
    finally:
        extproc.stop(0)
