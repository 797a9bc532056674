"""``server.kind: split``: what the front process and the service process owe each other.

tests/test_grpc.py runs every DecisionService behaviour on this kind as on the others; here are the
parts only this kind has: the process boundary (start-up failures, shutdown, either side going away),
calls decided back to back, and the frames' own encoding.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decision import split_wire as wire
from decision.domain import Decision, RequestContext
from decision.edge import EdgeInterceptor
from decision.grpc_server import SERVICE_NAME, DecisionServicer
from decision.metrics import ServiceMetrics
from decision.split_server import SplitDecisionServer, _CallContext
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc
from tests.spine_support import demo_engine


class _Slow(DecisionServicer):
    """Decides after ``delay_s``, noting each request id and the metadata of the call that carried it."""

    def __init__(self, *args: Any, delay_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s
        self.decided: list[str] = []

    def decide(self, ctx: RequestContext, alive: Callable[[], bool] | None = None) -> Decision:
        time.sleep(self.delay_s)
        decision = super().decide(ctx, alive)
        self.decided.append(ctx.request_id)
        return decision


def _request(demo_fleet: Any, request_id: str = "r1") -> pb.DecideRequest:
    model = demo_fleet.endpoints[0].model
    return pb.DecideRequest(request_id=request_id, tenant="acme", model=model, estimated_input_tokens=100,
                            expected_output_tokens=50)


@pytest.fixture()
def slow(demo_fleet: Any) -> Iterator[tuple[_Slow, SplitDecisionServer, grpc.Channel]]:
    servicer = _Slow(demo_engine(demo_fleet), ServiceMetrics(), delay_s=0.4)
    server = SplitDecisionServer(servicer, address="127.0.0.1:0", edge=EdgeInterceptor())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield servicer, server, channel
    finally:
        channel.close()
        server.stop(0)


def _front_exits(server: SplitDecisionServer, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if server._proc.poll() is not None:
            return True
        time.sleep(0.05)
    return False


def test_a_call_in_flight_at_stop_is_answered_then_the_front_exits(demo_fleet: Any, slow: Any) -> None:
    _, server, channel = slow
    stub = pb_grpc.DecisionServiceStub(channel)
    answers: list[Any] = []
    caller = threading.Thread(target=lambda: answers.append(stub.Decide(_request(demo_fleet), timeout=10)))
    caller.start()
    time.sleep(0.15)  # the call is in the service process's hands
    server.stop(5.0)
    caller.join(10)
    assert answers and answers[0].decision_id, "the call in flight at stop got no answer"
    assert server._proc.poll() is not None, "the front process outlived stop()"
    with pytest.raises(grpc.RpcError) as err:
        stub.Decide(_request(demo_fleet, "after"), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_follows_what_the_service_reports(slow: Any) -> None:
    _, server, channel = slow
    check = health_pb2_grpc.HealthStub(channel).Check
    ask = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    assert check(ask, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    server.set_serving(SERVICE_NAME, False)
    deadline = time.monotonic() + 5
    while check(ask, timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "NOT_SERVING never reached the front's health service"
        time.sleep(0.02)


def test_the_front_exits_when_the_service_process_goes_away(slow: Any) -> None:
    _, server, _ = slow
    server._stopping = True  # as if this process had died: its end of the socket closes
    server._sock.shutdown(socket.SHUT_RDWR)
    assert _front_exits(server), "the front kept serving with nothing behind it"


def test_calls_get_unavailable_at_once_when_the_front_writes_into_a_dead_service(demo_fleet: Any, slow: Any) -> None:
    # A busy front usually writes a new call into the socket of a service process that died before it
    # reads the socket's end: that failed write must end the calls waiting on the service, and the
    # front, as an end of stream does (they waited for their deadlines, and the front ran on).
    _, server, channel = slow
    stub = pb_grpc.DecisionServiceStub(channel)
    codes: list[grpc.StatusCode] = []

    def call(i: int) -> None:
        try:
            stub.Decide(_request(demo_fleet, f"in-flight-{i}"), timeout=20)
        except grpc.RpcError as exc:
            codes.append(exc.code())

    callers = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for c in callers:
        c.start()
    time.sleep(0.2)  # in the service's hands: it takes 0.4 s for each
    server._stopping = True
    server._sock.shutdown(socket.SHUT_RD)  # the front's next write fails (EPIPE); no end of stream reaches it
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Decide(_request(demo_fleet, "new"), timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    for c in callers:
        c.join(25)
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3, codes
    assert time.monotonic() - t0 < 10, "the calls waited for their deadlines"
    assert _front_exits(server), "the front kept serving with nothing behind it"


def test_a_port_in_use_is_one_clear_error_and_leaves_no_process(demo_fleet: Any) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    servicer = DecisionServicer(demo_engine(demo_fleet), ServiceMetrics())
    before = {t.name for t in threading.enumerate()}
    try:
        with pytest.raises(OSError, match=f"cannot bind gRPC server to 127.0.0.1:{port}"):
            SplitDecisionServer(servicer, address=f"127.0.0.1:{port}")
    finally:
        holder.close()
    assert {t.name for t in threading.enumerate()} - before == set()


def test_calls_arriving_together_are_all_answered_each_with_its_own_answer(demo_fleet: Any) -> None:
    servicer = _Slow(demo_engine(demo_fleet), ServiceMetrics(), delay_s=0.0)
    server = SplitDecisionServer(servicer, address="127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = pb_grpc.DecisionServiceStub(channel)
        futures = [stub.Decide.future(_request(demo_fleet, f"r{i}"), timeout=10) for i in range(64)]
        bad = stub.Decide.future(pb.DecideRequest(request_id="bad", tenant="acme"), timeout=10)
        answers = [f.result() for f in futures]
        with pytest.raises(grpc.RpcError) as err:
            bad.result()
    finally:
        channel.close()
        server.stop(0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len({a.decision_id for a in answers}) == 64
    assert sorted(servicer.decided) == sorted(f"r{i}" for i in range(64))


def test_a_call_whose_caller_left_before_it_was_read_is_not_decided(demo_fleet: Any) -> None:
    servicer = _Slow(demo_engine(demo_fleet), ServiceMetrics())
    server = SplitDecisionServer(servicer, address="127.0.0.1:0")
    try:
        frames = [(wire.CALL, 1, wire.encode_call(0, None, (), _request(demo_fleet, "gone").SerializeToString())),
                  (wire.CANCEL, 1, b""),
                  (wire.CALL, 2, wire.encode_call(0, None, (), _request(demo_fleet, "here").SerializeToString()))]
        replies = server._handle(frames)
    finally:
        server.stop(0)
    codes = {}
    for data in replies:
        [(_, cid, payload)], _ = wire.split_frames(bytearray(data))
        codes[cid] = wire.decode_reply(payload)[0]
    assert servicer.decided == ["here"]
    assert codes == {1: grpc.StatusCode.CANCELLED.value[0], 2: 0}


def test_the_call_context_carries_metadata_deadline_and_binary_values() -> None:
    metadata = (("traceparent", "00-abc-def-01"), ("x-token-bin", b"\x00\xff"))
    method, left, carried, body = wire.decode_call(wire.encode_call(2, 0.25, metadata, b"\x01\x02"))
    ctx = _CallContext(carried, left)
    assert (method, body) == (2, b"\x01\x02")
    assert [(m.key, m.value) for m in ctx.invocation_metadata()] == list(metadata)
    assert dict(ctx.invocation_metadata()) == dict(metadata)  # read as (key, value) pairs too
    remaining = ctx.time_remaining()
    assert remaining is not None and 0.0 < remaining <= 0.25
    assert _CallContext((), None).time_remaining() is None


def test_a_call_right_behind_the_fronts_ready_is_kept_not_dropped() -> None:
    # The front serves as soon as it listens: a caller's first call can share a read with READY.
    from decision.split_server import _await_ready

    ours, theirs = socket.socketpair()
    call = wire.frame(wire.CALL, 1, b"call")
    theirs.sendall(wire.frame(wire.READY, 0, (4321).to_bytes(4, "little")) + call + call[:5])
    started = _await_ready(ours, None)  # type: ignore[arg-type]  # no process: it is only read when none answers
    assert started.port == 4321
    assert started.frames == [(wire.CALL, 1, b"call")] and bytes(started.partial) == call[:5]
    ours.close()
    theirs.close()


def test_frames_split_only_whole_frames_and_keep_the_rest() -> None:
    data = wire.frame(wire.REPLY, 1, b"abc") + wire.frame(wire.REPLY, 2, b"defgh")
    buf = bytearray(data[:-2])
    frames, left = wire.split_frames(buf)
    assert frames == [(wire.REPLY, 1, b"abc")] and left == len(data) - 2 - (wire.HEADER.size + 3)
    buf += data[-2:]
    assert wire.split_frames(buf) == ([(wire.REPLY, 2, b"defgh")], 0)


def test_a_service_configured_split_serves_decide_and_stops_its_front(demo_fleet: Any) -> None:
    from decision.config import Settings, load_config
    from decision.service import Service

    cfg = load_config("deploy/demo/infermesh.yaml")
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"kind": "split"})})
    service = Service(cfg, Settings(), audit_enabled=False)
    try:
        port = service.start_grpc(0)
        server = service.grpc_server
        assert isinstance(server, SplitDecisionServer)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:  # an answer from the engine: the model is not in the fleet
                pb_grpc.DecisionServiceStub(channel).Decide(
                    pb.DecideRequest(request_id="r", tenant="acme", model="no-such-model"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        service.stop(0)
    assert server._proc.poll() is not None, "the front process outlived the service"


def test_a_signal_to_the_whole_process_group_leaves_the_front_to_the_service(demo_fleet: Any, slow: Any) -> None:
    import os
    import signal

    _, server, channel = slow
    for sig in (signal.SIGINT, signal.SIGTERM):  # what Ctrl-C or systemd send every process of the group
        os.kill(server._proc.pid, sig)
    time.sleep(0.3)
    assert server._proc.poll() is None, "the front died before the service could drain through it"
    answer = pb_grpc.DecisionServiceStub(channel).Decide(_request(demo_fleet), timeout=10)
    assert answer.decision_id


def test_a_dead_front_is_replaced_on_its_port_and_one_that_keeps_dying_fails_healthz(
        demo_fleet: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    import decision.split_server as split_server
    from decision.config import Settings, load_config
    from decision.service import Service

    monkeypatch.setattr(split_server, "_RESTARTS_PER_WINDOW", 1)
    cfg = load_config("deploy/demo/infermesh.yaml")
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"kind": "split"})})
    service = Service(cfg, Settings(), audit_enabled=False)
    try:
        port = service.start_grpc(0)
        server = service.grpc_server
        assert isinstance(server, SplitDecisionServer)
        assert service.health()["status"] == "ok"
        server.set_serving(SERVICE_NAME, False)  # what the service last said: the next front says it too
        first = server._proc
        first.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.restarts < 1:
            assert time.monotonic() < deadline, "the dead front was not replaced"
            time.sleep(0.05)
        assert first.poll() is not None and server._proc.poll() is None and server.port == port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # the same port, served again
            check = health_pb2_grpc.HealthStub(channel).Check
            ask = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert check(ask, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
            server.set_serving(SERVICE_NAME, True)
            answer = pb_grpc.DecisionServiceStub(channel).Decide(_request(demo_fleet), timeout=10)
            assert answer.decision_id
        assert service.health()["status"] == "ok"
        server._proc.send_signal(signal.SIGKILL)  # the second death in the window: over the limit of 1
        deadline = time.monotonic() + 10
        while "front process exited" not in service.health().get("grpc", ""):
            assert time.monotonic() < deadline, "health still without the reason, with nothing on the gRPC port"
            time.sleep(0.05)
        details = service.health()
        assert details["status"] == "failed" and "front process exited (status -9)" in details["grpc"]
        assert server.restarts == 1
        server.set_serving(SERVICE_NAME, False)  # the quota watcher may still report: no error from a dead front
    finally:
        service.stop(0)


def test_a_fault_in_the_forwarding_thread_ends_the_front_and_fails_health(demo_fleet: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    servicer = DecisionServicer(demo_engine(demo_fleet), ServiceMetrics())
    server = SplitDecisionServer(servicer, address="127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")

    def broken(frames: Any) -> list[bytes]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server, "_handle", broken)
    try:
        with pytest.raises(grpc.RpcError) as err:  # answered at once, not left to its deadline
            pb_grpc.DecisionServiceStub(channel).Decide(_request(demo_fleet), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _front_exits(server)
        deadline = time.monotonic() + 10
        while "front process exited" not in (server.problem() or ""):
            assert time.monotonic() < deadline, f"no exit status in the health problem: {server.problem()!r}"
            time.sleep(0.05)
    finally:
        channel.close()
        server.stop(0)
