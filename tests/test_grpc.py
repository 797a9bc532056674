"""The gRPC front end over a real server: statuses, health, reflection (grpcurl-style), telemetry push."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from decision.grpc_aio import AioDecisionServer
from decision.grpc_server import SERVICE_NAME, DecisionServicer, build_server
from decision.metrics import ServiceMetrics
from decision.split_server import SplitDecisionServer
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc
from tests.spine_support import ScriptedGuard, demo_engine

DATA = Path(__file__).parent / "data"


@pytest.fixture(params=["threads", "asyncio", "split"])
def server(demo_fleet, request) -> Iterator[tuple[Any, grpc.Channel]]:  # type: ignore[no-untyped-def]
    """The same servicer on every server kind (``server.kind``): every test here runs on each."""
    engine = demo_engine(demo_fleet)
    servicer = DecisionServicer(engine, ServiceMetrics())
    stop: Any
    if request.param == "threads":
        srv, port, _ = build_server(servicer, address="127.0.0.1:0", threads=8)
        srv.start()
        stop = lambda: srv.stop(0).wait()  # noqa: E731
    elif request.param == "split":
        split = SplitDecisionServer(servicer, address="127.0.0.1:0")
        port = split.port
        stop = lambda: split.stop(0)  # noqa: E731
    else:
        aio = AioDecisionServer(servicer, address="127.0.0.1:0")
        port = aio.port
        stop = lambda: aio.stop(0)  # noqa: E731
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield engine, channel
    finally:
        channel.close()
        stop()


def _decide(channel: grpc.Channel, **kw: Any) -> pb.DecideResponse:
    fields: dict[str, Any] = {"request_id": "r1", "tenant": "globex", "model_family": "llama",
                              "client_region": "eu-west"}
    fields.update(kw)
    resp: pb.DecideResponse = pb_grpc.DecisionServiceStub(channel).Decide(pb.DecideRequest(**fields), timeout=5)
    return resp


def test_decide_over_grpc_returns_a_full_response(server) -> None:  # type: ignore[no-untyped-def]
    engine, channel = server
    r = _decide(channel)
    assert r.route.endpoint_id in engine.fleet.by_id
    assert r.route.address == engine.fleet.by_id[r.route.endpoint_id].address
    assert r.route.tier and r.route.site_id and r.route.gpu_type and r.route.region
    assert len(r.fallbacks) == 3
    assert 0 < r.propensity <= 1
    assert r.learner == "least-ttft@1" and r.policy_revision and r.reason
    assert r.expected_ttft_ms > 0 and r.expected_cost_per_1k_tokens > 0


@pytest.mark.parametrize(("kwargs", "code", "needle"), [
    ({"tenant": ""}, grpc.StatusCode.INVALID_ARGUMENT, "tenant"),
    ({"model_family": "", "model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ({"modality": "smell"}, grpc.StatusCode.INVALID_ARGUMENT, "modality"),
    ({"ttft_target_ms": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "ttft_target_ms"),
    ({"model": "gpt-17"}, grpc.StatusCode.NOT_FOUND, "gpt-17"),
    ({"model": "qwen-2.5-7b", "model_family": "llama"}, grpc.StatusCode.INVALID_ARGUMENT,
     "model_family: model 'qwen-2.5-7b' is of family 'qwen', not 'llama'"),
    # An error quoting a 20 KB value went past gRPC's metadata limit: RESOURCE_EXHAUSTED, no field.
    ({"allowed_jurisdictions": ["E" * 20_000]}, grpc.StatusCode.INVALID_ARGUMENT, "allowed_jurisdictions"),
])
def test_decide_error_statuses_name_the_field(server, kwargs, code, needle) -> None:  # type: ignore[no-untyped-def]
    _, channel = server
    with pytest.raises(grpc.RpcError) as err:
        _decide(channel, **kwargs)
    assert err.value.code() == code
    assert needle in err.value.details()


def test_guardrail_and_quota_denials_name_the_rules(server) -> None:  # type: ignore[no-untyped-def]
    engine, channel = server
    engine.set_guard(ScriptedGuard(deny_substring="/", quota_tenant="greedy"))
    with pytest.raises(grpc.RpcError) as err:
        _decide(channel)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "test.deny-substring" in err.value.details()
    trailers = dict(err.value.trailing_metadata())
    assert trailers["infermesh-rules"] == "test.deny-substring"
    assert trailers["infermesh-decision-id"]
    # An outcome for the denial is refused as such at once (not NOT_FOUND until the log has it).
    stub = pb_grpc.DecisionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ReportOutcome(pb.Outcome(decision_id=trailers["infermesh-decision-id"], status=pb.OUTCOME_STATUS_OK))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "was denied, not routed" in refused.value.details()
    with pytest.raises(grpc.RpcError) as err2:
        _decide(channel, tenant="greedy")
    assert err2.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota.rpm" in err2.value.details()


def test_report_outcome_is_idempotent_and_checks_its_fields(server) -> None:  # type: ignore[no-untyped-def]
    _, channel = server
    stub = pb_grpc.DecisionServiceStub(channel)
    d = _decide(channel, ttft_target_ms=500)
    o = pb.Outcome(decision_id=d.decision_id, status=pb.OUTCOME_STATUS_OK, ttft_ms=120, latency_ms=900,
                   input_tokens=100, output_tokens=50)
    first, second = stub.ReportOutcome(o), stub.ReportOutcome(o)
    assert first.accepted and not first.duplicate and first.HasField("reward")
    assert second.duplicate
    for bad, field in [(pb.Outcome(status=pb.OUTCOME_STATUS_OK), "decision_id"),
                       (pb.Outcome(decision_id=d.decision_id), "status"),
                       (pb.Outcome(decision_id="x", status=pb.OUTCOME_STATUS_OK, ttft_ms=-1), "ttft_ms")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportOutcome(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ReportOutcome(pb.Outcome(decision_id="unknown", status=pb.OUTCOME_STATUS_OK))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(err.value.trailing_metadata())["infermesh-field"] == "decision_id"  # the field, not "decision"


def test_explain_without_an_audit_log_is_unavailable(server) -> None:  # type: ignore[no-untyped-def]
    _, channel = server
    stub = pb_grpc.DecisionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(pb.ExplainRequest(decision_id="x"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(pb.ExplainRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_push_telemetry_updates_the_store_and_rejects_unknown_names(server) -> None:  # type: ignore[no-untyped-def]
    engine, channel = server
    stub = pb_grpc.DecisionServiceStub(channel)
    ep = engine.fleet.endpoints[0]
    batch = pb.TelemetryBatch(
        samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="vllm:num_requests_waiting", value=7),
                 pb.TelemetrySample(node_id=ep.node_id, metric="DCGM_FI_DEV_GPU_TEMP", value=66)],
        expositions=[pb.Exposition(endpoint_id=ep.endpoint_id, text=(DATA / "mixed_node.prom").read_text())])
    ack = stub.PushTelemetry(iter([batch, pb.TelemetryBatch()]))
    assert ack.batches == 2 and ack.samples_accepted > 2
    values = engine.telemetry.reading(ep.endpoint_id).values
    assert values["queue_waiting"] == 3.0  # the exposition came after the sample in the same batch
    # The exposition's temperature is as old as its oldest line (one is stamped in 2023): older than
    # the pushed sample, it does not overwrite it.
    assert values["gpu_temp_c"] == 66.0
    assert values["gpu_util"] == pytest.approx(25.0)  # the exposition's other node values did arrive
    for bad, field in [(pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="bogus", value=1), "samples[0].metric"),
                       (pb.TelemetrySample(endpoint_id="nope", metric="queue_waiting", value=1),
                        "samples[0].endpoint_id"),
                       # A node-level metric sent for an endpoint: the endpoint is what is wrong.
                       (pb.TelemetrySample(endpoint_id="nope", metric="gpu_temp_c", value=1),
                        "samples[0].endpoint_id: unknown endpoint 'nope'"),
                       (pb.TelemetrySample(node_id="nope", metric="gpu_temp_c", value=1),
                        "samples[0].node_id: unknown node 'nope'"),
                       (pb.TelemetrySample(metric="gpu_temp_c", value=1), "samples[0].endpoint_id: required")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.PushTelemetry(iter([pb.TelemetryBatch(samples=[bad])]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()


def test_health_reports_serving(server) -> None:  # type: ignore[no-untyped-def]
    _, channel = server
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING


def _reflect(channel: grpc.Channel, req: reflection_pb2.ServerReflectionRequest, version: str = "v1alpha") -> Any:
    """One reflection request on ``grpc.reflection.<version>`` (v1 and v1alpha: one protocol, only the package
    differs, so v1alpha's messages serve both)."""
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return next(iter(call(iter([req]), timeout=5)))


def test_reflection_v1_describes_itself(server) -> None:  # type: ignore[no-untyped-def]
    """`grpcurl describe grpc.reflection.v1.ServerReflection`: its file is the v1 package's."""
    _, channel = server
    v1 = _reflect(channel, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="grpc.reflection.v1.ServerReflection"), "v1")
    fdp = descriptor_pb2.FileDescriptorProto.FromString(v1.file_descriptor_response.file_descriptor_proto[0])
    assert fdp.package == "grpc.reflection.v1"
    method = fdp.service[0].method[0]
    assert (method.name, method.input_type) == ("ServerReflectionInfo", ".grpc.reflection.v1.ServerReflectionRequest")


