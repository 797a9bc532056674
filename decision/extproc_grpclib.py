"""The ext_proc endpoint picker on grpclib: gRPC over h2, all of it on one event loop thread.

Why this is the default (``extproc.server: grpclib``): every HTTP request through Envoy is one or
two short ext_proc streams, and at that size a stream costs more in gRPC than the decision does.
grpcio's servers run HTTP/2 in C threads of their own and wake the Python side for each message
(the threaded server through a pool, the asyncio one through a poller thread and the loop's self
pipe): several thread hand-offs per message on a small machine. grpclib parses the frames
(``h2``) in the loop that runs the handler, so a message goes from the socket to
:meth:`ExtProcServicer.handle` and back without leaving the thread. ``infermesh bench envoy
--server grpclib|asyncio`` measures the two side by side (``deploy/envoy/README.md``).

Served here besides ``Process``: ``grpc.health.v1.Health`` (``Check`` and ``Watch``; Envoy health-
checks ``envoy.service.ext_proc.v3.ExternalProcessor``) and server reflection (v1 and v1alpha, as on
the grpcio servers). The messages are grpcio's generated ones (``grpc_health``, ``grpc_reflection``):
grpclib's own copies of those protos would clash with them in the one descriptor pool.

Limits: ``max_streams`` is advertised as HTTP/2 ``SETTINGS_MAX_CONCURRENT_STREAMS`` per
connection, so a proxy queues beyond it (or opens another connection) as it does with grpcio. Two
differences from grpcio: a client that opens more streams than advertised loses its connection
(h2 makes that a connection error; grpcio refuses the extra stream), and until a client has
acknowledged the settings h2's default of 100 applies. grpclib has no per-message size cap
(grpcio's default is 4 MiB); Envoy's own buffer limit bounds what it sends. Like any ext_proc
port, this one should be reachable by the proxies only.

Stopping (:meth:`GrpclibExtProcServer.stop`) is graceful as on grpcio: NOT_SERVING, the listener
closed and a GOAWAY on every connection (new streams go elsewhere or fail at once), open streams
finish within the grace, the rest end UNAVAILABLE, then every connection is dropped, even one
whose reader has stopped (grpclib's own ``close()`` would leave them open and clients hanging).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import grpclib.server
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from decision.extproc import ExtProcServicer
from decision.extproc_aio import AioExtProcServicer
from decision.extproc_config import EXTPROC_SERVICE, PROBED_NAMES
from decision.grpc_serving import LoopThread
from decision.read_size import read_small
from decision.reflection import method_paths as reflection_paths
from decision.reflection import reflected


def _not_a_reset(record: logging.LogRecord) -> bool:
    """grpclib logs every stream its client resets at INFO: for a proxy that is any client hanging up,
    and the picker already records it (a cancelled outcome), so the line would only be noise."""
    return not record.getMessage().startswith("Request was cancelled")


logging.getLogger("grpclib.server").addFilter(_not_a_reset)

_HEALTH = "grpc.health.v1.Health"
_MAX_STREAM_ID = 2**31 - 1
_CLOSE_WAIT_S = 1.0  # for cancelled streams to send their status, twice (before and after dropping connections)
# A stream whose messages are already buffered and whose replies the socket still takes never
# suspends on its own: every this many replies it yields, so one flooding client cannot starve the
# loop (other streams, health checks, the stop's grace timer). Envoy sends a few messages per request.
_YIELD_EVERY = 8
# grpcio's default receive limit, which the other ext_proc server kinds keep.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_Status = health_pb2.HealthCheckResponse


class _ExtProc:
    """``ExternalProcessor/Process`` on a grpclib stream: the asyncio servicer's steps, plus the drain's bookkeeping."""

    def __init__(self, core: ExtProcServicer) -> None:
        self.core = core
        self._steps = AioExtProcServicer(core)  # the stream's steps, as on grpcio's asyncio server
        self.open = 0
        self.draining = False  # stop() began: new streams are refused
        self.closing = False  # the grace is over: what is still open is cancelled
        self.idle = asyncio.Event()
        self.idle.set()

    def __mapping__(self) -> dict[str, Handler]:
        return {f"/{EXTPROC_SERVICE}/Process": Handler(self.process, Cardinality.STREAM_STREAM,
                                                      pb.ProcessingRequest, pb.ProcessingResponse)}

    async def process(self, stream: grpclib.server.Stream[pb.ProcessingRequest, pb.ProcessingResponse]) -> None:
        if self.draining:  # as grpcio does once stop() is called: the proxy's failure mode applies
            raise GRPCError(Status.UNAVAILABLE, "the ext_proc server is shutting down")
        self.open += 1
        self.idle.clear()
        replies = self._steps.Process(_capped(stream, MAX_MESSAGE_BYTES), None)
        try:
            async with contextlib.aclosing(replies):  # the stream is closed (its outcome settled) here, not later
                sent = 0
                async for reply in replies:
                    await stream.send_message(reply)
                    sent += 1
                    if sent % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)
        except asyncio.CancelledError:
            if not self.closing:
                raise  # the proxy reset the stream: nobody to answer
            # Stopped past its grace: end the stream with a status, so the proxy's failure mode applies now.
            raise GRPCError(Status.UNAVAILABLE, "the ext_proc server stopped") from None
        finally:
            self.open -= 1
            if self.open == 0:
                self.idle.set()


async def _capped(stream: grpclib.server.Stream[pb.ProcessingRequest, Any], limit: int,
                  ) -> AsyncIterator[pb.ProcessingRequest]:
    """The stream's requests, as ``stream.recv_message`` reads them, but a message whose length prefix is
    over ``limit`` bytes ends the stream RESOURCE_EXHAUSTED before any of it is buffered (grpclib has no
    cap of its own: it would acknowledge and buffer whatever length the 5-byte prefix announces).

    Reads through grpclib's protocol stream (``stream._stream``, grpclib 0.4): the prefix must be seen
    before the body is read.
    """
    raw, codec = stream._stream, stream._codec
    while True:
        prefix = await raw.recv_data(5)
        if not prefix:
            return
        if prefix[0]:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
        size = int.from_bytes(prefix[1:], "big")
        if size > limit:  # as grpcio words it, with its default limit
            raise GRPCError(Status.RESOURCE_EXHAUSTED, f"Received message larger than max ({size} vs. {limit})")
        yield codec.decode(await raw.recv_data(size), pb.ProcessingRequest)


class _Health:
    """``grpc.health.v1.Health``: ``Check`` answers at once, ``Watch`` streams every change."""

    def __init__(self, serving: Iterable[str]) -> None:
        self._status = {name: _Status.SERVING for name in serving}
        self._changed = asyncio.Condition()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            f"/{_HEALTH}/Check": Handler(self.check, Cardinality.UNARY_UNARY,
                                         health_pb2.HealthCheckRequest, _Status),
            f"/{_HEALTH}/Watch": Handler(self.watch, Cardinality.UNARY_STREAM,
                                         health_pb2.HealthCheckRequest, _Status),
        }

    async def shut_down(self) -> None:
        """Every name NOT_SERVING from now on, so probes see the server going before it goes."""
        async with self._changed:
            self._status = dict.fromkeys(self._status, _Status.NOT_SERVING)
            self._changed.notify_all()

    async def check(self, stream: grpclib.server.Stream[health_pb2.HealthCheckRequest, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None  # grpclib answers a unary call without a message itself
        if req.service not in self._status:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {req.service!r}")
        await stream.send_message(_Status(status=self._status[req.service]))

    async def watch(self, stream: grpclib.server.Stream[health_pb2.HealthCheckRequest, Any]) -> None:
        req = await stream.recv_message()
        assert req is not None
        last = None
        while True:  # until the client goes or the server closes (both cancel this handler)
            now = self._status.get(req.service, _Status.SERVICE_UNKNOWN)
            if now != last:
                await stream.send_message(_Status(status=now))
                last = now
            async with self._changed:
                await self._changed.wait()


class _Reflection:
    """Server reflection, answered by grpcio-reflection's own servicer (the same answers as on grpcio)."""

    def __init__(self, services: Iterable[str]) -> None:
        self._servicer = ReflectionServicer(tuple(services))

    def __mapping__(self) -> dict[str, Handler]:
        return {path: Handler(self.info, Cardinality.STREAM_STREAM, reflection_pb2.ServerReflectionRequest,
                              reflection_pb2.ServerReflectionResponse)
                for path in reflection_paths()}  # v1 and v1alpha: one protocol (decision.reflection)

    async def info(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        replies: AsyncIterator[Any] = self._servicer.ServerReflectionInfo(stream, None)
        async for reply in replies:
            await stream.send_message(reply)


class _Server(grpclib.server.Server):
    """grpclib's server, advertising ``max_streams`` concurrent streams per connection, and able to
    drain: stop accepting, GOAWAY to every connection, then close them (grpclib's ``close()`` only
    cancels the handlers and leaves the connections open, so clients would hang until a timeout)."""

    def __init__(self, handlers: list[Any], max_streams: int) -> None:
        super().__init__(handlers)
        self._max_streams = max_streams
        self.transports: set[asyncio.Transport] = set()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        made, lost = protocol.connection_made, protocol.connection_lost
        max_streams, transports = self._max_streams, self.transports

        def connection_made(transport: asyncio.BaseTransport) -> None:
            made(transport)
            read_small(transport)
            # A second SETTINGS frame after grpclib's: h2 enforces it once the client acknowledges it
            # (until then its default, 100, holds). A client that opens more streams than advertised
            # loses the connection (h2 treats it as a connection error); Envoy keeps to the limit.
            protocol.connection._connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
            protocol.connection.flush()
            transports.add(cast(asyncio.Transport, transport))

        def connection_lost(exc: BaseException | None) -> None:
            transports.discard(protocol.connection._transport)
            lost(exc)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol

    def stop_accepting(self) -> None:
        """Close the listener and tell every client to open no new stream here (a GOAWAY naming the
        highest stream id, as gRPC servers begin a graceful shutdown): streams in flight go on."""
        if self._server is not None:
            self._server.close()
        goaway = GoAwayFrame(0, last_stream_id=_MAX_STREAM_ID, error_code=0).serialize()
        for transport in self.transports:
            if not transport.is_closing():
                transport.write(goaway)

    async def close_all(self, wait_s: float) -> None:
        """Cancel what is still open, give it ``wait_s`` to send its status, then drop every connection."""
        self.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_closed(), wait_s)
        for transport in list(self.transports):
            transport.abort()  # not close(): a proxy that stopped reading would keep a close() waiting
        with contextlib.suppress(TimeoutError):  # connection_lost has cancelled any handler stuck writing
            await asyncio.wait_for(self.wait_closed(), wait_s)


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"ext_proc address must be host:port, not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _listen(host: str, port: int, reuse_port: bool, address: str) -> socket.socket:
    """A listening TCP socket, bound here so the port (0: a free one) is known before the loop serves.

    ``0.0.0.0`` and ``::`` listen on IPv4 and IPv6 both where the host has IPv6, as grpcio does
    for the same addresses, so every ``extproc.server`` kind is reachable the same way.
    """
    if host in ("0.0.0.0", "::") and socket.has_ipv6:
        try:
            return _bind(socket.AF_INET6, "::", port, reuse_port, dual_stack=True)
        except OSError:
            pass  # no IPv6 on this host after all: IPv4 only, as asked
    try:
        return _bind(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port, reuse_port)
    except OSError as exc:
        raise RuntimeError(f"cannot bind the ext_proc server to {address}: {exc.strerror}") from None


