"""Rows as stored: trace compression (none, lz4 or zlib) and the hash chain.

A decision row's ``hash`` is ``sha256(prev_hash || canonical(columns) || sha256(trace bytes))``,
where the trace bytes are the stored trace uncompressed, in either of its forms
(:mod:`audit.trace_store`: the parts form, or JSON), and ``canonical`` is the JSON list of the
row's columns in :data:`HASHED_COLUMNS` order. Chains run per (day partition, writer chain id),
numbered by ``seq`` from 1; the first link's ``prev_hash`` is :func:`genesis`. Outcome rows (the
evidence of what a route delivered: TTFT, tokens, errors) have chains of their own, per (UTC day
reported, writer chain id), hashed the same way over :data:`OUTCOME_HASHED_COLUMNS` (no trace:
the digest of empty bytes), starting at :func:`outcome_genesis`. Anyone with the rows can
recompute every link (:mod:`audit.verify`).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import lz4.frame
import msgspec

from audit.events import DecisionEventV1, OutcomeEventV1, from_us


def _enc_hook(obj: Any) -> Any:
    """Mappings and sequences of other types (a lazily built trace, tuples of frozensets...)."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_json = msgspec.json.Encoder(enc_hook=_enc_hook)
_unjson = msgspec.json.Decoder()

# Column order of decision_events as the writer COPYs it.
DECISION_COLUMNS: tuple[str, ...] = (
    "decision_id", "decided_at", "chain_id", "seq", "status", "request_id", "tenant", "user_tier",
    "model", "endpoint_id", "site_id", "region", "tier", "gpu_type", "propensity", "policy_revision",
    "learner", "expected_ttft_ms", "expected_cost_per_1k_tokens", "deny_rules", "reason",
    "decision_us", "event_version", "trace_z", "prev_hash", "hash",
)
DECISION_TYPES: tuple[str, ...] = (
    "text", "timestamptz", "text", "int8", "text", "text", "text", "text",
    "text", "text", "text", "text", "text", "text", "float8", "text",
    "text", "float8", "float8", "text[]", "text",
    "float8", "int4", "bytea", "text", "text",
)
OUTCOME_COLUMNS: tuple[str, ...] = (
    "decision_id", "status", "ttft_ms", "latency_ms", "input_tokens", "output_tokens", "error",
    "reward", "reported_at", "event_version", "chain_id", "seq", "prev_hash", "hash",
)
OUTCOME_TYPES: tuple[str, ...] = (
    "text", "text", "float8", "float8", "int8", "int8", "text", "float8", "timestamptz", "int4",
    "text", "int8", "text", "text",
)
# Every column except the trace bytes and the hashes themselves (the trace enters as its digest).
HASHED_COLUMNS: tuple[str, ...] = DECISION_COLUMNS[:23]
OUTCOME_HASHED_COLUMNS: tuple[str, ...] = OUTCOME_COLUMNS[:12]
# What the outcome reported: everything but its version and chain link.
OUTCOME_CONTENT_COLUMNS: tuple[str, ...] = OUTCOME_COLUMNS[:9]
# Outcome rows written before revision 0004 have no chain columns; replayed spool rows of that
# shape get empty ones (they are stored, and ``audit verify`` counts them as unchained).
LEGACY_OUTCOME_WIDTH = 10


def encode_json(value: Any) -> bytes:
    """Compact JSON (non-finite floats become null)."""
    return _json.encode(value)


def decode_json(data: bytes) -> Any:
    return _unjson.decode(data)


_LZ4_MAGIC = b"\x04\x22\x4d\x18"


def compress_trace(trace_bytes: bytes, level: int = 1, codec: str = "json") -> bytes:
    """The stored trace bytes (JSON or the parts form): ``json`` as they are (PostgreSQL may compress
    them), ``zlib`` at ``level`` (1-9), or an ``lz4`` frame (fast, and small enough that rows stay
    out of TOAST)."""
    if codec == "lz4":
        return bytes(lz4.frame.compress(trace_bytes))
    if codec == "zlib":
        return zlib.compress(trace_bytes, level)
    return trace_bytes


# The uncompressed forms of a stored trace (audit.trace_store) start with these bytes.
_JSON_START = b"{"
_PARTS_START = b"\x93\xafinfermesh-trace"  # MessagePack: an array of 3, a 15-character string


