"""Render a stored decision as "why this route": plain text for the CLI and the API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None or v == "" else str(v)


def candidate_rows(decision: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per located candidate: verdicts, score, estimates, telemetry age, chosen flag."""
    trace = decision.get("trace") or {}
    stages = trace.get("stages", {})
    located = stages.get("locate", {}).get("candidates", [])
    verdicts: dict[str, list[str]] = {}
    # A failed rule of severity warn is recorded and removes nothing: a warning, not a denial.
    failed: dict[str, dict[str, list[tuple[str, str]]]] = {"DENY": {}, "WARN": {}}
    for v in stages.get("guard", {}).get("verdicts", []):
        ep = v.get("endpoint_id") or "*"
        mark = "allow" if v.get("allow") else ("WARN" if v.get("severity", "deny") == "warn" else "DENY")
        verdicts.setdefault(ep, []).append(f"{v.get('rule_id')}:{mark}" + ("" if v.get("allow") else
                                                                         f" ({v.get('reason', '')})"))
        if mark != "allow":
            failed[mark].setdefault(ep, []).append((str(v.get("rule_id")), str(v.get("reason", ""))))
    denials, warnings = failed["DENY"], failed["WARN"]
    scores = {s["endpoint_id"]: s for s in stages.get("score", {}).get("candidates", [])}
    chosen = stages.get("choose", {}).get("chosen")
    fallbacks = stages.get("choose", {}).get("fallbacks", [])
    endpoints = trace.get("endpoints", {})
    telemetry = trace.get("telemetry", {})
    rows = []
    for ep in located:
        s = scores.get(ep, {})
        ages = telemetry.get(ep, {}).get("ages_s", {})
        info = endpoints.get(ep, {})
        judged = verdicts.get(ep, []) + verdicts.get("*", [])  # its own verdicts and the request-wide ones
        rows.append({
            "endpoint_id": ep, "site": info.get("site"), "tier": info.get("tier"),
            "gpu_type": info.get("gpu_type"),
            # Denials first, then warnings: whoever reads a shortened copy must still see what removed the endpoint.
            "verdicts": "; ".join(sorted(judged, key=lambda text: (":DENY" not in text, ":WARN" not in text)))
            or "allow",
            "denials": denials.get(ep, []) + denials.get("*", []),
            "warnings": warnings.get(ep, []) + warnings.get("*", []),
            "rules": len(judged),
            "score": s.get("score"), "expected_ttft_ms": s.get("expected_ttft_ms"),
            "expected_cost_per_1k_tokens": s.get("expected_cost_per_1k_tokens"),
            "telemetry_max_age_s": max(ages.values()) if ages else None,
            "role": "CHOSEN" if ep == chosen else (f"fallback {fallbacks.index(ep) + 1}"
                                                     if ep in fallbacks else ""),
        })
    return rows


def _verdict_cell(row: Mapping[str, Any]) -> str:
    """The table's verdict column: the rules that denied, or how many allowed (and which warned)."""
    if row["denials"]:
        return "DENY " + ", ".join(rule for rule, _ in row["denials"])
    n = row["rules"]
    cell = f"allow ({n} rule{'' if n == 1 else 's'})" if n else "allow"
    if row["warnings"]:
        cell += ", WARN " + ", ".join(rule for rule, _ in row["warnings"])
    return cell


def render_text(decision: Mapping[str, Any]) -> str:
    """A readable account of one decision."""
    trace = decision.get("trace") or {}
    out = [f"decision {decision['decision_id']} at {decision['decided_at']}: {decision['status']}",
           f"  request {decision.get('request_id')} tenant {decision.get('tenant')} "
           f"model {decision.get('model')} tier {decision.get('user_tier')}",
           f"  reason: {decision.get('reason')}",
           f"  policy {decision.get('policy_revision')}, learner {decision.get('learner')}, "
           f"inventory {trace.get('inventory_revision', '-')}"]
    if decision.get("endpoint_id"):
        out.append(f"  chosen: {decision['endpoint_id']} ({decision.get('gpu_type')} at {decision.get('site_id')}, "
                   f"{decision.get('region')}, {decision.get('tier')}) propensity {_fmt(decision.get('propensity'))}")
    if decision.get("deny_rules"):
        out.append(f"  denied by: {', '.join(decision['deny_rules'])}")
    rows = candidate_rows(decision)
    out.append(f"  candidates ({len(rows)} located):")
    head = ("endpoint", "verdicts", "score", "ttft_ms", "$/1k", "age_s", "")
    table = [head] + [(r["endpoint_id"], _verdict_cell(r), _fmt(r["score"]), _fmt(r["expected_ttft_ms"]),
                       _fmt(r["expected_cost_per_1k_tokens"]), _fmt(r["telemetry_max_age_s"]), r["role"])
                      for r in rows]
    widths = [min(60, max(len(str(t[i])) for t in table)) for i in range(len(head))]
    for t in table:
        out.append("    " + "  ".join(str(c)[:60].ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())
    for key, title in (("denials", "denials"), ("warnings", "warnings (recorded, nothing removed)")):
        failed = [(r["endpoint_id"], rule, reason) for r in rows for rule, reason in r[key]]
        if failed:  # in full, below the table, where no column width cuts them
            out.append(f"  {title}:")
            out.extend(f"    {ep}: {rule}: {reason}" for ep, rule, reason in failed)
    outcome = decision.get("outcome")
    if outcome:
        out.append(f"  outcome: {_outcome_text(outcome)}")
    else:
        out.append("  outcome: none reported yet")
    for later in decision.get("conflicting_outcomes") or ():
        out.append(f"  also reported (kept, not used): {_outcome_text(later)}")
    return "\n".join(out)


def _outcome_text(o: Mapping[str, Any]) -> str:
    return (f"{o.get('status')} ttft {_fmt(o.get('ttft_ms'))} ms, latency {_fmt(o.get('latency_ms'))} ms, "
            f"tokens {o.get('input_tokens')}/{o.get('output_tokens')}, reward {_fmt(o.get('reward'))}")