def _bind(family: socket.AddressFamily, host: str, port: int, reuse_port: bool, *,
          dual_stack: bool = False) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio and grpclib set TCP_NODELAY on accepted sockets only for that proto,
    # and without it every small reply waits ~40 ms for Nagle and delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class GrpclibExtProcServer:
    """The ext_proc picker, health and reflection on a grpclib server in a thread of its own.

    Parameters
    ----------
    core
        The picker's sans-I/O logic.
    address
        ``host:port``; port 0 picks a free one (see ``port``).
    max_streams
        Streams served at once per proxy connection; more wait in the proxy.
    ssl_context
        TLS or mutual TLS (:func:`decision.tls.server_ssl_context`); plaintext when None.
    reuse_port
        Bind with SO_REUSEPORT (``infermesh serve --workers``).
    """

    def __init__(self, core: ExtProcServicer, address: str, *, max_streams: int,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        self.servicer = core
        self._stopped = False
        host, port = _host_port(address)
        sock = _listen(host, port, reuse_port, address)
        self._loop = LoopThread("extproc-grpclib")

        async def start() -> int:
            # Built on the loop: grpclib's server and asyncio's primitives belong to the running loop.
            self._extproc = _ExtProc(core)
            self._health = _Health((*PROBED_NAMES, EXTPROC_SERVICE))
            self._server = _Server([self._extproc, self._health,
                                    _Reflection(reflected((EXTPROC_SERVICE, _HEALTH)))], max_streams)
            await self._server.start(sock=sock, ssl=ssl_context)
            return int(sock.getsockname()[1])

        try:
            self.port = self._loop.call(start())
        except BaseException:
            self._loop.close()
            sock.close()
            raise

    def stop(self, grace_s: float = 1.0) -> None:
        """Report NOT_SERVING, stop accepting (GOAWAY; new streams UNAVAILABLE), let open streams
        finish within ``grace_s``, end the rest with UNAVAILABLE, close every connection. Idempotent."""
        if self._stopped:
            return
        self._stopped = True

        async def _stop() -> None:
            await self._health.shut_down()
            self._extproc.draining = True
            self._server.stop_accepting()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._extproc.idle.wait(), grace_s)
            # What is still open is cancelled: its stream ends UNAVAILABLE, its outcome is recorded as cancelled.
            self._extproc.closing = True
            await self._server.close_all(_CLOSE_WAIT_S)

        try:
            self._loop.call(_stop(), timeout=grace_s + 4 * _CLOSE_WAIT_S + 5.0)
        finally:
            self._loop.close()
