"""What every gRPC server of the service does the same way: bind a port, and (for the asyncio
servers) run on an event loop in a thread of its own (:class:`LoopThread`) with health and reflection.

The decision API (:mod:`decision.grpc_aio`) and the Envoy ext_proc picker
(:mod:`decision.extproc_aio`) differ only in the services they register and the health names
they report serving; the loop thread, start-up and graceful stop are this module's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from decision.reflection import enable_reflection

T = TypeVar("T")


def bind_port(server: Any, address: str, credentials: grpc.ServerCredentials | None, what: str,
              error: type[Exception] = OSError) -> int:
    """Bind ``server`` (threaded or asyncio) to ``address``, with TLS when ``credentials`` are given."""
    port = server.add_secure_port(address, credentials) if credentials is not None \
        else server.add_insecure_port(address)
    if port == 0:
        raise error(f"cannot bind {what} to {address}")
    return int(port)


class CallAborted(Exception):
    """What a servicer's ``context.abort(code, details)`` raises where the context is ours, not
    grpcio's (an asyncio call run as a threaded one, a call forwarded by a split server's front):
    the caller turns it into the call's status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def health_status(serving: bool) -> int:
    """The ``grpc.health.v1`` status of a service that is (or is not) serving."""
    return int(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)


class LoopThread:
    """An event loop running in a daemon thread, for servers driven from the service's other threads."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop, join its thread, close it (once; later calls do nothing)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)
        self.loop.close()


class LoopServer:
    """A ``grpc.aio`` server with health and reflection, on an event loop in a daemon thread.

    Parameters
    ----------
    name
        The loop thread's name.
    address, credentials
        Where to listen, and TLS or mutual TLS (plaintext when None).
    register
        Adds the server's own services to the ``grpc.aio.Server``.
    serving
        Health service names reported SERVING from the start.
    reflected
        Full names of the services listed by reflection (health and reflection are added).
    what, bind_error
        How a failure to bind is reported.
    options, interceptors
        As for ``grpc.aio.server``.
    """

    def __init__(self, *, name: str, address: str, credentials: grpc.ServerCredentials | None,
                 register: Callable[[grpc.aio.Server], None], serving: Sequence[str], reflected: Sequence[str],
                 what: str, bind_error: type[Exception] = OSError, options: Sequence[tuple[str, Any]] = (),
                 interceptors: Sequence[Any] = ()) -> None:
        self._loop = LoopThread(name)
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()

        async def start() -> int:
            server = grpc.aio.server(options=list(options), interceptors=list(interceptors))
            register(server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            for service in serving:
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            enable_reflection((*reflected, health.SERVICE_NAME), server)
            port = bind_port(server, address, credentials, what, bind_error)
            await server.start()
            self._server = server
            return port

        self.port = self._loop.call(start())

    def set_serving(self, service: str, serving: bool) -> None:
        """Report ``service`` SERVING or NOT_SERVING to health checks (from any thread)."""
        self._loop.call(self.health.set(service, health_status(serving)))

    def stop(self, grace_s: float = 1.0) -> None:
        """Report NOT_SERVING, let calls in flight finish within ``grace_s``, stop the loop."""
        async def _stop() -> None:
            await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while calls drain
            if self._server is not None:
                await self._server.stop(grace_s)

        try:
            self._loop.call(_stop(), timeout=grace_s + 30.0)
        finally:
            self._loop.close()
