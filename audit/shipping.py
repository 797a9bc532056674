"""Audit records across a process boundary: shared objects once, handles after that.

A decision's stored trace is mostly made of objects many decisions share and nobody changes
(a placement's endpoint ids and rows, the guard's memoised verdict groups and rules, the
telemetry store's merged readings). :class:`Packer` (service side) replaces each of them with an
integer handle and sends its definition (pickled) the first time it is seen; :class:`Unpacker`
(writer side) keeps the definitions and puts the objects back. What crosses the pipe per decision
is then the request, one buffer of numbers and a few integers, encoded as MessagePack (``encode``
/ ``decode``), so the service pays little for its audit log. The writer process stores the parts
almost as they arrive (:func:`decode_lazy`, :meth:`Unpacker.stored_parts`: handles swapped for
their objects, encoded once each); readers assemble the trace (:mod:`audit.trace_store`).

Handles are never reused. The packer keeps a strong reference to every object it has a handle for
(an ``id()`` must not be recycled while a handle names it); past ``limit`` definitions it starts a
new generation and tells the unpacker to forget handles below a mark, after the records that may
still use them.

>>> p, u = Packer(), Unpacker()
>>> rows = [["site-a", "eu-west"]]
>>> p.ref(rows) == p.ref(rows)
True
>>> msgs = decode(encode(p.message("o", {"decision_id": "d1"}, None)))
>>> [m[0] for m in msgs]
['def', 'r']
>>> [u.feed(m) for m in msgs]
[None, ('o', {'decision_id': 'd1'}, None)]
>>> u.table[0]
[['site-a', 'eu-west']]
"""

from __future__ import annotations

import enum
import pickle
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from decision.domain import RuleInfo, Severity, VerdictTable
from decision.trace_format import TraceParts