@pytest.mark.parametrize("version", ["v1", "v1alpha"])  # current tools ask v1 first, older ones v1alpha
def test_reflection_lists_services_and_a_decide_works_without_the_proto(server, version: str) -> None:  # type: ignore[no-untyped-def]
    """What `grpcurl -plaintext host:port list` and a Decide call do, with no .proto at hand."""
    _, channel = server
    listed = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""), version)
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = _reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME), version)
    pool = descriptor_pool.DescriptorPool()
    protos = [descriptor_pb2.FileDescriptorProto.FromString(b)
              for b in files.file_descriptor_response.file_descriptor_proto]
    # Dependencies (google/protobuf/struct.proto) first.
    for fd in sorted(protos, key=lambda f: f.name != "google/protobuf/struct.proto"):
        pool.Add(fd)
    svc = pool.FindServiceByName(SERVICE_NAME)
    method = svc.methods_by_name["Decide"]
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(f"/{SERVICE_NAME}/Decide", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=resp_cls.FromString)
    resp = call(req_cls(request_id="dyn", tenant="globex", model_family="qwen"), timeout=5)
    assert resp.route.endpoint_id.endswith(("qwen-2.5-7b", "qwen-2.5-32b"))


def test_an_outcome_served_by_a_fallback_teaches_the_route_a_failure(server) -> None:  # type: ignore[no-untyped-def]
    engine, channel = server
    stub = pb_grpc.DecisionServiceStub(channel)
    d = _decide(channel, ttft_target_ms=500)
    fallback = d.fallbacks[0].endpoint_id
    ack = stub.ReportOutcome(pb.Outcome(decision_id=d.decision_id, status=pb.OUTCOME_STATUS_OK, ttft_ms=100,
                                        latency_ms=400, output_tokens=20, served_endpoint_id=fallback))
    routed = _decide(channel, request_id="r2", ttft_target_ms=500)
    ok = stub.ReportOutcome(pb.Outcome(decision_id=routed.decision_id, status=pb.OUTCOME_STATUS_OK, ttft_ms=100,
                                       latency_ms=400, output_tokens=20, served_endpoint_id=routed.route.endpoint_id))
    assert ack.reward < 0 < ok.reward  # the route served the second one itself: credited as usual
    assert engine.stats["outcomes_by_fallback"] == 1
    third = _decide(channel, request_id="r3", ttft_target_ms=500)
    with pytest.raises(grpc.RpcError) as err:  # a typo is refused, and the decision still waits for its outcome
        stub.ReportOutcome(pb.Outcome(decision_id=third.decision_id, status=pb.OUTCOME_STATUS_OK,
                                      served_endpoint_id="nowhere"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "served_endpoint_id" in err.value.details()
    retry = stub.ReportOutcome(pb.Outcome(decision_id=third.decision_id, status=pb.OUTCOME_STATUS_OK, ttft_ms=100,
                                          latency_ms=400, output_tokens=20))
    assert retry.accepted and not retry.duplicate and retry.reward > 0


def test_an_outcome_the_audit_log_must_answer_does_not_stall_other_calls(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    """On the asyncio server it queried the log on the event loop: every call waited for the database."""
    import threading
    import time

    class SlowLog:  # a busy database
        def get_decision(self, decision_id: str) -> None:
            time.sleep(1.0)

    engine = demo_engine(demo_fleet, traces=SlowLog())
    aio = AioDecisionServer(DecisionServicer(engine, ServiceMetrics()), address="127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{aio.port}") as channel:
            _decide(channel)  # warm
            stub = pb_grpc.DecisionServiceStub(channel)
            codes: list[grpc.StatusCode] = []

            def elsewhere() -> None:
                try:
                    stub.ReportOutcome(pb.Outcome(decision_id="made-by-another-worker",
                                                  status=pb.OUTCOME_STATUS_OK), timeout=5)
                except grpc.RpcError as err:
                    codes.append(err.code())

            t = threading.Thread(target=elsewhere)
            t.start()
            time.sleep(0.1)
            began = time.perf_counter()
            _decide(channel, request_id="r2")
            assert time.perf_counter() - began < 0.5
            t.join()
            assert codes == [grpc.StatusCode.NOT_FOUND]
    finally:
        aio.stop(0)
