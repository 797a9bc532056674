"""Helpers for the spine's tests: engines on the demo fleet and small scripted guards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from decision.domain import Candidate, Decision, GuardResult, Outcome, RequestContext, Verdict
from decision.engine import DecisionEngine
from decision.fleet import Fleet
from decision.health_guard import BuiltinHealthGuard
from decision.telemetry import TelemetryStore
from learners.least_ttft import LeastExpectedTtft


class ScriptedGuard:
    """A guard that denies by endpoint-id substring or denies everything as a quota rule."""

    def __init__(self, deny_substring: str = "", quota_tenant: str = "") -> None:
        self.deny_substring = deny_substring
        self.quota_tenant = quota_tenant
        self.commits = 0
        self.releases = 0

    @property
    def revision(self) -> str:
        return "scripted-1"

    def prefetch(self, ctx: RequestContext) -> Mapping[str, Any]:
        return {"quota_used": 1 if ctx.tenant == self.quota_tenant else 0}

    def evaluate(self, ctx: RequestContext, candidates: Sequence[Candidate], state: Mapping[str, Any]) -> GuardResult:
        if state["quota_used"]:
            v = Verdict("quota.rpm", "test", "quota", False, "tenant over its requests/minute", self.revision)
            return GuardResult((), (v,), self.revision, quota_denied=True)
        verdicts, allowed = [], []
        for c in candidates:
            ok = not (self.deny_substring and self.deny_substring in c.endpoint.endpoint_id)
            verdicts.append(Verdict("test.deny-substring", "test", "other", ok, "scripted", self.revision,
                                    c.endpoint.endpoint_id))
            if ok:
                allowed.append(c)
        return GuardResult(tuple(allowed), tuple(verdicts), self.revision)

    def commit(self, ctx: RequestContext, decision: Decision) -> None:
        self.commits += 1

    def release(self, ctx: RequestContext, state: Mapping[str, Any]) -> None:
        self.releases += 1

    def settle(self, ctx: RequestContext, outcome: Outcome, decided_at: float) -> None:
        return None


def demo_engine(fleet: Fleet, guard: Any = None, **kwargs: Any) -> DecisionEngine:
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints})
    return DecisionEngine(fleet, store, guard or BuiltinHealthGuard(), kwargs.pop("learner", LeastExpectedTtft()),
                          **kwargs)
