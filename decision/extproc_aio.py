"""The ext_proc endpoint picker on grpcio's asyncio server, in a thread of its own.

Every HTTP request through Envoy is one or two bidirectional ext_proc streams. grpcio's threaded
server hands each stream message from its completion-queue thread to a pool thread and back
(queues, condition variables, GIL hand-offs), which costs more than the decision itself. The
asyncio server runs a stream's messages on one event loop: the same steps
(:meth:`ExtProcServicer.handle`, ``after_replies``, ``finished``), fewer hand-offs. The decision
is CPU work under the GIL either way, so running it inline on the loop loses nothing.

The loop lives in a daemon thread, so the rest of the service (threaded gRPC, HTTP) is unchanged.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from decision.extproc import ExtProcServicer
from decision.extproc_config import EXTPROC_SERVICE

T = TypeVar("T")


class AioExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Drives :class:`ExtProcServicer`'s sans-I/O steps from an asyncio stream."""

    def __init__(self, core: ExtProcServicer) -> None:
        self.core = core

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.ProcessingResponse]:
        core = self.core
        st = core.open_stream()
        try:
            async for req in request_iterator:
                replies = core.handle(st, req)
                for reply in replies:
                    yield reply
                core.after_replies(st)
                if core.finished(st, req, replies):
                    return
        finally:
            core.close_stream(st)


class AioExtProcServer:
    """An asyncio gRPC server (ext_proc, health, reflection) running on a loop in its own thread."""

    def __init__(self, core: ExtProcServicer, address: str, *, max_streams: int,
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self.servicer = core
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="extproc-aio", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = self._call(self._start(address, max_streams, credentials))

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, address: str, max_streams: int, credentials: grpc.ServerCredentials | None) -> int:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", max_streams)])
        pb_grpc.add_ExternalProcessorServicer_to_server(AioExtProcServicer(self.servicer), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in ("", "liveness", "readiness", EXTPROC_SERVICE):  # the names endpoint pickers are probed by
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME), server)
        port = server.add_secure_port(address, credentials) if credentials is not None \
            else server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"cannot bind the ext_proc server to {address}")
        await server.start()
        self._server = server
        return int(port)

    def stop(self, grace_s: float = 1.0) -> None:
        async def _stop() -> None:
            await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while streams drain
            if self._server is not None:
                await self._server.stop(grace_s)

        try:
            self._call(_stop(), timeout=grace_s + 30.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
            self._loop.close()
