"""The stored forms of a decision trace, and reading any of them back.

Two forms are stored in ``decision_events.trace_z`` (lz4-compressed by default, see
:mod:`audit.codec`):

* **parts** (``version`` 3), for every decision the engine made: MessagePack
  ``["infermesh-trace", 3, parts]``, where ``parts`` are the trace's parts as
  :class:`audit.shipping.Packer` packs them, every shared object inline and the request masked.
  The audit writer process stores them almost as they arrive (it swaps handles for objects it has
  encoded once), so the writer never assembles a trace; a reader assembles it
  (:func:`decision.trace_format.assemble_trace`) and expands it, as it did the JSON form.
* **JSON** (``version`` 1 or 2), for a trace that arrives already built (a mapping) and for rows
  written before the parts form existed.

The chain hashes whatever bytes are stored, so either form is verified the same way.

>>> from audit.masking import Masker
>>> stored = encode_trace({"version": 2, "request": {"session_id": "s"}}, Masker(["session_id"], mode="remove"))
>>> stored
b'{"version":2,"request":{}}'
>>> read_trace(stored)["request"]
{}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from audit.codec import decode_json, encode_json
from audit.masking import Masker
from audit.shipping import InlinePacker, encode_value, unpack_parts
from decision.trace_format import TraceParts, assemble_trace, expand_trace

MARK = "infermesh-trace"
PARTS_VERSION = 3
STORED_TRACE = "stored_trace"  # an event's key for its stored trace bytes, when made before the writer
_decoder = msgspec.msgpack.Decoder()


_INLINE = InlinePacker()  # keeps no state: every object goes inline


def encode_parts(parts: TraceParts, masker: Masker) -> bytes:
    """The parts form of a trace built in this process (objects inline, request masked)."""
    return stored_from_packed(_INLINE.pack(parts), masker)


def stored_from_packed(packed: Sequence[Any], masker: Masker) -> bytes:
    """The parts form from packed parts with no handles left (see
    :meth:`audit.shipping.Unpacker.stored_parts`); item 0, the request, is masked here."""
    t = list(packed)
    t[0] = masker.mask_request(t[0])
    return encode_value([MARK, PARTS_VERSION, t])


def encode_trace(trace: Any, masker: Masker) -> bytes:
    """The stored bytes (before compression) of a trace: the parts form when it can give its parts
    (:class:`decision.engine.LazyTrace`), else JSON of the masked mapping (``None``: an empty one)."""
    gather = getattr(trace, "parts", None)
    parts = gather() if callable(gather) else None
    if parts is not None:
        return encode_parts(parts, masker)
    return encode_json(masker.mask_trace(trace if isinstance(trace, Mapping) else {}))


def is_parts(stored: bytes) -> bool:
    """Whether stored trace bytes (uncompressed) are the parts form (JSON starts with ``{``)."""
    return stored[:1] != b"{"


def parts_of(stored: bytes) -> TraceParts:
    """The parts of a trace stored in the parts form."""
    doc = _decoder.decode(stored)
    if not (isinstance(doc, list) and len(doc) == 3 and doc[0] == MARK):
        raise ValueError("not a stored trace")
    if doc[1] != PARTS_VERSION:
        raise ValueError(f"unsupported stored trace version {doc[1]!r}")
    return unpack_parts(doc[2], _inline)


def _inline(x: Any) -> Any:
    return x


def stored_dict(stored: bytes) -> dict[str, Any]:
    """The stored trace as a version-2 (or older) mapping, whatever its form."""
    if is_parts(stored):
        return assemble_trace(parts_of(stored))
    out: dict[str, Any] = decode_json(stored)
    return out


def read_trace(stored: bytes) -> dict[str, Any]:
    """The readable shape of stored trace bytes (uncompressed), whatever their form."""
    return expand_trace(stored_dict(stored))
