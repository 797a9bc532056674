"""The threads server kinds stop whole: grpc never shuts down the pool it is given, so the
service and the ext_proc server shut theirs down once every handler has returned."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decision.config import Settings, load_config
from decision.grpc_server import SERVICE_NAME
from decision.service import Service


def test_the_threads_kind_leaves_no_handler_thread_after_stop() -> None:
    """grpc never shuts down the pool it is given: its idle threads outlived every stopped service."""
    cfg = load_config("deploy/demo/infermesh.yaml")
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"kind": "threads"})})
    before = set(threading.enumerate())  # other tests' servers may have left theirs

    def handlers() -> list[str]:
        return [t.name for t in set(threading.enumerate()) - before if t.name.startswith("grpc_")]

    service = Service(cfg, Settings(), audit_enabled=False)
    port = service.start_grpc(0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for _ in range(3):  # a handler thread (or more) up
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert handlers()
    service.stop(0.5)
    assert not handlers()


def test_the_threads_kind_ext_proc_server_leaves_no_handler_thread_after_stop() -> None:
    from decision.extproc import serve_extproc
    from decision.extproc_config import PROBED_NAMES
    from tests.envoy_support import ResidencyGuard, build_fleet, make_engine
    from tests.test_envoy_extproc_unit import ADDR

    before = set(threading.enumerate())

    def handlers() -> list[str]:
        return [t.name for t in set(threading.enumerate()) - before if t.name.startswith("extproc_")]

    server = serve_extproc(make_engine(build_fleet(ADDR), ResidencyGuard()), address="127.0.0.1:0",
                           max_streams=4, server_kind="threads")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=PROBED_NAMES[0]), timeout=5)
    assert handlers()
    server.stop(0.5)
    assert not handlers()
