"""The gRPC front process of ``server.kind: split`` (started by :mod:`decision.split_server`).

Why a second process: on a small machine the Python gRPC server's own work (HTTP/2 framing, the
poller thread, the asyncio callbacks: about as much CPU per call as a whole decision) ran on the
same core, under the same GIL, as the engine. Here it runs in this process, which never parses a
DecisionService message: each call's bytes go to the service process over a Unix socket
(:mod:`decision.split_wire`) and its answer's bytes come back. Health and reflection are answered
here; DecisionService's health follows what the service process reports (``SERVING`` frames).

Run as ``python -m decision.split_front FD SPEC``: FD is this end of the socket pair, SPEC a JSON
object (address, max_message_bytes, reuse_port, tls, base). The process ends when the service
process says stop or goes away (it ignores SIGINT and SIGTERM, which a terminal or systemd send the
whole process group: the service process drains the calls in flight through it first).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from decision import split_wire as wire
from decision.grpc_serving import bind_port, health_status
from decision.read_size import READ_SIZE, read_small
from decision.reflection import enable_reflection
from decision.tls import TlsConfig, server_credentials

_CODES = {c.value[0]: c for c in grpc.StatusCode}
_STOP = struct.Struct("<d")
_GONE = "the decision service process went away"
_LOST_GRACE_S = 2.0  # for the UNAVAILABLE answers of the calls that were waiting to go out


class Front:
    """Forwards DecisionService calls to the service process and answers them with its replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.pending: dict[int, asyncio.Future[tuple[int, wire.Metadata, bytes]]] = {}
        self.next_id = 0
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None  # set once it listens
        self.stopping: asyncio.Future[None] | None = None  # held: the loop keeps only a weak reference to a task
        self.lost = False

    def send(self, kind: int, call_id: int, payload: bytes = b"") -> None:
        if self.lost or self.writer.is_closing():  # a write failed (EPIPE) before the end of stream was read
            self.lose()
            return
        self.writer.write(wire.frame(kind, call_id, payload))

    def lose(self) -> None:
        """The service process is gone: the calls waiting on it, and any that come now, get
        UNAVAILABLE at once (not at their deadlines), and the server stops, so this process ends.

        Whichever comes first calls it: the end of the stream, a failed read, or a failed write (a
        busy front usually writes a new call into the dead socket before it reads the end).
        """
        if self.lost:
            return
        self.lost = True
        reply: tuple[int, wire.Metadata, bytes] = (grpc.StatusCode.UNAVAILABLE.value[0], (), _GONE.encode())
        for fut in self.pending.values():
            if not fut.done():
                fut.set_result(reply)
        self.pending.clear()
        if self.server is not None and self.stopping is None:  # else the service's STOP is under way
            self.stopping = asyncio.ensure_future(self.server.stop(_LOST_GRACE_S))

    def _open(self, method: int, context: grpc.aio.ServicerContext[Any, Any],
              body: bytes) -> tuple[int, asyncio.Future[tuple[int, wire.Metadata, bytes]]]:
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        call_id = self.next_id
        fut: asyncio.Future[tuple[int, wire.Metadata, bytes]] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = fut
        metadata = [(m.key, m.value) for m in (context.invocation_metadata() or ())]
        self.send(wire.CALL, call_id, wire.encode_call(method, context.time_remaining(), metadata, body))
        return call_id, fut

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:  # the service process is gone
            self.lose()

    async def _answer(self, call_id: int, fut: asyncio.Future[tuple[int, wire.Metadata, bytes]],
                      context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            code, trailers, body = await fut
        except asyncio.CancelledError:  # the caller went away: the service need not decide for it
            self.pending.pop(call_id, None)
            self.send(wire.CANCEL, call_id)
            raise
        if code:
            if trailers:
                context.set_trailing_metadata(trailers)
            await context.abort(_CODES.get(code, grpc.StatusCode.UNKNOWN), body.decode(errors="replace"))
        return body

    def unary(self, method: int) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]:
        async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            call_id, fut = self._open(method, context, request)
            await self._drain()
            return await self._answer(call_id, fut, context)

        return call

    def stream(self, method: int) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext[Any, Any]],
                                              Awaitable[bytes]]:
        async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            call_id, fut = self._open(method, context, b"")

            async def forward() -> None:
                async for message in requests:
                    if self.lost:  # answered UNAVAILABLE already
                        return
                    self.send(wire.MESSAGE, call_id, message)
                    await self._drain()
                self.send(wire.END, call_id)

            sending = asyncio.ensure_future(forward())
            try:
                # The service may answer before the stream ends (a bad batch): the rest is not read.
                await asyncio.wait((sending, fut), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not sending.done():
                    sending.cancel()
            if sending.done() and not sending.cancelled() and sending.exception() is not None:
                self.pending.pop(call_id, None)
                self.send(wire.CANCEL, call_id)
                raise sending.exception()  # type: ignore[misc]
            return await self._answer(call_id, fut, context)

        return call

    async def pump(self) -> None:
        """Route the service process's frames until it says stop or goes away."""
        buf = bytearray()
        while True:
            try:
                data = await self.reader.read(READ_SIZE)
            except ConnectionError:  # a write failed first: the same loss as an end of stream
                data = b""
            if not data:  # the service process is gone: nothing here can answer
                self.lose()
                return
            buf += data
            frames, _ = wire.split_frames(buf)
            for kind, call_id, payload in frames:
                if kind == wire.REPLY:
                    fut = self.pending.pop(call_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(wire.decode_reply(payload))
                elif kind == wire.SERVING:
                    await self.health.set(payload[1:].decode(), health_status(bool(payload[0])))
                elif kind == wire.STOP:
                    (grace,) = _STOP.unpack(payload)
                    # Stopped beside this loop, which goes on routing the replies of calls in flight.
                    self.stopping = asyncio.ensure_future(self._stop(grace))

    async def _stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while calls drain
        assert self.server is not None  # set before the pump starts
        await self.server.stop(grace_s)


def stop_payload(grace_s: float) -> bytes:
    """The payload of a STOP frame."""
    return _STOP.pack(grace_s)


async def serve(sock: socket.socket, spec: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    read_small(writer.transport)
    front = Front(reader, writer)
    size = int(spec["max_message_bytes"])
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", size),
                                      ("grpc.max_send_message_length", size),
                                      ("grpc.so_reuseport", 1 if spec["reuse_port"] else 0)])
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for index, name in enumerate(wire.METHODS):
        # No (de)serialisers: the bytes pass through; the service process parses them.
        handlers[name] = (grpc.stream_unary_rpc_method_handler(front.stream(index)) if name in wire.STREAMING
                          else grpc.unary_unary_rpc_method_handler(front.unary(index)))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE_NAME, handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(front.health, server)
    for service in ("", wire.SERVICE_NAME):
        await front.health.set(service, health_pb2.HealthCheckResponse.SERVING)
    enable_reflection((wire.SERVICE_NAME, health.SERVICE_NAME), server)
    try:
        credentials = (server_credentials(TlsConfig(**spec["tls"]), Path(spec["base"]))
                       if spec["tls"] is not None else None)
        port = bind_port(server, spec["address"], credentials, "gRPC server")
    except RuntimeError:  # grpc.aio's word for a port another process holds
        front.send(wire.FAILED, 0, f"cannot bind gRPC server to {spec['address']}".encode())
        await writer.drain()
        return
    except (OSError, ValueError) as exc:
        front.send(wire.FAILED, 0, str(exc).encode())
        await writer.drain()
        return
    await server.start()
    front.server = server
    front.send(wire.READY, 0, struct.pack("<I", port))
    await writer.drain()
    pumping = asyncio.ensure_future(front.pump())
    await server.wait_for_termination()  # stopped on the service's word, or when it went away
    pumping.cancel()
    writer.close()  # the service process sees the end of the stream: every reply has been sent


def main(argv: list[str]) -> int:
    # This process lives exactly as long as the service process's end of the socket: a Ctrl-C or a
    # SIGTERM sent to the whole process group (a terminal, systemd) must not end it before the
    # service has drained the calls in flight through it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    asyncio.run(serve(sock, json.loads(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