def decompress_trace(trace_z: bytes) -> bytes:
    """The stored trace (JSON or the parts form, :mod:`audit.trace_store`) from stored bytes of any
    compression: none (JSON starts with ``{``, the parts form with its MessagePack header), an lz4
    frame (its magic number) or zlib (``x``).

    >>> forms = [compress_trace(b'{"a":1}', codec=c) for c in ("json", "zlib", "lz4")]
    >>> {decompress_trace(f) for f in forms}
    {b'{"a":1}'}
    """
    if trace_z[:1] == _JSON_START or trace_z.startswith(_PARTS_START):
        return trace_z
    if trace_z[:4] == _LZ4_MAGIC:
        return bytes(lz4.frame.decompress(trace_z))
    return zlib.decompress(trace_z)


def load_trace(trace_z: bytes) -> dict[str, Any]:
    """A stored trace, in any of its forms (:mod:`audit.trace_store`), in its readable shape."""
    from audit.trace_store import read_trace

    return read_trace(decompress_trace(trace_z))


def genesis(day: dt.date, chain_id: str) -> str:
    """The ``prev_hash`` of a chain's first link."""
    return hashlib.sha256(f"infermesh-audit-genesis|{day.isoformat()}|{chain_id}".encode()).hexdigest()


def outcome_genesis(day: dt.date, chain_id: str) -> str:
    """The ``prev_hash`` of an outcome chain's first link (never equal to a decision chain's)."""
    return genesis(day, f"{chain_id}/outcomes")


def link_hash(prev_hash: str, hashed_values: Sequence[Any], trace_bytes: bytes = b"") -> str:
    """One link of a chain. ``hashed_values`` follow :data:`HASHED_COLUMNS` or
    :data:`OUTCOME_HASHED_COLUMNS` (times as µs ints); an outcome has no trace."""
    h = hashlib.sha256(prev_hash.encode())
    h.update(b"\n")
    h.update(_json.encode(list(hashed_values)))
    h.update(b"\n")
    h.update(hashlib.sha256(trace_bytes).digest())
    return h.hexdigest()


_DAY_US = 86_400_000_000


def day_of_us(us: int) -> dt.date:
    """The UTC day of a time in epoch µs (the writer asks for every row: a day is made once).

    >>> day_of_us(0), day_of_us(-1), day_of_us(_DAY_US)
    (datetime.date(1970, 1, 1), datetime.date(1969, 12, 31), datetime.date(1970, 1, 2))
    """
    return _day(us // _DAY_US)


@functools.lru_cache(maxsize=64)
def _day(days: int) -> dt.date:
    return from_us(days * _DAY_US).date()


def hashed_values(e: DecisionEventV1, chain_id: str, seq: int) -> list[Any]:
    return [e.decision_id, e.decided_at_us, chain_id, seq, e.status, e.request_id, e.tenant, e.user_tier,
            e.model, e.endpoint_id, e.site_id, e.region, e.tier, e.gpu_type, e.propensity, e.policy_revision,
            e.learner, e.expected_ttft_ms, e.expected_cost_per_1k_tokens, list(e.deny_rules), e.reason,
            e.decision_us, e.event_version]


def values_from_row(row: Mapping[str, Any], columns: Sequence[str] = HASHED_COLUMNS) -> list[Any]:
    """The hashed values of a stored row (as read back with a dict row factory), in ``columns``
    order (:data:`HASHED_COLUMNS` for a decision, :data:`OUTCOME_HASHED_COLUMNS` for an outcome)."""
    from audit.events import to_us

    out: list[Any] = []
    for c in columns:
        v = row[c]
        if c in ("decided_at", "reported_at"):
            v = to_us(v)
        elif c == "deny_rules":
            v = list(v or [])
        out.append(v)
    return out


def decision_row(e: DecisionEventV1, *, chain_id: str, seq: int, prev_hash: str, trace_bytes: bytes,
                 level: int = 1, codec: str = "json") -> tuple[Any, ...]:
    """The row of one decision, with its chain link; its time (``decided_at``) stays µs, as spooled."""
    values = hashed_values(e, chain_id, seq)
    digest = link_hash(prev_hash, values, trace_bytes)
    return (*values, compress_trace(trace_bytes, level, codec), prev_hash, digest)


def outcome_content(o: OutcomeEventV1) -> list[Any]:
    """What an outcome reported, in :data:`OUTCOME_CONTENT_COLUMNS` order (its time as µs): two
    reports of a decision are the same one when this is equal."""
    return [o.decision_id, o.status, o.ttft_ms, o.latency_ms, o.input_tokens, o.output_tokens, o.error,
            o.reward, o.reported_at_us]


def outcome_row(o: OutcomeEventV1, *, chain_id: str, seq: int, prev_hash: str) -> tuple[Any, ...]:
    """The row of one outcome, with its chain link; its time (``reported_at``) stays µs, as spooled."""
    values = [*outcome_content(o), o.event_version, chain_id, seq]
    return (*values, prev_hash, link_hash(prev_hash, values))