# Messages: ["def", pickled [(handle, obj), ...]], ["forget", below], ["r", kind, event, packed parts or None],
# and the writer process's controls ["flush"], ["close"].
Message = Sequence[Any]


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise NotImplementedError(f"cannot ship {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder()


def encode(messages: Sequence[Message]) -> bytes:
    """One batch of messages as bytes."""
    return _encoder.encode(messages)


def encode_value(value: object) -> bytes:
    """Any value as MessagePack, with the wire's conversions (numpy, sets, enums...)."""
    return _encoder.encode(value)


def encode_each(messages: Sequence[Message]) -> list[bytes]:
    """Each message as its own MessagePack bytes, for :func:`join`.

    An outbox of bytes costs the cyclic collector nothing (bytes are not tracked); an outbox of
    the messages' nested lists and dicts made it walk them in every young collection, and
    promoted them to be walked again.
    """
    return [_encoder.encode(m) for m in messages]


def join(encoded: Sequence[bytes]) -> bytes:
    """One batch, as :func:`encode` makes it, from messages encoded one by one (a MessagePack array32).

    >>> msgs = [("r", "o", {"decision_id": "d1"}, None), ("flush",)]
    >>> decode(join(encode_each(msgs))) == decode(encode(msgs)) == [["r", "o", {"decision_id": "d1"}, None], ["flush"]]
    True
    """
    return b"\xdd" + len(encoded).to_bytes(4, "big") + b"".join(encoded)


def decode(blob: bytes) -> list[Message]:
    """A batch of messages back (tuples come back as lists)."""
    out: list[Message] = _decoder.decode(blob)
    return out


_raw_batch = msgspec.msgpack.Decoder(list[list[msgspec.Raw]])
_raw_items = msgspec.msgpack.Decoder(list[msgspec.Raw])
_NIL = msgspec.Raw(b"\xc0")


def decode_lazy(blob: bytes) -> list[Message]:
    """A batch of messages back, as :func:`decode` gives them except that each record's packed
    trace parts stay encoded (a :class:`msgspec.Raw`, or None) for :meth:`Unpacker.stored_parts`.

    >>> decode_lazy(encode([*Packer().message("o", {"decision_id": "d1"}, None), ("flush",)]))
    [['r', 'o', {'decision_id': 'd1'}, None], ['flush']]
    """
    out: list[Message] = []
    for items in _raw_batch.decode(blob):
        tag = _decoder.decode(items[0])
        if tag == "r":
            out.append(["r", _decoder.decode(items[1]), _decoder.decode(items[2]),
                        None if items[3] == _NIL else items[3]])
        else:
            out.append([tag, *(_decoder.decode(i) for i in items[1:])])
    return out


class Members(tuple[int, ...]):
    """The definition of a list of shared objects: its members' handles."""

    __slots__ = ()


class Packer:
    """Service side: turns records into messages with handles for shared objects (thread-safe)."""

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._by_id: dict[int, tuple[int, object]] = {}
        self._by_members: dict[tuple[int, ...], tuple[int, list[object]]] = {}
        self._pending: list[tuple[int, object]] = []
        self._seen: dict[int, object] = {}  # seen once, not defined yet (see ref_if_shared)
        self._next = 0
        # Definitions of the previous generation, kept until the next one starts: batches the writer
        # has not confirmed may still use them, and a replacement writer is sent them again.
        self.previous: list[tuple[int, object]] = []

    def ref(self, obj: object) -> int:
        """The handle of a shared immutable object, defining it on first sight."""
        hit = self._by_id.get(id(obj))
        if hit is not None and hit[1] is obj:
            return hit[0]
        h = self._next
        self._next += 1
        self._by_id[id(obj)] = (h, obj)
        self._pending.append((h, obj))
        return h

    def ref_members(self, seq: Sequence[object]) -> int:
        """The handle of a list of shared objects (a fresh list whose members recur as a whole).

        Its definition lists its members' handles, so when one member changes (one endpoint's
        telemetry) only that member is sent again.
        """
        key = tuple(map(id, seq))
        hit = self._by_members.get(key)
        if hit is not None:
            return hit[0]
        handles = Members(self.ref(m) for m in seq)
        h = self._next
        self._next += 1
        self._by_members[key] = (h, list(seq))  # holds the members, so their ids stay theirs
        self._pending.append((h, handles))
        return h

    def ref_if_shared(self, obj: object) -> int | object:
        """A handle for an object seen before, else the object itself (sent inline).

        For objects that may or may not recur (a guard's verdict groups are memoised by the policy
        guard, built fresh per decision by the built-in one): defining every fresh one would pickle
        it and keep it alive for nothing.
        """
        hit = self._by_id.get(id(obj))
        if hit is not None and hit[1] is obj:
            return hit[0]
        seen = self._seen.get(id(obj))
        if seen is not None and seen is obj:
            return self.ref(obj)
        if len(self._seen) >= 4096:
            self._seen.clear()
        self._seen[id(obj)] = obj
        return obj

    def take_definitions(self) -> list[tuple[int, object]]:
        out, self._pending = self._pending, []
        return out

    def _current(self) -> list[tuple[int, object]]:
        """This generation's definitions (lists of readings as their members, not as handles)."""
        return [*self._by_id.values(), *self._by_members.values()]

    def all_definitions(self) -> Message:
        """Every live definition as one message (for a new writer process)."""
        with self._lock:
            defs = sorted(self.previous + self._current(), key=lambda d: d[0])
            return ("def", pickle.dumps(defs, protocol=pickle.HIGHEST_PROTOCOL))

    def message(self, kind: str, event: Mapping[str, Any], parts: TraceParts | None) -> list[Message]:
        """The messages for one record: definitions it introduces, then the record."""
        with self._lock:
            packed = self._pack(parts) if parts is not None else None
            out: list[Message] = []
            defs = self.take_definitions()
            if defs:
                out.append(("def", pickle.dumps(defs, protocol=pickle.HIGHEST_PROTOCOL)))
            out.append(("r", kind, event, packed))
            if len(self._by_id) + len(self._by_members) > self.limit:
                self.previous = self._current()
                self._by_id.clear()
                self._by_members.clear()
                out.append(("forget", self._next))
            return out

    def _pack(self, p: TraceParts) -> list[Any]:
        # This layout is also the stored parts form (audit.trace_store, PARTS_VERSION 3): change it
        # only with a new version there and a reader for rows stored in this one.
        ids: Any = self.ref(p.candidate_ids) if isinstance(p.candidate_ids, tuple) else list(p.candidate_ids)
        table = p.verdicts
        verdicts: Any
        if isinstance(table, VerdictTable):
            e = table.endpoint_ids
            eids: Any = None if e is p.candidate_ids else self.ref(e) if isinstance(e, tuple) else list(e)
            verdicts = ["vt", self.ref(table.rules), table.revision, table.request, eids,
                        [self.ref_if_shared(g) for g in table.groups]]
        else:
            verdicts = ["rows", *table]
        allowed = "=" if p.allowed_ids is p.candidate_ids else list(p.allowed_ids)
        scored = "=" if p.scored_ids is p.allowed_ids else list(p.scored_ids)
        tel: Any = p.telemetry
        if isinstance(tel, tuple):
            tel = ["m", self.ref_members(tel[0]), tel[1], tel[2]]
        # Every number of the score stage in one float64 buffer: [ttft | cost | components | features].
        comps = p.components
        numbers = _float64_bytes((p.ttft_ms, p.cost_per_1k, *comps.values(), p.features),
                                 len(p.ttft_ms) * (2 + len(comps)) + np.size(p.features))
        request = p.request.as_dict() if hasattr(p.request, "as_dict") else dict(p.request)
        return [request, p.inventory_revision, p.policy_revision, p.learner, p.at, ids, self.ref(p.endpoints),
                verdicts, allowed, p.quota_denied, scored, numbers, list(comps), p.features.shape[1],
                p.scores, p.chosen, p.propensity, p.fallbacks, p.shadows, self.ref(p.feature_names), p.timings_us,
                tel]


def _float64_bytes(arrays: Sequence[Any], count: int) -> bytes:
    """The arrays' values one after another as native float64 bytes (``count`` values in all).

    ``bytes.join`` copies the arrays' own buffers: a third of ``np.concatenate(...).tobytes()``'s
    time (0.75 against 2.2 µs for a decision's eleven arrays), which the request path pays per
    decision. It takes C-contiguous arrays only (anything else is a TypeError) and knows nothing
    of dtypes, so a result of any other length than ``count`` float64s goes through numpy.

    >>> a, m = np.array([1.0, 2.0]), np.array([[3.0], [4.0]])
    >>> _float64_bytes((a, m), 4) == np.array([1.0, 2.0, 3.0, 4.0]).tobytes()
    True
    >>> _float64_bytes((a.astype(np.float32), m), 4) == _float64_bytes((a, m), 4)  # another dtype
    True
    >>> _float64_bytes((a, np.asfortranarray([[3.0, 5.0], [4.0, 6.0]])), 6) == (  # another memory order
    ...     np.array([1.0, 2.0, 3.0, 5.0, 4.0, 6.0]).tobytes())
    True
    """
    try:
        out = b"".join(arrays)
    except TypeError:
        out = b""
    if len(out) != 8 * count:
        out = np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays]).tobytes()
    return out


