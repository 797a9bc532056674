"""Conversions between protobuf messages and domain dataclasses (the gRPC edge only)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict

from decision.domain import Decision, Outcome, OutcomeStatus, RequestContext, Route
from decision.errors import InvalidArgument
from infermesh.decision.v1 import decision_pb2 as pb

_STATUS_FROM_PB = {
    pb.OUTCOME_STATUS_OK: OutcomeStatus.OK,
    pb.OUTCOME_STATUS_ERROR: OutcomeStatus.ERROR,
    pb.OUTCOME_STATUS_TIMEOUT: OutcomeStatus.TIMEOUT,
    pb.OUTCOME_STATUS_CANCELLED: OutcomeStatus.CANCELLED,
}
_STATUS_TO_PB = {v: k for k, v in _STATUS_FROM_PB.items()}


def request_from_pb(m: pb.DecideRequest) -> RequestContext:
    return RequestContext(
        request_id=m.request_id, tenant=m.tenant, user_tier=m.user_tier or "standard", model=m.model,
        model_family=m.model_family, modality=m.modality, prompt_class=m.prompt_class or "general",
        estimated_input_tokens=m.estimated_input_tokens, expected_output_tokens=m.expected_output_tokens,
        allowed_jurisdictions=tuple(m.allowed_jurisdictions), data_class=m.data_class or "public",
        client_region=m.client_region, session_id=m.session_id, ttft_target_ms=m.ttft_target_ms,
        max_cost_per_1k_tokens=m.max_cost_per_1k_tokens, labels=dict(m.labels),
    )


# json_format's ParseError names the field only in its text.
_PARSE_FIELD = re.compile(r'Failed to parse (\w+) field|has no field named "(\w+)"')


def request_from_json(data: Mapping[str, Any]) -> RequestContext:
    """A request from its JSON form (the proto's field names), as ``infermesh decide`` reads it.

    >>> request_from_json({"tenant": "t", "model": "m", "estimated_input_tokens": "lots"})
    Traceback (most recent call last):
    ...
    decision.errors.InvalidArgument: estimated_input_tokens: Failed to parse estimated_input_tokens field: \
invalid literal for int() with base 10: 'lots'.
    """
    msg = pb.DecideRequest()
    try:
        ParseDict(dict(data), msg)
    except Exception as exc:
        found = _PARSE_FIELD.search(str(exc))
        field = next((g for g in found.groups() if g), "request") if found else "request"
        raise InvalidArgument(field, str(exc)) from None
    return request_from_pb(msg)


def route_to_pb(r: Route) -> pb.Route:
    return pb.Route(endpoint_id=r.endpoint_id, address=r.address, model=r.model, node_id=r.node_id,
                    gpu_type=r.gpu_type, site_id=r.site_id, region=r.region, tier=r.tier)


def decision_to_pb(d: Decision, inventory_revision: str = "") -> pb.DecideResponse:
    return pb.DecideResponse(
        decision_id=d.decision_id, route=route_to_pb(d.route), fallbacks=[route_to_pb(f) for f in d.fallbacks],
        propensity=d.propensity, policy_revision=d.policy_revision, learner=d.learner,
        expected_ttft_ms=d.expected_ttft_ms, expected_cost_per_1k_tokens=d.expected_cost_per_1k_tokens,
        reason=d.reason, inventory_revision=inventory_revision, decision_us=d.decision_us,
    )


def decision_to_json(d: Decision, inventory_revision: str = "") -> dict[str, Any]:
    def route(r: Route) -> dict[str, str]:
        return {"endpoint_id": r.endpoint_id, "address": r.address, "model": r.model, "node_id": r.node_id,
                "gpu_type": r.gpu_type, "site_id": r.site_id, "region": r.region, "tier": r.tier}

    return {"decision_id": d.decision_id, "route": route(d.route), "fallbacks": [route(f) for f in d.fallbacks],
            "propensity": d.propensity, "policy_revision": d.policy_revision, "learner": d.learner,
            "expected_ttft_ms": d.expected_ttft_ms, "expected_cost_per_1k_tokens": d.expected_cost_per_1k_tokens,
            "reason": d.reason, "inventory_revision": inventory_revision, "decision_us": d.decision_us,
            "trace": dict(d.trace)}


def outcome_from_pb(m: pb.Outcome) -> Outcome:
    status = _STATUS_FROM_PB.get(m.status)
    if status is None:
        raise InvalidArgument("status", "must be one of OUTCOME_STATUS_OK, _ERROR, _TIMEOUT, _CANCELLED")
    return Outcome(decision_id=m.decision_id, status=status, ttft_ms=m.ttft_ms, latency_ms=m.latency_ms,
                   input_tokens=m.input_tokens, output_tokens=m.output_tokens, error=m.error,
                   served_endpoint_id=m.served_endpoint_id)


def outcome_to_pb(o: Mapping[str, Any]) -> pb.Outcome:
    status = _STATUS_TO_PB.get(OutcomeStatus(str(o.get("status", "ok"))), pb.OUTCOME_STATUS_UNSPECIFIED)
    return pb.Outcome(decision_id=str(o.get("decision_id", "")), status=status,
                      ttft_ms=float(o.get("ttft_ms") or 0.0), latency_ms=float(o.get("latency_ms") or 0.0),
                      input_tokens=int(o.get("input_tokens") or 0), output_tokens=int(o.get("output_tokens") or 0),
                      error=str(o.get("error") or ""))


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, str | bool | int | float):
        return v
    return str(v)


def _unix_seconds(value: Any) -> float:
    """decided_at as stored (datetime, ISO-8601 text, or epoch seconds) in Unix seconds."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return datetime.fromisoformat(value).timestamp()
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)


