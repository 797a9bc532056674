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

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from decision.extproc import ExtProcServicer
from decision.extproc_config import EXTPROC_SERVICE, PROBED_NAMES
from decision.grpc_serving import LoopServer


class AioExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Drives :class:`ExtProcServicer`'s sans-I/O steps from an asyncio stream."""

    def __init__(self, core: ExtProcServicer) -> None:
        self.core = core

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],  # grpclib's stream too
                      context: grpc.aio.ServicerContext[Any, Any] | None,
                      ) -> AsyncGenerator[pb.ProcessingResponse, None]:
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


class AioExtProcServer(LoopServer):
    """The ext_proc picker (with health and reflection) on an asyncio server in its own thread."""

    def __init__(self, core: ExtProcServicer, address: str, *, max_streams: int,
                 credentials: grpc.ServerCredentials | None = None, reuse_port: bool = False) -> None:
        self.servicer = core
        super().__init__(
            name="extproc-aio", address=address, credentials=credentials,
            register=lambda server: pb_grpc.add_ExternalProcessorServicer_to_server(AioExtProcServicer(core), server),
            serving=(*PROBED_NAMES, EXTPROC_SERVICE), reflected=(EXTPROC_SERVICE,),
            what="the ext_proc server", bind_error=RuntimeError,
            options=[("grpc.so_reuseport", 1 if reuse_port else 0), ("grpc.max_concurrent_streams", max_streams)])
