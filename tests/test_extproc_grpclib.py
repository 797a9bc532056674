"""The grpclib ext_proc server (the default kind): health, reflection, stream limit, graceful stop,
binding errors; over real sockets with grpcio clients, as Envoy and probes would reach it."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from decision.extproc import ExtProcServicer
from decision.extproc_config import EXTPROC_SERVICE, PROBED_NAMES
from decision.extproc_grpclib import GrpclibExtProcServer
from tests.envoy_support import ResidencyGuard, build_fleet, make_engine
from tests.test_envoy_extproc_unit import ADDR, BUFFERED, CHAT, body_msg, headers_msg

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEADERS = {"x-infermesh-tenant": "acme", ":path": "/v1/chat/completions"}


def _server(max_streams: int = 8) -> GrpclibExtProcServer:
    core = ExtProcServicer(make_engine(build_fleet(ADDR), ResidencyGuard()))
    return GrpclibExtProcServer(core, "127.0.0.1:0", max_streams=max_streams)


@pytest.fixture
def server() -> Iterator[GrpclibExtProcServer]:
    srv = _server()
    yield srv
    srv.stop(0)


class _OpenStream:
    """A Process stream fed by hand, so a test decides when each message goes (and the end)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._out: queue.Queue[pb.ProcessingRequest | None] = queue.Queue()
        self.replies: queue.Queue[Any] = queue.Queue()
        self._call = ext_grpc.ExternalProcessorStub(channel).Process(iter(self._out.get, None), timeout=20)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.replies.put(reply)
            self.replies.put("end")
        except grpc.RpcError as exc:
            self.replies.put(exc.code())
        finally:
            self._out.put(None)  # the call is over: grpc's thread waiting for the next message ends

    def send(self, msg: pb.ProcessingRequest) -> None:
        self._out.put(msg)

    def close(self) -> None:
        self._out.put(None)

    def reset(self) -> None:
        """As a proxy whose client hung up: RST_STREAM."""
        self._call.cancel()


def test_health_checks_every_probed_name_and_refuses_unknown_ones(server: GrpclibExtProcServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in (*PROBED_NAMES, EXTPROC_SERVICE):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_ext_proc_service(server: GrpclibExtProcServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert EXTPROC_SERVICE in db.get_services() and "grpc.health.v1.Health" in db.get_services()
        svc = descriptor_pool.DescriptorPool(db).FindServiceByName(EXTPROC_SERVICE)
    assert [m.name for m in svc.methods] == ["Process"]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:  # and on reflection's v1 name
        call = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        reply = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)))
    names = {s.name for s in reply.list_services_response.service}
    assert {EXTPROC_SERVICE, "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_a_message_over_the_limit_ends_its_stream_resource_exhausted(server: GrpclibExtProcServer) -> None:
    """As on grpcio's servers (4 MiB): grpclib itself would buffer whatever length a prefix announces."""
    from decision.extproc_grpclib import MAX_MESSAGE_BYTES

    big = pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x" * (MAX_MESSAGE_BYTES + 1)))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            list(ext_grpc.ExternalProcessorStub(ch).Process(iter([big]), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"vs. {MAX_MESSAGE_BYTES})" in (err.value.details() or "")
        replies = list(ext_grpc.ExternalProcessorStub(ch).Process(  # the connection still serves
            iter([headers_msg(HEADERS, mode=BUFFERED, no_wait=False), body_msg(CHAT)]), timeout=10))
    assert len(replies) == 2


def test_a_pick_over_the_wire_and_the_stream_closes_when_done(server: GrpclibExtProcServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        replies = list(ext_grpc.ExternalProcessorStub(ch).Process(
            iter([headers_msg(HEADERS, mode=BUFFERED, no_wait=False), body_msg(CHAT)]), timeout=10))
    assert len(replies) == 2  # the header answer, then the body answer with the pick; then the server ends it
    picked = {h.header.key for h in replies[1].request_body.response.header_mutation.set_headers}
    assert {"x-gateway-destination-endpoint", "x-infermesh-decision-id"} <= picked
    assert server.servicer.stats["routed"] == 1


def test_a_stream_the_proxy_resets_is_closed_not_logged(server: GrpclibExtProcServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        s = _OpenStream(ch)
        s.send(headers_msg(HEADERS, mode=BUFFERED, no_wait=False))
        assert isinstance(s.replies.get(timeout=5), pb.ProcessingResponse)
        s.reset()
        assert s.replies.get(timeout=5) == grpc.StatusCode.CANCELLED
        deadline = time.monotonic() + 5
        while _open(server) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not _open(server)  # the server saw the reset and closed its side
    assert not [r for r in caplog.records if r.name.startswith("grpclib")], caplog.text


def _open(server: GrpclibExtProcServer) -> int:
    return server._extproc.open


def test_streams_beyond_max_streams_wait_for_a_free_slot() -> None:
    srv = _server(max_streams=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            first, second = _OpenStream(ch), _OpenStream(ch)
            for s in (first, second):
                s.send(headers_msg(HEADERS, mode=BUFFERED, no_wait=False))
                assert isinstance(s.replies.get(timeout=5), pb.ProcessingResponse)
            third = _OpenStream(ch)
            third.send(headers_msg(HEADERS, mode=BUFFERED, no_wait=False))
            with pytest.raises(queue.Empty):  # queued by the client (SETTINGS_MAX_CONCURRENT_STREAMS), not failed
                third.replies.get(timeout=0.5)
            first.send(body_msg(CHAT))  # the first pick completes and its stream ends...
            assert isinstance(first.replies.get(timeout=5), pb.ProcessingResponse)
            assert first.replies.get(timeout=5) == "end"
            assert isinstance(third.replies.get(timeout=5), pb.ProcessingResponse)  # ...which lets the third in
            for s in (second, third):
                s.send(body_msg(CHAT))
                assert isinstance(s.replies.get(timeout=5), pb.ProcessingResponse)
            assert srv.servicer.stats["routed"] == 3
    finally:
        srv.stop(0)


def test_stop_reports_not_serving_refuses_new_streams_and_lets_open_ones_finish() -> None:
    srv = _server()
    stopped = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=EXTPROC_SERVICE),
                                                     timeout=20)
        assert next(watch).status == SERVING
        open_one = _OpenStream(ch)
        open_one.send(headers_msg(HEADERS, mode=BUFFERED, no_wait=False))
        assert isinstance(open_one.replies.get(timeout=5), pb.ProcessingResponse)
        t0 = time.monotonic()
        def stop() -> None:
            srv.stop(10.0)
            stopped.set()

        stopper = threading.Thread(target=stop)
        stopper.start()
        assert next(watch).status == NOT_SERVING
        late = _OpenStream(ch)
        late.send(headers_msg(HEADERS, mode=BUFFERED, no_wait=False))
        assert late.replies.get(timeout=5) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ConnectionRefusedError):  # the listener is closed at once
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
        assert not stopped.is_set()  # the open stream holds the stop within its grace...
        open_one.send(body_msg(CHAT))
        assert isinstance(open_one.replies.get(timeout=5), pb.ProcessingResponse)
        stopper.join(timeout=15)
    assert stopped.is_set() and time.monotonic() - t0 < 5  # ...and the stop ends once it is done
    assert srv.servicer.stats["routed"] == 1


