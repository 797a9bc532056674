"""``bench grpc --ceiling``'s engine-bypassed server: one fixed answer, the servicer's checks kept."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from decision.bench import _demo_requests, _engine_bypassed, _seed_telemetry
from decision.config import Settings, load_config
from decision.service import Service
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc


@pytest.fixture(params=["asyncio", "threads", "split"])
def bypassed(request: pytest.FixtureRequest) -> Iterator[tuple[Any, int]]:
    cfg = load_config("deploy/demo/infermesh.yaml")
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"kind": request.param})})
    service = Service(cfg, Settings(), audit_enabled=False)
    _seed_telemetry(service.telemetry, service.fleet)
    port, stop = _engine_bypassed(service)  # the configured server kind, as the service's own
    try:
        yield service, port
    finally:
        stop(0)
        service.stop(0)


def test_every_call_gets_the_first_real_decision(bypassed: tuple[Any, int]) -> None:
    service, port = bypassed
    first, second = _demo_requests(service.fleet, 2)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.DecisionServiceStub(ch)
        a = stub.Decide(pb.DecideRequest(**first))
        b = stub.Decide(pb.DecideRequest(**second))
    assert a.decision_id and a.decision_id == b.decision_id and a.route.endpoint_id == b.route.endpoint_id
    assert service.engine.stats["decisions"] == 1  # the engine ran once, for the first call only


def test_requests_are_still_checked(bypassed: tuple[Any, int]) -> None:
    service, port = bypassed
    request = {**_demo_requests(service.fleet, 1)[0], "estimated_input_tokens": -1}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.DecisionServiceStub(ch).Decide(pb.DecideRequest(**request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "estimated_input_tokens" in (err.value.details() or "")
