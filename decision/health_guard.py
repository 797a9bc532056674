"""The built-in health rule, used when no policy bundle is configured.

It removes endpoints that report XID errors or a GPU over the temperature limit. It is a real
guard behind the same contract as the CEL/Rego bundles, so the pipeline has one shape either way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from decision.candidates import CandidateSet, endpoint_ids_of
from decision.domain import (
    Candidate,
    Decision,
    GuardResult,
    JudgedGroup,
    Outcome,
    RequestContext,
    RuleInfo,
    RuleOutcome,
    VerdictTable,
)
from decision.telemetry import CANONICAL, GPU_TEMP_C, XID_ERRORS

_XID, _TEMP = CANONICAL.index(XID_ERRORS), CANONICAL.index(GPU_TEMP_C)
_HEALTHY: tuple[RuleOutcome, ...] = ((0, True, "healthy"),)
_RULES = (RuleInfo("builtin.health", "builtin", "safety"),)


@functools.lru_cache(maxsize=1024)
def _all_healthy(n: int) -> JudgedGroup:
    """The verdict group of ``n`` healthy candidates, one object per size: an audit trace then
    ships it once by handle instead of a fresh copy per decision."""
    return tuple((True, _HEALTHY) for _ in range(n))


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
        if isinstance(candidates, CandidateSet):  # the request path: read the telemetry columns
            cols = candidates.telemetry.values
            # NaN (never reported, or stale) fails both comparisons below, as 0 would: no nan_to_num,
            # whose Python-level checks cost more than the rest of this stage.
            xids = cols[:, _XID].tolist()
            temps = cols[:, _TEMP].tolist()
        else:
            xids = [c.telemetry.values.get(XID_ERRORS, 0.0) for c in candidates]
            temps = [c.telemetry.values.get(GPU_TEMP_C, 0.0) for c in candidates]
        keep: list[int] = []
        outcomes: list[tuple[RuleOutcome, ...]] = []
        for i, (xid, temp) in enumerate(zip(xids, temps, strict=True)):
            if xid > 0:
                outcomes.append(((0, False, f"XID error {xid:g} reported"),))
            elif temp > self.max_temp_c:
                outcomes.append(((0, False, f"GPU temperature {temp:g}C over {self.max_temp_c:g}C"),))
            else:
                outcomes.append(_HEALTHY)
                keep.append(i)
        allowed: Sequence[Candidate]
        if isinstance(candidates, CandidateSet):
            allowed = candidates if len(keep) == len(candidates) else candidates.take(keep)
        else:
            allowed = tuple(candidates[i] for i in keep)
        if len(keep) == len(outcomes):  # the usual case: one shared, immutable group per size
            judged: JudgedGroup = _all_healthy(len(outcomes))
        else:
            keep_set = set(keep)
            judged = [(i in keep_set, outs) for i, outs in enumerate(outcomes)]
        table = VerdictTable(_RULES, self._revision, (), endpoint_ids_of(candidates), [judged])
        return GuardResult(allowed, table, self._revision)

    def commit(self, ctx: RequestContext, decision: Decision) -> None:
        return None

    def release(self, ctx: RequestContext, state: Mapping[str, Any]) -> None:
        return None  # nothing held

    def settle(self, ctx: RequestContext, outcome: Outcome, decided_at: float) -> None:
        return None  # nothing held
