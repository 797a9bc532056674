"""The decision API on grpcio's asyncio server, on an event loop in a thread of its own.

grpcio's threaded server hands every call from its completion-queue thread to a pool thread
and back; under concurrency those hand-offs (queues, condition variables, the GIL passed
between dozens of threads) cost more than the decision, and throughput at 50 concurrent calls
fell below that at one. On the asyncio server a call's request, handler and response run on one
loop. The handlers are the threaded servicer's own methods (:class:`DecisionServicer`), run
inline (a decision is CPU work under the GIL either way), except ``Explain`` and
``ReloadPolicies``, which wait on the database or the disk and run in a worker thread, and
``ReportOutcome`` for a decision this process does not hold (it asks the audit log). The edge
checks (:class:`~decision.edge.EdgeInterceptor`) are the same code, through a context adapter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc

from decision.edge import EdgeInterceptor, request_parser, wrap_once
from decision.errors import DecisionError
from decision.grpc_server import SERVICE_NAME, DecisionServicer
from decision.grpc_serving import CallAborted, LoopServer
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

T = TypeVar("T")


class _ContextAdapter:
    """What the threaded servicer and edge read of a context, over an asyncio one.

    ``abort`` raises :class:`CallAborted` (the asyncio context's own abort is a coroutine) and trailing
    metadata is kept here until the loop applies it, so the adapter also works from a worker thread.
    """

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self.trailers: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailers = tuple(metadata)

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise CallAborted(code, details)

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata() or ()

    def time_remaining(self) -> float | None:
        remaining = self._context.time_remaining()
        return None if remaining is None else float(remaining)

    def is_active(self) -> bool:
        return not self._context.cancelled()


async def _answer(context: grpc.aio.ServicerContext[Any, Any], adapter: _ContextAdapter,
                  call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call``; an abort it asked for becomes the status (with its trailers) on ``context``."""
    try:
        return await call()
    except CallAborted as a:
        if adapter.trailers:
            context.set_trailing_metadata(adapter.trailers)
        await context.abort(a.code, a.details)
        raise AssertionError("unreachable") from None  # context.abort raises


class AioDecisionServicer(pb_grpc.DecisionServiceServicer):
    """:class:`DecisionServicer`'s methods, served from an asyncio server."""

    def __init__(self, sync: DecisionServicer) -> None:
        self.sync = sync

    async def _inline(self, method: Callable[[Any, Any], T], request: Any,
                      context: grpc.aio.ServicerContext[Any, Any]) -> T:
        adapter = _ContextAdapter(context)

        async def call() -> T:
            return method(request, adapter)

        return await _answer(context, adapter, call)

    async def _in_thread(self, method: Callable[[Any, Any], T], request: Any,
                         context: grpc.aio.ServicerContext[Any, Any]) -> T:
        adapter = _ContextAdapter(context)
        return await _answer(context, adapter, lambda: asyncio.to_thread(method, request, adapter))

    async def Decide(self, request: pb.DecideRequest, context: Any) -> pb.DecideResponse:
        return await self._inline(self.sync.Decide, request, context)

    async def ReportOutcome(self, request: pb.Outcome, context: Any) -> pb.OutcomeAck:
        # An outcome of a decision this process holds is answered from memory, inline; any other
        # (another worker's, one from before a restart) asks the audit log: off the loop, which
        # would otherwise stall every call for as long as the database takes.
        if self.sync.engine.holds(request.decision_id):
            return await self._inline(self.sync.ReportOutcome, request, context)
        return await self._in_thread(self.sync.ReportOutcome, request, context)

    async def Explain(self, request: pb.ExplainRequest, context: Any) -> pb.Trace:
        return await self._in_thread(self.sync.Explain, request, context)

    async def ReloadPolicies(self, request: pb.ReloadPoliciesRequest, context: Any) -> pb.ReloadPoliciesResponse:
        return await self._in_thread(self.sync.ReloadPolicies, request, context)

    async def PushTelemetry(self, request_iterator: AsyncIterator[pb.TelemetryBatch],
                            context: Any) -> pb.TelemetryAck:
        sync = self.sync
        adapter = _ContextAdapter(context)

        def raise_(error: DecisionError) -> Callable[[], NoReturn]:
            def fail() -> NoReturn:
                raise error
            return fail

        def ingest(index: int, accepted: int, batch: pb.TelemetryBatch) -> Callable[[], int]:
            return lambda: sync.ingest_stream_batch(index, accepted, batch)

        async def call() -> pb.TelemetryAck:
            accepted = batches = 0  # batches: those stored so far, so also the index of the next
            try:
                async for batch in request_iterator:
                    accepted += sync._guarded("PushTelemetry", adapter, ingest(batches, accepted, batch))
                    batches += 1
            except DecisionError as exc:  # raised by the edge's per-message checks
                sync._guarded("PushTelemetry", adapter, raise_(sync.push_refused(batches, accepted, exc)))
            return sync.telemetry_ack(accepted, batches)

        return await _answer(context, adapter, call)


class AioEdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio ships no stubs
    """:class:`EdgeInterceptor`'s checks and tracing around the asyncio handlers."""

    def __init__(self, edge: EdgeInterceptor) -> None:
        self.edge = edge
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # see wrap_once

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        return wrap_once(self._cache, handler_call_details.method, handler, self._wrap)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        edge = self.edge
        name = method.rsplit("/", 1)[1]
        parse = request_parser(handler)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                adapter = _ContextAdapter(context)

                async def call() -> Any:
                    edge._admit(name, adapter, request)
                    with edge.call_scope(method, name, adapter) as note:
                        response = await inner(request, context)
                        note(response)
                        return response

                return await _answer(context, adapter, call)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=parse,
                                                       response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            inner_s = handler.stream_unary

            async def stream(request_iterator: AsyncIterator[Any], context: Any) -> Any:
                adapter = _ContextAdapter(context)

                async def call() -> Any:
                    edge._admit(name, adapter, None)
                    with edge.call_scope(method, name, adapter):
                        return await inner_s(_checked(request_iterator, edge), context)

                return await _answer(context, adapter, call)

            return grpc.stream_unary_rpc_method_handler(stream, request_deserializer=parse,
                                                        response_serializer=handler.response_serializer)
        return handler  # no other shapes in this service


async def _checked(messages: AsyncIterator[Any], edge: EdgeInterceptor) -> AsyncIterator[Any]:
    # Raised inside the servicer's loop, so its error mapping names the item.
    i = 0
    async for m in messages:
        yield edge.checked_message(i, m)
        i += 1


class AioDecisionServer(LoopServer):
    """DecisionService, health and reflection on an asyncio server whose loop runs in its own thread."""

    def __init__(self, servicer: DecisionServicer, *, address: str, max_message_bytes: int = 4 * 1024 * 1024,
                 reuse_port: bool = False, credentials: grpc.ServerCredentials | None = None,
                 edge: EdgeInterceptor | None = None) -> None:
        self.servicer = servicer
        super().__init__(
            name="grpc-aio", address=address, credentials=credentials,
            register=lambda server: pb_grpc.add_DecisionServiceServicer_to_server(AioDecisionServicer(servicer),
                                                                                server),
            serving=("", SERVICE_NAME), reflected=(SERVICE_NAME,), what="gRPC server",
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes),
                     ("grpc.so_reuseport", 1 if reuse_port else 0)],
            interceptors=[AioEdgeInterceptor(edge)] if edge is not None else [])