class InlinePacker(Packer):
    """Packs parts with every shared object inline instead of a handle: the stored form of a
    trace (:mod:`audit.trace_store`) when no writer process is in between.

    >>> InlinePacker().ref(("a", "b"))
    ('a', 'b')
    """

    def ref(self, obj: object) -> Any:
        return obj

    def ref_members(self, seq: Sequence[object]) -> Any:
        return list(seq)

    def ref_if_shared(self, obj: object) -> Any:
        return obj

    def pack(self, parts: TraceParts) -> list[Any]:
        return self._pack(parts)


class Unpacker:
    """Writer side: keeps definitions and rebuilds records."""

    def __init__(self) -> None:
        self.table: dict[int, Any] = {}
        self._encoded: dict[int, msgspec.Raw] = {}  # definitions as MessagePack, made once each

    def feed(self, msg: Message) -> tuple[str, Mapping[str, Any], TraceParts | None] | None:
        """Apply one message; a record comes back as (kind, event, trace parts or None)."""
        tag = msg[0]
        if tag == "def":
            table = self.table
            for h, obj in pickle.loads(msg[1]):
                table[h] = [table[m] for m in obj] if isinstance(obj, Members) else obj
            return None
        if tag == "forget":
            below = msg[1]
            for h in [h for h in self.table if h < below]:
                del self.table[h]
                self._encoded.pop(h, None)
            return None
        _, kind, event, packed = msg
        return kind, event, unpack_parts(packed, self._get) if packed is not None else None

    def _get(self, x: Any) -> Any:
        return self.table[x] if isinstance(x, int) else x

    def _raw(self, x: Any) -> Any:
        """A handle's object as encoded MessagePack (encoded once per handle); inline objects as they are."""
        if not isinstance(x, int):
            return x
        raw = self._encoded.get(x)
        if raw is None:
            raw = self._encoded[x] = msgspec.Raw(_encoder.encode(self.table[x]))
        return raw

    def stored_parts(self, packed: msgspec.Raw) -> list[Any]:
        """A record's packed parts (as :func:`decode_lazy` left them) with every handle replaced by
        its object, encoded: what :func:`unpack_parts` reads with no table. Items that hold no
        handle are passed through as they arrived; only the request (item 0) is decoded, for masking.
        """
        t: list[Any] = _raw_items.decode(packed)
        t[0] = _decoder.decode(t[0])
        ids = _decoder.decode(t[5])
        if isinstance(ids, int):
            t[5] = self._raw(ids)
        t[6] = self._raw(_decoder.decode(t[6]))
        verdicts = _decoder.decode(t[7])
        if verdicts[0] == "vt":
            _, rules, revision, request_outcomes, eids, groups = verdicts
            t[7] = ["vt", self._raw(rules), revision, request_outcomes, self._raw(eids),
                    [self._raw(g) for g in groups]]
        t[19] = self._raw(_decoder.decode(t[19]))
        tel = _decoder.decode(t[21])
        if tel and tel[0] == "m":
            t[21] = ["m", self._raw(tel[1]), tel[2], tel[3]]
        return t


