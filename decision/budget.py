"""The request's own cost cap (``max_cost_per_1k_tokens``) as a rule of the guard stage.

The cap is a hard constraint the client states, like a guardrail: a candidate whose expected cost
per 1K tokens (the score stage's figure, the one the response reports) is over it is never routed
to, not even while a learner explores. It is judged after scoring because the expected cost depends
on the request (egress to the client, prompt and completion sizes). Its verdicts join the guard's,
under the rule id :data:`BUDGET_RULE_ID`, so a trace shows them, a denial names the rule
(``FAILED_PRECONDITION``) and auditors can filter by it like any other rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from decision.candidates import CandidateSet, endpoint_ids_of
from decision.domain import Candidate, GuardResult, RuleInfo, Severity, Verdict, VerdictTable

BUDGET_RULE_ID = "request.max_cost_per_1k_tokens"
_ENGINE, _KIND = "builtin", "budget"


def over_budget(cost_per_1k: NDArray[np.float64], max_cost: float) -> NDArray[np.bool_] | None:
    """Which candidates cost more than ``max_cost`` $ per 1K tokens; None when the cap removes none
    (or there is no cap: ``max_cost`` 0).

    >>> over_budget(np.array([0.001, 0.004]), 0.002).tolist()
    [False, True]
    >>> over_budget(np.array([0.001, 0.004]), 0.0) is None
    True
    """
    if max_cost <= 0.0:
        return None
    over = cost_per_1k > max_cost
    return over if bool(over.any()) else None


def _reason(cost: float, max_cost: float, allow: bool) -> str:
    if allow:
        return f"expected ${cost:.6f}/1K tokens within the request's cap ${max_cost:.6f}"
    return f"expected ${cost:.6f}/1K tokens over the request's cap ${max_cost:.6f}"


def apply_budget(result: GuardResult, cost_per_1k: NDArray[np.float64], over: NDArray[np.bool_],
                 max_cost: float) -> GuardResult:
    """``result`` with the cap's verdict on each of its allowed candidates (``cost_per_1k`` and ``over``
    in ``result.allowed`` order) and only those within the cap still allowed."""
    allowed = result.allowed
    keep = [i for i, o in enumerate(over.tolist()) if not o]
    kept: Sequence[Candidate] = allowed.take(keep) if isinstance(allowed, CandidateSet) else [allowed[i] for i in keep]
    ids = endpoint_ids_of(allowed)
    costs = cost_per_1k.tolist()
    table = result.verdicts
    verdicts: Sequence[Verdict]
    if isinstance(table, VerdictTable):
        rule = len(table.rules)
        by_id = dict(zip(ids, zip(costs, over.tolist(), strict=True), strict=True))
        group: list[tuple[bool, Any]] = []
        for eid in table.endpoint_ids:
            judged = by_id.get(eid)
            if judged is None:  # removed by an earlier rule: the cap did not judge it
                group.append((True, ()))
            else:
                cost, is_over = judged
                group.append((not is_over, ((rule, not is_over, _reason(cost, max_cost, not is_over)),)))
        verdicts = VerdictTable((*table.rules, RuleInfo(BUDGET_RULE_ID, _ENGINE, _KIND, Severity.DENY)),
                                table.revision, table.request, table.endpoint_ids, (*table.groups, group))
    else:
        verdicts = [*table, *(Verdict(BUDGET_RULE_ID, _ENGINE, _KIND, not o, _reason(c, max_cost, not o),
                                      result.revision, eid)
                              for eid, c, o in zip(ids, costs, over.tolist(), strict=True))]
    return GuardResult(kept, verdicts, result.revision, result.quota_denied)
