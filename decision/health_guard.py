"""The built-in health rule, used when no policy bundle is configured.

It removes endpoints that report XID errors or a GPU over the temperature limit. It is a real
guard behind the same contract as the CEL/Rego bundles, so the pipeline has one shape either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from decision.domain import Candidate, Decision, GuardResult, RequestContext, Verdict
from decision.telemetry import GPU_TEMP_C, XID_ERRORS


class BuiltinHealthGuard:
    RULE_ID = "builtin.health"

    def __init__(self, max_temp_c: float = 85.0) -> None:
        self.max_temp_c = max_temp_c
        self._revision = f"builtin-health-{max_temp_c:g}"

    @property
    def revision(self) -> str:
        return self._revision

    def prefetch(self, ctx: RequestContext) -> Mapping[str, Any]:
        return {}

    def evaluate(self, ctx: RequestContext, candidates: Sequence[Candidate],
                 state: Mapping[str, Any]) -> GuardResult:
        allowed: list[Candidate] = []
        verdicts: list[Verdict] = []
        for c in candidates:
            vals = c.telemetry.values
            xid = vals.get(XID_ERRORS, 0.0)
            temp = vals.get(GPU_TEMP_C, 0.0)
            if xid > 0:
                reason = f"XID error {xid:g} reported"
            elif temp > self.max_temp_c:
                reason = f"GPU temperature {temp:g}C over {self.max_temp_c:g}C"
            else:
                reason = ""
            ok = not reason
            verdicts.append(Verdict(self.RULE_ID, "builtin", "safety", ok, reason or "healthy",
                                    self._revision, c.endpoint.endpoint_id))
            if ok:
                allowed.append(c)
        return GuardResult(tuple(allowed), tuple(verdicts), self._revision)

    def commit(self, ctx: RequestContext, decision: Decision) -> None:
        return None
