"""Render a stored decision trace as "why this route" text for people."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def render_why(record: Mapping[str, Any]) -> str:
    """A readable account of one decision: request, every candidate's verdicts, scores and ages.

    ``record`` is a stored decision event (``decision_id``, ``status``, ``trace``... and an
    optional ``outcome``), as the audit log returns it.
    """
    trace: Mapping[str, Any] = record.get("trace") or {}
    stages: Mapping[str, Any] = trace.get("stages") or {}
    req: Mapping[str, Any] = trace.get("request") or {}
    choose: Mapping[str, Any] = stages.get("choose") or {}
    guard: Mapping[str, Any] = stages.get("guard") or {}
    chosen = choose.get("chosen")
    fallbacks = list(choose.get("fallbacks") or [])
    lines = [
        f"decision {record.get('decision_id')}  status={record.get('status')}",
        f"request  {req.get('request_id')} tenant={req.get('tenant')} tier={req.get('user_tier')} "
        f"model={req.get('model') or req.get('model_family')} region={req.get('client_region')} "
        f"data_class={req.get('data_class')} jurisdictions={','.join(req.get('allowed_jurisdictions') or []) or '*'}",
        f"policy   {trace.get('policy_revision')}   inventory {trace.get('inventory_revision')}   "
        f"learner {trace.get('learner')}",
    ]
    if chosen:
        lines.append(f"chosen   {chosen} (propensity {_fmt(choose.get('propensity'), 3)}); "
                     f"fallbacks: {', '.join(fallbacks) or 'none'}")
    else:
        lines.append(f"denied   by {', '.join(record.get('deny_rules') or []) or 'no candidates'}")
    verdicts: dict[str, list[str]] = {}
    for v in guard.get("verdicts") or []:
        if not v.get("allow"):
            verdicts.setdefault(v.get("endpoint_id") or "(request)", []).append(
                f"{v.get('rule_id')}: {v.get('reason')}")
    scores = {row["endpoint_id"]: row for row in (stages.get("score") or {}).get("candidates") or []}
    endpoints: Mapping[str, Any] = trace.get("endpoints") or {}
    telemetry: Mapping[str, Any] = trace.get("telemetry") or {}
    located = (stages.get("locate") or {}).get("candidates") or []
    lines.append("")
    lines.append(f"{'':2}{'endpoint':38} {'site':18} {'tier':10} {'TTFT ms':>8} {'$/1K':>9} {'score':>9} "
                 f"{'age s':>6}  verdict")
    for ep_id in located:
        mark = "*" if ep_id == chosen else ("f" if ep_id in fallbacks else " ")
        info = endpoints.get(ep_id) or {}
        row = scores.get(ep_id) or {}
        ages = (telemetry.get(ep_id) or {}).get("ages_s") or {}
        age = max(ages.values()) if ages else None
        verdict = "; ".join(verdicts.get(ep_id, [])) or "allowed"
        lines.append(f"{mark:2}{ep_id:38.38} {info.get('site', ''):18.18} {info.get('tier', ''):10} "
                     f"{_fmt(row.get('expected_ttft_ms')):>8} {_fmt(row.get('expected_cost_per_1k_tokens'), 5):>9} "
                     f"{_fmt(row.get('score'), 2):>9} {_fmt(age):>6}  {verdict}")
    if "(request)" in verdicts:
        lines.append("request-level: " + "; ".join(verdicts["(request)"]))
    shadow = choose.get("shadow") or []
    for s in shadow:
        lines.append(f"shadow   {s.get('learner')} would choose {s.get('chosen')} (p={_fmt(s.get('propensity'), 3)})")
    outcome = record.get("outcome")
    if outcome:
        lines.append(f"outcome  {outcome.get('status')} ttft={_fmt(outcome.get('ttft_ms'))} ms "
                     f"tokens={outcome.get('input_tokens')}/{outcome.get('output_tokens')} "
                     f"reward={_fmt(outcome.get('reward'), 3)}")
    lines.append("(* chosen, f fallback; age = oldest telemetry value of that endpoint)")
    return "\n".join(lines)
