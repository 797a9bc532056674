"""What the service tells load balancers: gRPC health follows whether it can decide."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decision.config import Settings, load_config
from decision.grpc_server import SERVICE_NAME
from decision.service import Service
from policies.quota import InMemoryQuotaCounters


@pytest.mark.parametrize("kind", ["asyncio", "threads"])
def test_decision_service_is_not_serving_while_the_quota_counters_are_unreachable(kind: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("deploy/demo/infermesh.yaml")
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"kind": kind})})
    service = Service(cfg, Settings(redis_url=f"redis://127.0.0.1:{port}/0"), audit_enabled=False)
    grpc_port = service.start_grpc(0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            def status() -> int:
                return int(stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status)

            assert status() == health_pb2.HealthCheckResponse.SERVING
            service.watch_quota_store()  # what the service's own loop does every few seconds
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert service.engine is not None
            service.engine.guard.counters = InMemoryQuotaCounters()  # type: ignore[attr-defined]  # back
            service.watch_quota_store()
            assert status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        service.stop(0.5)


def test_healthz_says_draining_once_the_service_is_stopping() -> None:
    """Decide answered UNAVAILABLE during the grace period while /healthz still said ok."""
    service = Service(load_config("deploy/demo/infermesh.yaml"), Settings(), audit_enabled=False)
    service.start_grpc(0)
    assert service.health()["status"] == "ok"
    service.stop(0.2)
    assert service.health()["status"] == "draining"
