"""gRPC server reflection under both of its names: ``grpc.reflection.v1`` and ``v1alpha``.

Current tools (grpcurl, buf curl, grpcui, Postman) ask ``v1`` first; some older ones know only
``v1alpha``. grpcio-reflection ships ``v1alpha`` alone. The two are one protocol: the same messages
with the same field numbers, only the package renamed, so ``v1alpha``'s servicer answers ``v1``
calls byte for byte. For ``describe grpc.reflection.v1.ServerReflection`` to work as well, the
``v1`` file is registered in the default descriptor pool: ``v1alpha``'s with its package renamed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
METHOD = "ServerReflectionInfo"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


@functools.cache
def register_v1_descriptor() -> None:
    """Add the ``grpc.reflection.v1`` file to the default pool (once; kept if something added it first)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old, new = f".{fdp.package}.", ".grpc.reflection.v1."
    fdp.name, fdp.package = _V1_FILE, "grpc.reflection.v1"
    fdp.ClearField("options")  # v1alpha's java_package and the like name the old package
    for message in fdp.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in fdp.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    pool.Add(fdp)


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

