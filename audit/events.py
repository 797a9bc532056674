"""``DecisionEventV1`` and ``OutcomeEventV1``: the versioned audit records.

The engine hands the audit sink plain mappings (``decision.engine.decision_event`` and friends);
these dataclasses are the schema those mappings must satisfy, and the shape rows are read back
into. Times are integer microseconds since the epoch so that a record round-trips through
PostgreSQL's ``timestamptz`` exactly (the hash chain depends on it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

EVENT_VERSION = 1
DECISION_STATUSES = ("routed", "denied", "quota_denied")
OUTCOME_STATUSES = ("ok", "error", "timeout", "cancelled")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_INT8_MAX = (1 << 63) - 1
# The text columns of each record (``deny_rules`` is a text[] too).
_DECISION_TEXT = ("decision_id", "request_id", "tenant", "user_tier", "model", "endpoint_id", "site_id", "region",
                  "tier", "gpu_type", "policy_revision", "learner", "reason")
_OUTCOME_TEXT = ("decision_id", "error")
_DECISION_OPTIONAL_TEXT = ("endpoint_id", "site_id", "region", "tier", "gpu_type")
_DECISION_OPTIONAL_FLOAT = ("propensity", "expected_ttft_ms", "expected_cost_per_1k_tokens", "decision_us")


def to_us(ts: float | dt.datetime) -> int:
    """Epoch seconds (float) or an aware datetime as integer microseconds."""
    if isinstance(ts, dt.datetime):
        delta = ts - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return round(ts * 1_000_000)


def from_us(us: int) -> dt.datetime:
    """Integer microseconds as an aware UTC datetime (exact)."""
    return _EPOCH + dt.timedelta(microseconds=us)


def check_text(field_name: str, value: str | None) -> None:
    """Raise ``ValueError`` naming ``field_name`` if ``value`` cannot be stored in a PostgreSQL text column.

    PostgreSQL refuses NUL in text; a COPY carrying one fails as a whole, so such a record must be
    turned away before it is chained, not discovered by the database (lone surrogates are refused
    earlier still: the chain's JSON encoder cannot encode them).

    Parameters
    ----------
    field_name : str
        The field, for the message.
    value : str or None
        The value (``None``: nothing to check).

    Examples
    --------
    >>> check_text("tenant", "acme")
    >>> check_text("tenant", "ac" + chr(0) + "me")
    Traceback (most recent call last):
    ...
    ValueError: tenant: contains a NUL character
    """
    if value is not None and "\x00" in value:
        raise ValueError(f"{field_name}: contains a NUL character")


def _check_int8(field_name: str, value: int) -> int:
    # A bigint the COPY cannot encode would fail the whole batch after the record was chained.
    if not -_INT8_MAX - 1 <= value <= _INT8_MAX:
        raise ValueError(f"{field_name}: out of the bigint range")
    return value


# The events are plain (not frozen) dataclasses: nothing changes one once made, and a frozen
# dataclass's __init__ (object.__setattr__ per field) cost the writer 2.3 µs per decision, a
# fifteenth of its work on a row.
@dataclass(slots=True)
class DecisionEventV1:
    """One decision as audited: routed, denied by guardrails, or denied by a quota.

    Examples
    --------
    >>> e = DecisionEventV1.from_mapping({"decision_id": "d1", "decided_at": 1.5, "status": "denied",
    ...     "request_id": "r", "tenant": "t", "deny_rules": ["residency"], "trace": {}})
    >>> e.decided_at_us, e.deny_rules
    (1500000, ('residency',))
    >>> DecisionEventV1.from_mapping(e.to_dict()) == e
    True
    """

    decision_id: str
    decided_at_us: int
    status: str
    request_id: str
    tenant: str
    user_tier: str = ""
    model: str = ""
    endpoint_id: str | None = None
    site_id: str | None = None
    region: str | None = None
    tier: str | None = None
    gpu_type: str | None = None
    propensity: float | None = None
    policy_revision: str = ""
    learner: str = ""
    expected_ttft_ms: float | None = None
    expected_cost_per_1k_tokens: float | None = None
    deny_rules: tuple[str, ...] = ()
    reason: str = ""
    decision_us: float | None = None
    trace: Mapping[str, Any] = field(default_factory=dict, compare=False)
    event_version: int = EVENT_VERSION

    @staticmethod
    def from_mapping(m: Mapping[str, Any]) -> DecisionEventV1:
        """Validate and convert an engine event (``decided_at`` in epoch seconds) or a stored one."""
        get = m.get
        version = int(get("event_version", EVENT_VERSION))
        if version != EVENT_VERSION:
            raise ValueError(f"unsupported decision event version {version}")
        at_us = int(m["decided_at_us"]) if "decided_at_us" in m else to_us(m["decided_at"])
        status = str(m["status"])
        if status not in DECISION_STATUSES:
            raise ValueError(f"bad decision status {status!r}")
        if not get("decision_id"):
            raise ValueError("decision_id is required")
        # The writer runs this for every decision: one pass, no helper calls per field.
        endpoint_id, site_id, region, tier, gpu_type = [None if (v := get(k)) is None else str(v)
                                                        for k in _DECISION_OPTIONAL_TEXT]
        propensity, expected_ttft_ms, expected_cost, decision_us = [None if (v := get(k)) is None else float(v)
                                                                    for k in _DECISION_OPTIONAL_FLOAT]
        e = DecisionEventV1(
            str(m["decision_id"]), at_us, status, str(get("request_id") or ""), str(get("tenant") or ""),
            str(get("user_tier") or ""), str(get("model") or ""), endpoint_id, site_id, region, tier, gpu_type,
            propensity, str(get("policy_revision") or ""), str(get("learner") or ""), expected_ttft_ms,
            expected_cost, tuple([str(r) for r in (get("deny_rules") or ())]), str(get("reason") or ""),
            decision_us, _trace_of(m), version,
        )
        # One scan of all the text for the NUL PostgreSQL refuses; the field is named when there is one.
        if "\x00" in "".join([e.decision_id, e.request_id, e.tenant, e.user_tier, e.model, endpoint_id or "",
                              site_id or "", region or "", tier or "", gpu_type or "", e.policy_revision,
                              e.learner, e.reason, *e.deny_rules]):
            for name in _DECISION_TEXT:
                check_text(name, getattr(e, name))
            for rule in e.deny_rules:
                check_text("deny_rules", rule)
        return e

    @property
    def decided_at(self) -> dt.datetime:
        return from_us(self.decided_at_us)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``decided_at`` as ISO-8601 plus the exact ``decided_at_us``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["deny_rules"] = list(self.deny_rules)
        d["trace"] = dict(self.trace)
        d["decided_at"] = self.decided_at.isoformat()
        return d


def _trace_of(m: Mapping[str, Any]) -> Mapping[str, Any]:
    # Not ``m.get("trace") or {}``: truth-testing a lazily built trace would build it.
    trace = m.get("trace")
    return {} if trace is None else trace


@dataclass(slots=True)
class OutcomeEventV1:
    """What happened to a routed request, joined to its decision by ``decision_id``."""

    decision_id: str
    status: str
    ttft_ms: float
    latency_ms: float
    input_tokens: int
    output_tokens: int
    error: str
    reward: float | None
    reported_at_us: int
    event_version: int = EVENT_VERSION

    @staticmethod
    def from_mapping(m: Mapping[str, Any]) -> OutcomeEventV1:
        """Validate and convert an engine outcome (``reported_at`` in epoch seconds) or a stored one."""
        version = int(m.get("event_version", EVENT_VERSION))
        if version != EVENT_VERSION:
            raise ValueError(f"unsupported outcome event version {version}")
        if not m.get("decision_id"):
            raise ValueError("decision_id is required")
        status = str(m["status"])
        if status not in OUTCOME_STATUSES:
            raise ValueError(f"bad outcome status {status!r}")
        reward = m.get("reward")
        at = m["reported_at_us"] if "reported_at_us" in m else to_us(m["reported_at"])
        o = OutcomeEventV1(
            decision_id=str(m["decision_id"]), status=status, ttft_ms=float(m.get("ttft_ms") or 0.0),
            latency_ms=float(m.get("latency_ms") or 0.0),
            input_tokens=_check_int8("input_tokens", int(m.get("input_tokens") or 0)),
            output_tokens=_check_int8("output_tokens", int(m.get("output_tokens") or 0)),
            error=str(m.get("error") or ""), reward=None if reward is None else float(reward),
            reported_at_us=int(at), event_version=version,
        )
        for name in _OUTCOME_TEXT:
            check_text(name, getattr(o, name))
        return o

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reported_at"] = from_us(self.reported_at_us).isoformat()
        return d