def test_stop_cancels_what_is_still_open_after_the_grace() -> None:
    srv = _server()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stuck = _OpenStream(ch)
        stuck.send(headers_msg(HEADERS, mode=BUFFERED, no_wait=False))
        assert isinstance(stuck.replies.get(timeout=5), pb.ProcessingResponse)
        t0 = time.monotonic()
        srv.stop(0.3)
        assert 0.25 <= time.monotonic() - t0 < 5
        assert stuck.replies.get(timeout=5) == grpc.StatusCode.UNAVAILABLE  # ended with a status, not left hanging
    assert srv.servicer.stats["routed"] == 0


def test_stop_closes_every_connection_so_clients_fail_at_once() -> None:
    srv = _server()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        watch = stub.Watch(health_pb2.HealthCheckRequest())  # no deadline, as a client-side health checker
        assert next(watch).status == SERVING
        srv.stop(0.2)
        seen: list[int] = []
        with pytest.raises(grpc.RpcError) as ended:  # the watch ends (it used to hang): NOT_SERVING, if in time
            seen.extend(r.status for r in watch)
        assert seen in ([], [NOT_SERVING]) and ended.value.code() == grpc.StatusCode.UNAVAILABLE
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 2  # not a timeout
    srv.stop(0.2)  # a second stop does nothing


def _flood(port: int) -> socket.socket:
    """A client that opens a Process stream, pushes ~2.8 MB of messages (each is answered) and never reads."""
    import struct

    import h2.config
    import h2.connection
    from h2.settings import SettingCodes, Settings

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.local_settings = Settings(client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    c.initiate_connection()
    c.increment_flow_control_window(2**31 - 1 - 65535)
    sock.sendall(c.data_to_send())
    c.receive_data(sock.recv(65535))  # the server's SETTINGS
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                         (":path", f"/{EXTPROC_SERVICE}/Process"), ("content-type", "application/grpc"),
                         ("te", "trailers")])
    msg = pb.ProcessingRequest(request_trailers=pb.HttpTrailers()).SerializeToString()
    chunk = (b"\0" + struct.pack(">I", len(msg)) + msg) * 2000
    sock.settimeout(0.5)
    for _ in range(200):
        for i in range(0, len(chunk), 16000):
            c.send_data(sid, chunk[i:i + 16000])
        try:
            sock.sendall(c.data_to_send())
        except TimeoutError:
            break  # the server has stopped reading too: its own writes are stuck
    return sock


def test_stop_returns_when_a_proxy_has_stopped_reading() -> None:
    """A client that sends and never reads leaves the server's writes paused; the stop must not wait on them."""
    srv = _server()
    with _flood(srv.port):
        time.sleep(0.5)
        t0 = time.monotonic()
        srv.stop(0.2)
        assert time.monotonic() - t0 < 5


def test_a_flooding_stream_does_not_starve_other_calls() -> None:
    """Buffered messages and a socket that still takes replies never suspend a stream by themselves;
    it yields now and then, so a health probe on another connection is answered meanwhile."""
    srv = _server()
    try:
        with _flood(srv.port), grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            t0 = time.monotonic()
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert reply.status == SERVING and time.monotonic() - t0 < 1.0  # unfair: ~2.3 s here
    finally:
        srv.stop(0)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this host")
def test_all_interfaces_means_ipv4_and_ipv6_as_on_grpcio() -> None:
    core = ExtProcServicer(make_engine(build_fleet(ADDR), ResidencyGuard()))
    srv = GrpclibExtProcServer(core, "0.0.0.0:0", max_streams=4)
    try:
        for target in (f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}"):
            with grpc.insecure_channel(target) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == SERVING
    finally:
        srv.stop(0)


def test_binding_errors_name_the_address() -> None:
    core = ExtProcServicer(make_engine(build_fleet(ADDR), ResidencyGuard()))
    with pytest.raises(ValueError, match="host:port"):
        GrpclibExtProcServer(core, "localhost", max_streams=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(RuntimeError, match=f"cannot bind the ext_proc server to {addr}"):
            GrpclibExtProcServer(core, addr, max_streams=1)
