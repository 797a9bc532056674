"""The spine's deterministic scorer as a learner: always the least expected TTFT."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from decision.domain import Choice, RequestContext, ScoredArms, ScoredCandidate


class LeastExpectedTtft:
    """Pick the arm with the lowest expected TTFT (queue x service time + RTT + cold start).

    Deterministic, so the propensity of its choice is 1. Ties go to the cheaper arm, then to
    the first offered.

    Parameters
    ----------
    cost_weight
        Milliseconds of TTFT one would trade for $0.001 per 1K tokens; 0 ignores cost.

    Examples
    --------
    >>> from learners.testing import toy_arms
    >>> from decision.domain import RequestContext
    >>> learner = LeastExpectedTtft()
    >>> choice = learner.choose(RequestContext("r1", "t"), toy_arms([300.0, 120.0, 500.0]))
    >>> choice.arm, choice.propensity
    (1, 1.0)
    """

    name = "least-ttft"
    version = "1"

    def __init__(self, cost_weight: float = 0.0) -> None:
        self.cost_weight = cost_weight

    def choose(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> Choice:
        if not arms:
            raise ValueError("no arms offered")
        cols = ScoredArms.of(arms)
        scores = -(cols.rank_ms + self.cost_weight * 1000.0 * cols.cost_per_1k)
        # Highest score, then the cheaper arm, then the first offered (lexsort: last key is primary).
        best = int(np.lexsort((np.arange(len(scores)), cols.cost_per_1k, -scores))[0])
        return Choice(best, 1.0, tuple(scores.tolist()))

    def update(self, features: Sequence[float], reward: float) -> None:
        """Nothing to learn: the scorer is fixed."""

    def probabilities(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> tuple[float, ...]:
        """All the probability on the arm :meth:`choose` picks (for off-policy evaluation)."""
        best = self.choose(ctx, arms).arm
        return tuple(1.0 if i == best else 0.0 for i in range(len(arms)))

    def clone(self) -> LeastExpectedTtft:
        """A fresh copy with the same hyperparameters."""
        return LeastExpectedTtft(self.cost_weight)

    def state_dict(self) -> dict[str, Any]:
        """No learned state; the name and version let a snapshot be checked on load."""
        return {"learner": self.name, "version": self.version, "params": {"cost_weight": self.cost_weight}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):  # a damaged snapshot row can hold any JSON value
            raise ValueError(f"state is a {type(state).__name__}, not a mapping")
        if state.get("learner") != self.name:
            raise ValueError(f"state of {state.get('learner')} does not fit {self.name}")
