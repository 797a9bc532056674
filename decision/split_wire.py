"""Frames between the gRPC front process and the service's engine (``server.kind: split``).

The front process terminates gRPC (HTTP/2, TLS, health, reflection) and hands each
DecisionService call to the service process as raw request bytes over a Unix socket pair; the
service answers with raw response bytes or a status. A frame is a 9-byte header (kind, call id,
payload length, little-endian) and its payload. Both sides import this module and nothing else of
each other.

Examples
--------
>>> data = frame(CALL, 7, encode_call(0, 1.5, [("x-request-id", "r1")], b"payload"))
>>> frames, rest = split_frames(bytearray(data))
>>> kind, call_id, payload = frames[0]
>>> (kind, call_id, rest)
(1, 7, 0)
>>> decode_call(payload)
(0, 1.5, (('x-request-id', 'r1'),), b'payload')
>>> decode_reply(encode_reply(5, [("infermesh-field", "model")], b"unknown model"))
(5, (('infermesh-field', 'model'),), b'unknown model')
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence

from infermesh.decision.v1 import decision_pb2 as pb

HEADER = struct.Struct("<BII")  # kind, call id, payload length

# front -> service
CALL, MESSAGE, END, CANCEL, READY, FAILED = 1, 2, 3, 4, 5, 6
# service -> front
REPLY, SERVING, STOP = 11, 12, 13

_SERVICE = pb.DESCRIPTOR.services_by_name["DecisionService"]
SERVICE_NAME = _SERVICE.full_name
METHODS = tuple(m.name for m in _SERVICE.methods)  # a call names its method by index in this
STREAMING = frozenset(m.name for m in _SERVICE.methods if m.client_streaming)  # the rest are unary

_CALL = struct.Struct("<Bd")  # method index, seconds left (NaN: no deadline)
_COUNT = struct.Struct("<H")
_KEY = struct.Struct("<HIB")  # key length, value length, value is bytes (a "-bin" key)
_STATUS = struct.Struct("<B")

Metadata = tuple[tuple[str, str | bytes], ...]


def frame(kind: int, call_id: int, payload: bytes = b"") -> bytes:
    """One frame: header and payload."""
    return HEADER.pack(kind, call_id, len(payload)) + payload


def split_frames(buf: bytearray) -> tuple[list[tuple[int, int, bytes]], int]:
    """The whole frames at the start of ``buf`` and how many bytes they took (the rest is a partial frame)."""
    out: list[tuple[int, int, bytes]] = []
    pos, n, size = 0, len(buf), HEADER.size
    while n - pos >= size:
        kind, call_id, length = HEADER.unpack_from(buf, pos)
        end = pos + size + length
        if end > n:
            break
        out.append((kind, call_id, bytes(buf[pos + size:end])))
        pos = end
    del buf[:pos]
    return out, len(buf)


def _encode_pairs(pairs: Iterable[tuple[str, str | bytes]]) -> bytes:
    items = list(pairs)
    parts = [_COUNT.pack(len(items))]
    for key, value in items:
        k = key.encode()
        v, binary = (value, 1) if isinstance(value, bytes) else (value.encode(), 0)
        parts += [_KEY.pack(len(k), len(v), binary), k, v]
    return b"".join(parts)


def _decode_pairs(data: bytes, pos: int) -> tuple[Metadata, int]:
    (count,) = _COUNT.unpack_from(data, pos)
    pos += _COUNT.size
    pairs: list[tuple[str, str | bytes]] = []
    for _ in range(count):
        klen, vlen, binary = _KEY.unpack_from(data, pos)
        pos += _KEY.size
        key = data[pos:pos + klen].decode()
        raw = data[pos + klen:pos + klen + vlen]
        pos += klen + vlen
        pairs.append((key, raw if binary else raw.decode()))
    return tuple(pairs), pos


def encode_call(method: int, seconds_left: float | None, metadata: Iterable[tuple[str, str | bytes]],
                body: bytes) -> bytes:
    """A call's payload: method index, deadline, the caller's metadata, the request message's bytes."""
    left = math.nan if seconds_left is None else seconds_left
    return _CALL.pack(method, left) + _encode_pairs(metadata) + body


def decode_call(payload: bytes) -> tuple[int, float | None, Metadata, bytes]:
    """The inverse of :func:`encode_call`."""
    method, left = _CALL.unpack_from(payload, 0)
    metadata, pos = _decode_pairs(payload, _CALL.size)
    return method, None if math.isnan(left) else left, metadata, payload[pos:]


def encode_reply(code: int, trailers: Sequence[tuple[str, str | bytes]], body: bytes) -> bytes:
    """A reply's payload: status code (0: OK, the body is the response; else the body is the details)."""
    return _STATUS.pack(code) + _encode_pairs(trailers) + body


def decode_reply(payload: bytes) -> tuple[int, Metadata, bytes]:
    """The inverse of :func:`encode_reply`."""
    (code,) = _STATUS.unpack_from(payload, 0)
    trailers, pos = _decode_pairs(payload, _STATUS.size)
    return code, trailers, payload[pos:]
