"""DecisionService with its gRPC transport in a front process (``server.kind: split``).

The front process (:mod:`decision.split_front`) terminates gRPC and forwards each call's bytes
here over a Unix socket pair; one thread here parses them and runs the same edge-checked servicer
methods the threaded server runs, then sends the answers' bytes back. Calls that arrive together
are decided back to back and answered in one write, so the engine runs warm instead of
interleaved with the transport's work. Decide, and ReportOutcome of a decision this process
holds, run on that thread; Explain, ReloadPolicies, other outcomes and telemetry streams (which
may wait on the database or a compile) run on a small pool, as the asyncio server runs them off
its loop.

A front that dies is replaced on the same port (and told the health statuses this process last
reported); its calls in the service's hands are cancelled, and their late replies are dropped, not
sent to the new front, whose calls reuse the ids. A front that keeps dying is left dead and
:meth:`SplitDecisionServer.problem` says why (``/healthz`` fails).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import grpc

from decision import split_wire as wire
from decision.edge import EdgeInterceptor
from decision.grpc_server import DecisionServicer
from decision.grpc_serving import CallAborted
from decision.read_size import READ_SIZE
from decision.split_front import stop_payload
from decision.tls import TlsConfig
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0
# A front that dies is replaced on the same port, unless fronts keep dying: more than this many
# deaths within the window and /healthz fails instead (the orchestrator then restarts the service).
_RESTARTS_PER_WINDOW = 3
_RESTART_WINDOW_S = 60.0
_END = object()  # closes a telemetry stream's message queue
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class _Metadatum(NamedTuple):
    key: str
    value: str | bytes


class _CallContext:
    """What the servicer and the edge read of a ``grpc.ServicerContext``, for a forwarded call."""

    __slots__ = ("cancelled", "deadline", "metadata", "trailers")

    def __init__(self, metadata: wire.Metadata, seconds_left: float | None) -> None:
        self.metadata = tuple(_Metadatum(k, v) for k, v in metadata)
        self.deadline = None if seconds_left is None else time.monotonic() + seconds_left
        self.cancelled = False
        self.trailers: tuple[tuple[str, str | bytes], ...] = ()

    def invocation_metadata(self) -> tuple[_Metadatum, ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def is_active(self) -> bool:
        return not self.cancelled

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.trailers = tuple(metadata)

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise CallAborted(code, details)


class _CallDetails(NamedTuple):
    method: str


class _Capture:
    """Stands in for a server to collect the generated code's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers.update(handlers)


def method_handlers(servicer: DecisionServicer, edge: EdgeInterceptor | None) -> dict[str, grpc.RpcMethodHandler]:
    """The servicer's handlers by method name, wrapped in the edge's checks as the threaded server wraps them."""
    capture = _Capture()
    pb_grpc.add_DecisionServiceServicer_to_server(servicer, capture)
    if edge is None:
        return capture.handlers
    return {name: edge.intercept_service(functools.partial(_same, h), _CallDetails(f"/{wire.SERVICE_NAME}/{name}"))
            for name, h in capture.handlers.items()}


def _same(handler: grpc.RpcMethodHandler, _details: Any) -> grpc.RpcMethodHandler:
    return handler