def unpack_parts(t: Sequence[Any], get: Callable[[Any], Any]) -> TraceParts:
    """:class:`TraceParts` from packed parts; ``get`` turns an item into its object (a handle's
    definition, or the item itself when the object is inline)."""
    (request, inv, pol, learner, at, ids, endpoints, verdicts, allowed, quota_denied, scored, numbers,
     comp_names, width, scores, chosen, propensity, fallbacks, shadows, feature_names, timings, tel) = t
    cand = get(ids)
    vt: Any
    if verdicts[0] == "vt":
        _, rules, revision, request_outcomes, eids, groups = verdicts
        eids = cand if eids is None else get(eids)
        infos = [r if isinstance(r, RuleInfo) else  # inline, a rule comes back as a mapping
                 RuleInfo(r["rule_id"], r["engine"], r["kind"], Severity(r["severity"])) for r in get(rules)]
        vt = VerdictTable(infos, revision, request_outcomes, eids, [get(g) for g in groups])
    else:
        vt = (verdicts[1], verdicts[2])
    allowed_ids = cand if allowed == "=" else allowed
    scored_ids = allowed_ids if scored == "=" else scored
    if tel and tel[0] == "m":
        tel = (get(tel[1]), tel[2], tel[3])
    n = len(scored_ids)
    flat = np.frombuffer(numbers, dtype=np.float64)
    comps = {name: flat[(2 + k) * n:(3 + k) * n] for k, name in enumerate(comp_names)}
    features = flat[(2 + len(comp_names)) * n:].reshape(n, width)
    return TraceParts(request, inv, pol, learner, at, cand, get(endpoints), vt, allowed_ids, quota_denied,
                      scored_ids, flat[:n], flat[n:2 * n], scores, comps, features, chosen, propensity,
                      fallbacks, shadows, get(feature_names), timings, tel)