def record_from_trace_pb(t: pb.Trace) -> dict[str, Any]:
    """An Explain answer back in the audit log's record shape (what ``audit.why`` renders)."""
    trace = MessageToDict(t.trace)
    request = trace.get("request") or {}
    record: dict[str, Any] = {
        "decision_id": t.decision_id, "status": t.status,
        "decided_at": datetime.fromtimestamp(t.decided_at_unix_s, tz=UTC).isoformat(),
        "request_id": request.get("request_id"), "tenant": request.get("tenant"),
        "user_tier": request.get("user_tier"), "model": t.route.model or request.get("model_family"),
        "endpoint_id": t.route.endpoint_id or None, "site_id": t.route.site_id, "region": t.route.region,
        "tier": t.route.tier, "gpu_type": t.route.gpu_type, "propensity": t.propensity,
        "policy_revision": t.policy_revision, "learner": t.learner, "reason": t.reason,
        "deny_rules": list(t.deny_rules), "trace": trace, "outcome": None,
    }
    if t.HasField("outcome"):
        o = t.outcome
        record["outcome"] = {"status": pb.OutcomeStatus.Name(o.status).removeprefix("OUTCOME_STATUS_").lower(),
                             "ttft_ms": o.ttft_ms, "latency_ms": o.latency_ms, "input_tokens": o.input_tokens,
                             "output_tokens": o.output_tokens, "error": o.error,
                             "reward": t.reward if t.HasField("reward") else None}
    return record


def trace_to_pb(record: Mapping[str, Any]) -> pb.Trace:
    """A stored audit record (decision event + optional outcome) as an Explain answer."""
    trace = struct_pb2.Struct()
    ParseDict(_jsonable(record.get("trace") or {}), trace)
    # A denied decision has no route: its log row's model is what the request asked for (a model or a
    # family), which would read as the model that served it.
    route = pb.Route(endpoint_id=record.get("endpoint_id") or "", model=record.get("model") or "",
                     site_id=record.get("site_id") or "", region=record.get("region") or "",
                     tier=record.get("tier") or "", gpu_type=record.get("gpu_type") or "",
                     ) if record.get("status", "routed") == "routed" else pb.Route()
    decided_s = _unix_seconds(record.get("decided_at"))
    msg = pb.Trace(decision_id=str(record.get("decision_id", "")), status=str(record.get("status", "")),
                   route=route, policy_revision=record.get("policy_revision") or "",
                   learner=record.get("learner") or "", propensity=float(record.get("propensity") or 0.0),
                   reason=record.get("reason") or "", deny_rules=list(record.get("deny_rules") or []),
                   trace=trace, decided_at_unix_s=decided_s)
    outcome = record.get("outcome")
    if outcome:
        msg.outcome.CopyFrom(outcome_to_pb(outcome))
        if outcome.get("reward") is not None:
            msg.reward = float(outcome["reward"])
    return msg