class SplitDecisionServer:
    """DecisionService, health and reflection served by a front process, decided in this one.

    Parameters
    ----------
    servicer
        The DecisionService methods (the same object the other server kinds serve).
    address, max_message_bytes, reuse_port
        Where the front process listens, and its message size limit and ``SO_REUSEPORT``.
    tls, base
        TLS as configured (plaintext when None) and the directory its relative paths start from:
        the front process builds its own credentials from them.
    edge
        The request checks, limits and tracing every call goes through.
    pool_threads
        Threads for the calls that may wait (Explain, reloads, telemetry streams, other outcomes).
    """

    def __init__(self, servicer: DecisionServicer, *, address: str, max_message_bytes: int = 4 * 1024 * 1024,
                 reuse_port: bool = False, tls: TlsConfig | None = None, base: Path = Path("."),
                 edge: EdgeInterceptor | None = None, pool_threads: int = 4) -> None:
        self.servicer = servicer
        handlers = method_handlers(servicer, edge)
        self._methods = [handlers[name] for name in wire.METHODS]
        (stream_method,) = wire.STREAMING
        self._stream_parser = handlers[stream_method].request_deserializer
        self._spec = {"address": address, "max_message_bytes": max_message_bytes, "reuse_port": reuse_port,
                      "tls": tls.model_dump(mode="json") if tls is not None else None, "base": str(base)}
        self._send_lock = threading.Lock()
        # Calls in the service's hands, by (front generation, call id): a replacement front numbers
        # its calls from 1 again, and a dead front's late replies must never answer its calls.
        self._live: dict[tuple[int, int], _CallContext] = {}
        self._streams: dict[tuple[int, int], queue.SimpleQueue[Any]] = {}
        self._gen = 0
        self._serving: dict[str, bool] = {}  # what set_serving last said, for a replacement front
        self._deaths: list[float] = []
        self.restarts = 0
        self._stopping = False
        self._lost: str | None = None  # why DecisionService is no longer served, once it is not
        front = self._start_front(address)
        self._sock, self._proc, self.port, self._early, self._buf = front.sock, front.proc, front.port, \
            front.frames, front.partial
        self._pool = ThreadPoolExecutor(pool_threads, thread_name_prefix="grpc-split-pool")
        self._thread = threading.Thread(target=self._serve, name="grpc-split", daemon=True)
        self._thread.start()

    def _start_front(self, address: str) -> _Started:
        """A front process listening on ``address``."""
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-m", "decision.split_front", str(theirs.fileno()),
                                 json.dumps({**self._spec, "address": address})], pass_fds=(theirs.fileno(),))
        theirs.close()
        try:
            return _await_ready(ours, proc)
        except BaseException:
            proc.kill()
            proc.wait()
            ours.close()
            raise

    def set_serving(self, service: str, serving: bool) -> None:
        """Report ``service`` SERVING or NOT_SERVING to health checks (from any thread)."""
        self._serving[service] = serving
        with contextlib.suppress(OSError):  # the front is gone: nothing serves health; /healthz says why
            self._send(wire.frame(wire.SERVING, 0, bytes([serving]) + service.encode()))

    def stop(self, grace_s: float = 1.0) -> None:
        """Report NOT_SERVING, let calls in flight finish within ``grace_s``, stop the front process."""
        self._stopping = True
        with contextlib.suppress(OSError):  # the front process already gone: nothing to stop
            self._send(wire.frame(wire.STOP, 0, stop_payload(grace_s)))
        self._thread.join(timeout=grace_s + 30.0)
        try:
            self._proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._pool.shutdown(wait=True)
        self._sock.close()

    # -- the forwarded calls -------------------------------------------------------------------

    def _send(self, data: bytes, gen: int | None = None) -> None:
        """Send to the front; a reply to the calls of generation ``gen`` only to that front (a
        replacement's calls have the same ids: a late reply to a dead front's call is dropped)."""
        with self._send_lock:
            if gen is None or gen == self._gen:
                self._sock.sendall(data)

    def _serve(self) -> None:
        try:
            frames = self._early
            while self._forward(frames) and self._replaced():
                frames = self._early
        except Exception:  # a fault of ours: without this thread nothing answers the front
            log.exception("split server: forwarding calls failed")
        finally:
            for q in self._streams.values():
                q.put(_END)
            if not self._stopping:
                # The front stops when its end of the socket does: its callers get UNAVAILABLE now, not
                # at their deadlines, and an orchestrator reads the reason on /healthz.
                self._lost = "the gRPC front process's connection ended"  # health fails from now on
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                self._lost = f"gRPC front process exited (status {_exit_status(self._proc)})"
                log.error("%s: DecisionService is no longer served", self._lost)

    def _forward(self, frames: list[tuple[int, int, bytes]]) -> bool:
        """Answer the front's calls (``frames`` first) until its connection ends; True if it ended
        while this server was not stopping (the front died)."""
        try:
            while True:
                replies = self._handle(frames)
                if replies:
                    self._send(b"".join(replies))
                data = self._sock.recv(READ_SIZE)
                if not data:
                    break
                self._buf += data
                frames, _ = wire.split_frames(self._buf)
        except OSError as exc:
            if not self._stopping:
                log.error("gRPC front process connection failed: %s", exc)
        return not self._stopping

    def _replaced(self) -> bool:
        """A new front on the same port after the last one died; False when fronts keep dying (or
        this server is stopping, or the new one cannot listen): then nothing serves DecisionService."""
        if self._stopping:
            return False
        status = _exit_status(self._proc)
        if status is None:  # its socket closed but it lives on (wedged): it must not keep the port
            self._proc.kill()
            status = self._proc.wait()
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < _RESTART_WINDOW_S] + [now]
        if len(self._deaths) > _RESTARTS_PER_WINDOW:
            log.error("gRPC front process exited (status %s), the %d. time in %.0f s: not starting another",
                      status, len(self._deaths), _RESTART_WINDOW_S)
            return False
        gen = self._gen
        # The dead front's callers have their errors already: stop working for them.
        for key, ctx in list(self._live.items()):
            if key[0] == gen:
                ctx.cancelled = True
        for key, q in list(self._streams.items()):
            if key[0] == gen:
                q.put(_END)
        host = str(self._spec["address"])
        address = f"{host.rpartition(':')[0]}:{self.port}" if host.endswith(":0") else host  # the same port
        log.error("gRPC front process exited (status %s); starting another on %s", status, address)
        try:
            front = self._start_front(address)
        except OSError as exc:
            log.error("gRPC front process could not be replaced: %s", exc)
            return False
        with self._send_lock:
            old, self._sock, self._proc = self._sock, front.sock, front.proc
            self._gen += 1
        old.close()
        self._buf, self._early = front.partial, front.frames
        self.restarts += 1
        for service, serving in list(self._serving.items()):  # health as this process last reported it
            self.set_serving(service, serving)
        if self._stopping:  # stop() came while the new front started: it told the dead one
            with contextlib.suppress(OSError):
                self._send(wire.frame(wire.STOP, 0, stop_payload(0.0)))
        return True

    def problem(self) -> str | None:
        """Why DecisionService is no longer served (its front process went away), or None."""
        return self._lost

    def _handle(self, frames: list[tuple[int, int, bytes]]) -> list[bytes]:
        # A call cancelled in the same read is not worked on (its caller has gone).
        cancelled = {cid for kind, cid, _ in frames if kind == wire.CANCEL}
        replies: list[bytes] = []
        for kind, cid, payload in frames:
            if kind == wire.CALL:
                reply = self._call(cid, payload, cid in cancelled)
                if reply is not None:
                    replies.append(reply)
            elif kind == wire.MESSAGE:
                q = self._streams.get((self._gen, cid))
                if q is not None:  # else the stream was answered already (a bad batch)
                    q.put(self._stream_parser(payload))
            elif kind == wire.END:
                q = self._streams.get((self._gen, cid))
                if q is not None:
                    q.put(_END)
            elif kind == wire.CANCEL:
                ctx = self._live.get((self._gen, cid))
                if ctx is not None:
                    ctx.cancelled = True
                    q = self._streams.get((self._gen, cid))
                    if q is not None:
                        q.put(_END)
        return replies

    def _call(self, cid: int, payload: bytes, cancelled: bool) -> bytes | None:
        """A call's reply frame when answered here and now, else None (it runs on the pool)."""
        try:
            method, left, metadata, body = wire.decode_call(payload)
            name = wire.METHODS[method]
        except (struct.error, IndexError, UnicodeDecodeError):
            log.error("gRPC front process sent a malformed call frame")
            return _reply(cid, grpc.StatusCode.INTERNAL.value[0], (), b"malformed call frame")
        if cancelled:  # its caller left before it was read: nobody waits for the work
            return _reply(cid, grpc.StatusCode.CANCELLED.value[0], (), b"the caller cancelled")
        handler = self._methods[method]
        ctx = _CallContext(metadata, left)
        key = (self._gen, cid)
        if name in wire.STREAMING:
            messages: queue.SimpleQueue[Any] = queue.SimpleQueue()
            self._streams[key] = messages
            self._live[key] = ctx
            self._pool.submit(self._stream_call, key, handler, ctx, messages)
            return None
        request = handler.request_deserializer(body)
        if name == "Decide" or (name == "ReportOutcome" and self._held(request)):
            return _run(cid, ctx, handler, lambda: handler.unary_unary(request, ctx))
        self._live[key] = ctx
        self._pool.submit(self._pooled_call, key, ctx, handler, request)
        return None

    def _held(self, request: Any) -> bool:
        decision_id = getattr(request, "decision_id", None)
        return isinstance(decision_id, str) and self.servicer.engine.holds(decision_id)

    def _pooled_call(self, key: tuple[int, int], ctx: _CallContext, handler: grpc.RpcMethodHandler,
                     request: Any) -> None:
        gen, cid = key
        try:
            self._send(_run(cid, ctx, handler, lambda: handler.unary_unary(request, ctx)), gen)
        except OSError:
            pass  # the front process is gone; its callers have their errors
        finally:
            self._live.pop(key, None)

    def _stream_call(self, key: tuple[int, int], handler: grpc.RpcMethodHandler, ctx: _CallContext,
                     messages: queue.SimpleQueue[Any]) -> None:
        def requests() -> Iterator[Any]:
            while (m := messages.get()) is not _END:
                yield m

        gen, cid = key
        try:
            self._send(_run(cid, ctx, handler, lambda: handler.stream_unary(requests(), ctx)), gen)
        except OSError:
            pass
        finally:
            self._streams.pop(key, None)
            self._live.pop(key, None)


