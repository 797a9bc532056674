"""The whole service against a real PostgreSQL: Decide -> ReportOutcome -> Explain, HTTP health and metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from decision.config import Settings, load_config
from decision.service import Service
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def service(fresh_pg_url: str, tmp_path: Path) -> Iterator[Service]:
    cfg = load_config(ROOT / "deploy" / "demo" / "infermesh.yaml")
    svc = Service(cfg, Settings(database_url=fresh_pg_url, data_dir=tmp_path))
    svc.start_grpc(0)
    svc.start_http(0)
    try:
        yield svc
    finally:
        svc.stop(1.0)


def _stub(svc: Service) -> Any:
    return pb_grpc.DecisionServiceStub(grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}"))


def test_decide_report_explain_round_trip_through_postgres(service: Service) -> None:
    stub = _stub(service)
    d = stub.Decide(pb.DecideRequest(request_id="rt-1", tenant="globex", model_family="llama",
                                     client_region="us-east", allowed_jurisdictions=["US"], ttft_target_ms=300),
                    timeout=10)
    ack = stub.ReportOutcome(pb.Outcome(decision_id=d.decision_id, status=pb.OUTCOME_STATUS_OK, ttft_ms=150,
                                        latency_ms=1200, input_tokens=300, output_tokens=80), timeout=10)
    assert ack.accepted and not ack.duplicate
    assert service.audit.flush is not None
    service.audit.flush()
    t = stub.Explain(pb.ExplainRequest(decision_id=d.decision_id), timeout=10)
    assert t.decision_id == d.decision_id
    assert t.status == "routed"
    assert t.route.endpoint_id == d.route.endpoint_id
    assert t.policy_revision == d.policy_revision and t.learner == d.learner
    assert abs(t.decided_at_unix_s - time.time()) < 120
    trace = t.trace
    assert trace["stages"]["choose"]["chosen"] == d.route.endpoint_id
    assert trace["request"]["request_id"] == "rt-1"
    assert trace["stages"]["locate"]["candidates"]
    assert t.HasField("outcome") and t.outcome.ttft_ms == 150 and t.outcome.output_tokens == 80
    # The outcome survives a second report unchanged.
    assert stub.ReportOutcome(pb.Outcome(decision_id=d.decision_id, status=pb.OUTCOME_STATUS_ERROR)).duplicate
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(pb.ExplainRequest(decision_id="01900000-0000-7000-8000-000000000000"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_denied_decisions_are_in_the_audit_log(service: Service) -> None:
    from tests.spine_support import ScriptedGuard

    assert service.engine is not None
    service.engine.set_guard(ScriptedGuard(deny_substring="/"))
    stub = _stub(service)
    with pytest.raises(grpc.RpcError) as err:
        stub.Decide(pb.DecideRequest(request_id="deny-1", tenant="globex", model_family="qwen"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    decision_id = dict(err.value.trailing_metadata())["infermesh-decision-id"]
    assert service.audit.flush is not None
    service.audit.flush()
    t = stub.Explain(pb.ExplainRequest(decision_id=decision_id), timeout=10)
    assert t.status == "denied"
    assert list(t.deny_rules) == ["test.deny-substring"]


def test_http_health_and_prometheus_metrics(service: Service) -> None:
    stub = _stub(service)
    stub.Decide(pb.DecideRequest(request_id="m-1", tenant="globex", model_family="llama"), timeout=10)
    assert service.http is not None
    base = f"http://127.0.0.1:{service.http.port}"
    health = httpx.get(f"{base}/healthz", timeout=10).json()
    assert health["status"] == "ok"
    assert service.engine is not None
    assert health["policy_revision"] == service.engine.guard.revision
    text = httpx.get(f"{base}/metrics", timeout=10).text
    assert 'infermesh_decisions_total{result="routed"} 1.0' in text
    assert "infermesh_stage_duration_seconds_bucket" in text
    assert "infermesh_pending_outcomes 1.0" in text
