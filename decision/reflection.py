"""gRPC server reflection under both of its names: ``grpc.reflection.v1`` and ``v1alpha``.

Current tools (grpcurl, buf curl, grpcui, Postman) ask ``v1`` first; some older ones know only
``v1alpha``. grpcio-reflection ships ``v1alpha`` alone. The two are one protocol: the same messages
with the same field numbers, only the package renamed, so ``v1alpha``'s servicer answers ``v1``
calls byte for byte. For ``describe grpc.reflection.v1.ServerReflection`` to work as well, the
``v1`` file (grpclib's copy) is registered in the default descriptor pool.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
METHOD = "ServerReflectionInfo"


@functools.cache
def register_v1_descriptor() -> None:
    """Have the ``grpc.reflection.v1`` protocol in the default descriptor pool (once).

    grpclib (a dependency, the ext_proc server) ships it: importing that module registers it, and
    any later import of it is then a no-op rather than a clash with a copy of our own.
    """
    import grpclib.reflection.v1.reflection_pb2  # noqa: F401  (registers grpc.reflection.v1)


def reflected(services: Iterable[str]) -> tuple[str, ...]:
    """``services`` and both reflection services: what ``list`` answers.

    >>> reflected(["infermesh.decision.v1.DecisionService"])[-2:]
    ('grpc.reflection.v1.ServerReflection', 'grpc.reflection.v1alpha.ServerReflection')
    """
    return (*services, *SERVICE_NAMES)


def enable_reflection(services: Iterable[str], server: grpc.Server | grpc.aio.Server) -> None:
    """Serve reflection for ``services`` (both reflection services are added) under both names, on a
    grpcio server, threaded or asyncio."""
    names = reflected(services)
    register_v1_descriptor()
    reflection.enable_server_reflection(names, server)  # v1alpha
    servicer: Any = (reflection.aio.ReflectionServicer(names) if isinstance(server, grpc.aio.Server)
                     else reflection.ReflectionServicer(names))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        METHOD: grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def method_paths() -> tuple[str, ...]:
    """``/<service>/ServerReflectionInfo`` for both names (for servers that map paths themselves)."""
    register_v1_descriptor()
    return tuple(f"/{name}/{METHOD}" for name in SERVICE_NAMES)

