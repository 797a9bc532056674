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
    # Learner snapshots take their state under the lock that covers an outcome's stamp and learning.
    assert service.engine is not None and service.learner_sync is not None
    assert service.learner_sync.barrier is service.engine.outcome_barrier
    assert service.audit.flush is not None
    service.audit.flush()
    t = stub.Explain(pb.ExplainRequest(decision_id=d.decision_id), timeout=10)
    assert t.decision_id == d.decision_id
    assert t.status == "routed"
    assert t.route == d.route  # address and node too (from the inventory), not only what the log keeps
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
    assert t.route == pb.Route()  # no route: the family the request named ("qwen") is not a model that served it
    assert t.trace["request"]["model_family"] == "qwen"


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


def _config_with_bundle_copy(tmp_path: Path) -> Path:
    """The demo config, its policy bundle copied to ``tmp_path/bundle`` (to be edited by a test)."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "policies" / "bundles" / "default", bundle)
    text = (ROOT / "deploy" / "demo" / "infermesh.yaml").read_text()
    text = text.replace("fleet: fleet.yaml", f"fleet: {ROOT / 'deploy' / 'demo' / 'fleet.yaml'}")
    text = text.replace("policies: ../../policies/bundles/default", f"policies: {bundle}")
    cfg = tmp_path / "infermesh.yaml"
    cfg.write_text(text)
    return cfg


def _failures(http: str) -> float:
    for line in httpx.get(f"{http}/metrics").text.splitlines():
        if line.startswith("infermesh_policy_reload_failures_total "):
            return float(line.split()[1])
    raise AssertionError("no infermesh_policy_reload_failures_total in /metrics")


def test_reload_by_admin_rpc_and_file_watch_counts_failures_in_metrics_and_health(fresh_pg_url: str,
                                                                                   tmp_path: Path) -> None:
    cfg = _config_with_bundle_copy(tmp_path)
    svc = Service(load_config(cfg), Settings(database_url=fresh_pg_url, data_dir=tmp_path / "data"))
    svc.start_grpc(0)
    http = f"http://127.0.0.1:{svc.start_http(0)}"
    try:
        stub, before = _stub(svc), svc.policies.guard.revision
        quota = tmp_path / "bundle" / "quota.cel"
        good = quota.read_text()
        quota.write_text(good + " &&& broken")
        r = stub.ReloadPolicies(pb.ReloadPoliciesRequest())
        assert not r.reloaded and r.revision == before and "quota.cel" in r.error
        assert _failures(http) == 1.0
        health = httpx.get(f"{http}/healthz").json()
        assert health["policy_revision"] == before and "quota.cel" in health["policies"]["last_error"]
        # Decisions go on under the running revision.
        d = stub.Decide(pb.DecideRequest(request_id="rl-1", tenant="globex", model_family="llama"))
        assert d.policy_revision == before
        # The file watcher's rejections are counted too (another broken edit, no RPC).
        quota.write_text(good + " ||| broken again")
        deadline = time.monotonic() + 20
        while _failures(http) < 2.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _failures(http) == 2.0
        quota.write_text(good.replace("<= limit.requests_per_min", "<= limit.requests_per_min + 0"))
        r = stub.ReloadPolicies(pb.ReloadPoliciesRequest())
        assert r.reloaded and r.revision != before and not r.error
        assert httpx.get(f"{http}/healthz").json()["policy_revision"] == r.revision
    finally:
        svc.stop(1.0)


def test_sighup_reloads_the_bundle_of_a_running_server(fresh_pg_url: str, tmp_path: Path) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    cfg = _config_with_bundle_copy(tmp_path)
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "INFERMESH_DATABASE_URL": fresh_pg_url, "INFERMESH_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "decision.cli", "serve", "--config", str(cfg),
                             "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    http = f"http://127.0.0.1:{http_port}"
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("infermesh serving:"):
                break
        else:
            raise AssertionError("the server did not start")
        before = httpx.get(f"{http}/healthz").json()["policies"]
        assert before["reloads"] == 0
        proc.send_signal(signal.SIGHUP)  # no file changed: only the signal can cause this reload
        deadline = time.monotonic() + 30
        health = before
        while health["reloads"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            health = httpx.get(f"{http}/healthz").json()["policies"]
        assert health["reloads"] == 1 and health["reload_failures"] == 0 and health["last_reload_at"] > 0
        assert proc.poll() is None  # SIGHUP reloads; it does not stop the server
    finally:
        proc.terminate()
        proc.communicate(timeout=60)  # drains the pipe the server logs to while it stops
