"""The gRPC edge on a real Service: malformed bytes, deadlines, limits, message size, TLS and mTLS."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from decision import tracing
from decision.config import Settings
from decision.logging_json import JsonFormatter
from decision.service import Service
from decision.tls import TlsConfig, channel_credentials
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc
from tests.test_prod_support import (
    Aborted,
    FakeContext,
    InProcessEdge,
    demo_config,
    issue_cert,
    make_ca,
    servicer_for,
)

GOOD: dict[str, Any] = {"request_id": "r1", "tenant": "acme", "model_family": "llama", "client_region": "eu-west"}
Served = tuple[Service, grpc.Channel]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


KINDS = ["asyncio", "split"]  # the server kinds a service may be configured with (threads: tests/test_grpc.py)


@pytest.fixture(scope="module", params=KINDS)
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Service, grpc.Channel]]:
    cfg = demo_config()
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"max_message_bytes": 64 * 1024,
                                                                          "kind": request.param})})
    service = Service(cfg, Settings(), audit_enabled=False)
    port = service.start_grpc(0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, channel
    finally:
        channel.close()
        service.stop(0)


def _raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.RpcError:
    call = channel.unary_unary(f"/infermesh.decision.v1.DecisionService/{method}",
                               request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        call(payload, timeout=5)
    return err.value


@pytest.mark.parametrize("method", ["Decide", "ReportOutcome", "Explain", "ReloadPolicies"])
def test_bytes_that_do_not_parse_are_invalid_argument_naming_the_request(served: Served, method: str) -> None:
    _, channel = served
    err = _raw(channel, method, b"\xff\xff\xff\xff\x0f")  # a truncated varint field key
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details().startswith("request: cannot be parsed as infermesh.decision.v1.")
    assert dict(err.trailing_metadata())["infermesh-field"] == "request"


def test_malformed_telemetry_stream_message_names_its_position(served: Served) -> None:
    _, channel = served
    call = channel.stream_unary("/infermesh.decision.v1.DecisionService/PushTelemetry",
                                request_serializer=None, response_deserializer=None)
    ok = pb.TelemetryBatch().SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        call(iter([ok, b"\x0a\x05abc"]), timeout=5)  # a length-delimited field that runs past the end
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("batch[1]: cannot be parsed")


def test_message_over_the_size_limit_is_refused(served: Served) -> None:
    _, channel = served
    req = pb.DecideRequest(**GOOD, labels={"blob": "x" * (70 * 1024)})
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.DecisionServiceStub(channel).Decide(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(("update", "field"), [
    ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
    ({"labels": {"k": "v" * 300}}, "labels['k']"),
    ({"allowed_jurisdictions": ["EU"] * 33}, "allowed_jurisdictions"),
    ({"model_family": "m" * 257}, "model_family"),
])
def test_request_limits_name_the_field(served: Served, update: dict[str, Any], field: str) -> None:
    service, channel = served
    assert service.engine is not None
    before = service.engine.stats["decisions"]
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.DecisionServiceStub(channel).Decide(pb.DecideRequest(**{**GOOD, **update}), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")
    assert dict(err.value.trailing_metadata())["infermesh-field"] == field
    assert service.engine.stats["decisions"] == before


def test_non_finite_outcome_times_are_refused_before_they_reach_the_learner(served: Served) -> None:
    _, channel = served
    stub = pb_grpc.DecisionServiceStub(channel)
    d = stub.Decide(pb.DecideRequest(**GOOD), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        stub.ReportOutcome(pb.Outcome(decision_id=d.decision_id, ttft_ms=float("nan")), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("ttft_ms: ")


def test_a_request_whose_deadline_has_passed_is_not_decided() -> None:
    service, servicer = servicer_for()
    try:
        _deadline_checks(service, InProcessEdge(servicer))
    finally:
        service.stop(0)


def _deadline_checks(service: Service, edge: InProcessEdge) -> None:
    assert service.engine is not None
    payload = pb.DecideRequest(**GOOD).SerializeToString()
    with pytest.raises(Aborted) as err:
        edge.call("Decide", payload, FakeContext(remaining=0.0))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.value.details.startswith("deadline: ")
    assert service.engine.stats["decisions"] == 0
    assert edge.call("Decide", payload, FakeContext(remaining=1.0)).decision_id  # with time left it decides
    assert service.engine.stats["decisions"] == 1
    with pytest.raises(Aborted) as err:  # a caller that cancelled while it was decided: not booked
        edge.call("Decide", payload, FakeContext(remaining=1.0, active=False))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "caller went away" in err.value.details
    assert service.engine.stats["decisions"] == 1 and service.engine.pending_outcomes() == 1


def test_traceparent_from_grpc_metadata_continues_the_callers_trace(served: Served,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    _, channel = served
    exporter = InMemorySpanExporter()
    tracing.use_exporter(exporter)
    try:
        with caplog.at_level(logging.DEBUG, logger="infermesh.rpc"):
            d = pb_grpc.DecisionServiceStub(channel).Decide(pb.DecideRequest(**GOOD), timeout=5,
                                                          metadata=(("traceparent", TRACEPARENT),))
    finally:
        tracing.stop_recording()
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("/Decide")]
    assert len(spans) == 1
    span = spans[0]
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes is not None and span.attributes["infermesh.decision_id"] == d.decision_id
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "infermesh.rpc"]
    assert any(x.get("decision_id") == d.decision_id and x.get("trace_id") == "4bf92f3577b34da6a3ce929d0e0e4736"
               for x in lines), lines


def test_trace_id_reaches_the_logs_even_with_the_exporter_off(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    _, channel = served
    assert not tracing.enabled()
    with caplog.at_level(logging.DEBUG, logger="infermesh.rpc"):
        pb_grpc.DecisionServiceStub(channel).Decide(pb.DecideRequest(**GOOD), timeout=5,
                                                    metadata=(("traceparent", TRACEPARENT),))
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "infermesh.rpc"]
    assert lines and lines[-1]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and lines[-1]["decision_id"]


def test_traceparent_from_http_headers_continues_the_callers_trace(served: Served) -> None:
    from fastapi.testclient import TestClient

    from decision.http import create_app

    service, _ = served
    exporter = InMemorySpanExporter()
    tracing.use_exporter(exporter)
    try:
        with TestClient(create_app(service.metrics, service.health)) as client:
            assert client.get("/healthz", headers={"traceparent": TRACEPARENT}).status_code == 200
    finally:
        tracing.stop_recording()
    span = next(s for s in exporter.get_finished_spans() if s.name == "HTTP GET /healthz")
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 200


# -- TLS and mutual TLS --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = make_ca(d, "ca")
    _, rogue_cert, rogue_key = make_ca(d, "rogue-ca")
    server_cert, server_key = issue_cert(d, ca_cert, ca_key, "server", server=True)
    client_cert, client_key = issue_cert(d, ca_cert, ca_key, "client", server=False)
    rogue_client, rogue_client_key = issue_cert(d, rogue_cert, rogue_key, "intruder", server=False)
    return {"dir": d, "ca": ca, "server_cert": server_cert, "server_key": server_key, "client_cert": client_cert,
            "client_key": client_key, "rogue_cert": rogue_client, "rogue_key": rogue_client_key}


def _tls_service(pki: dict[str, Path], *, mutual: bool, kind: str) -> tuple[Service, int]:
    # Relative file names, as a config file next to its certificates would have them.
    tls = TlsConfig(cert_file=Path("server.pem"), key_file=Path("server.key"),
                    client_ca_file=Path("ca.pem") if mutual else None)
    cfg = demo_config(tls=tls, path=pki["dir"] / "infermesh.yaml")
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"kind": kind})})
    service = Service(cfg, Settings(), audit_enabled=False)
    return service, service.start_grpc(0)


def _check(port: int, creds: grpc.ChannelCredentials | None) -> Any:
    target = f"localhost:{port}"
    with (grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)


@pytest.mark.parametrize("kind", KINDS)
def test_tls_server_serves_clients_that_trust_its_ca_and_refuses_plaintext(pki: dict[str, Path], kind: str) -> None:
    service, port = _tls_service(pki, mutual=False, kind=kind)
    try:
        assert _check(port, channel_credentials(pki["ca"])).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            _check(port, None)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop(0)


@pytest.mark.parametrize("kind", KINDS)
def test_mutual_tls_refuses_clients_without_a_valid_certificate(pki: dict[str, Path], kind: str) -> None:
    service, port = _tls_service(pki, mutual=True, kind=kind)
    extproc_port = service.start_extproc(0)  # the Envoy ext_proc port uses the same tls: section
    try:
        good = channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
        for p in (port, extproc_port):
            assert _check(p, good).status == health_pb2.HealthCheckResponse.SERVING
            for creds in (channel_credentials(pki["ca"]),  # no client certificate
                          channel_credentials(pki["ca"], pki["rogue_cert"], pki["rogue_key"]),  # another CA's
                          None):  # plaintext
                with pytest.raises(grpc.RpcError) as err:
                    _check(p, creds)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop(0)


def test_tls_config_errors_name_the_file(pki: dict[str, Path]) -> None:
    from decision.tls import server_credentials, server_ssl_context

    with pytest.raises(ValueError, match="require_client_cert needs client_ca_file"):
        TlsConfig(cert_file=Path("a"), key_file=Path("b"), require_client_cert=True)
    for make in (server_credentials, server_ssl_context):  # the grpcio servers' form and grpclib's
        with pytest.raises(ValueError, match=r"tls\.key_file: cannot read .*missing\.key"):
            make(TlsConfig(cert_file=pki["server_cert"], key_file=Path("missing.key")), pki["dir"])
    with pytest.raises(ValueError, match="tls: cannot use the certificate files"):  # a key that is not the cert's
        server_ssl_context(TlsConfig(cert_file=pki["server_cert"], key_file=pki["rogue_key"]), pki["dir"])