class _Started(NamedTuple):
    """A front process that listens, and what followed its READY in the same read (it serves as
    soon as it listens: a caller's first call may come right behind): whole frames, then the start
    of one."""

    sock: socket.socket
    proc: subprocess.Popen[bytes]
    port: int
    frames: list[tuple[int, int, bytes]]
    partial: bytearray


def _await_ready(sock: socket.socket, proc: subprocess.Popen[bytes]) -> _Started:
    """The front started on the other end of ``sock``, once it says it listens."""
    buf = bytearray()
    sock.settimeout(_START_TIMEOUT_S)
    try:
        while True:
            data = sock.recv(READ_SIZE)
            if not data:
                raise OSError(f"gRPC front process exited before it listened (exit status {proc.wait()})")
            buf += data
            frames, _ = wire.split_frames(buf)
            for i, (kind, _call, payload) in enumerate(frames):
                if kind == wire.FAILED:
                    raise OSError(payload.decode(errors="replace"))
                if kind == wire.READY:
                    return _Started(sock, proc, int(struct.unpack("<I", payload)[0]), frames[i + 1:], buf)
    except TimeoutError:
        raise OSError(f"gRPC front process did not listen within {_START_TIMEOUT_S:.0f} s") from None
    finally:
        sock.settimeout(None)


def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(timeout=2.0)  # the socket closes as the process ends: its status follows
    except subprocess.TimeoutExpired:
        return None


def _reply(cid: int, code: int, trailers: Sequence[tuple[str, str | bytes]], body: bytes) -> bytes:
    return wire.frame(wire.REPLY, cid, wire.encode_reply(code, trailers, body))


def _run(cid: int, ctx: _CallContext, handler: grpc.RpcMethodHandler, call: Callable[[], Any]) -> bytes:
    """The reply frame for one call: its response, the status it aborted with, or UNAVAILABLE."""
    try:
        response = call()
    except CallAborted as a:
        return _reply(cid, a.code.value[0], ctx.trailers, a.details.encode())
    except Exception:  # the servicer maps its own errors; anything else is ours
        log.exception("forwarded call failed")
        return _reply(cid, _UNAVAILABLE, (), b"internal failure (logged); retry")
    return _reply(cid, 0, (), handler.response_serializer(response))
