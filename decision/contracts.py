"""The narrow interfaces the pipeline stages are written against.

Only the composition root (:mod:`decision.service`) knows concrete classes. Guardrails
(``policies``), learners (``learners``) and audit sinks (``audit``) implement these protocols.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from decision.domain import (
    Candidate,
    Choice,
    Decision,
    Estimates,
    GuardResult,
    Outcome,
    RequestContext,
    ScoredCandidate,
)


@runtime_checkable
class Guard(Protocol):
    """Deterministic guardrails: hard rules a decision never violates."""

    @property
    def revision(self) -> str: ...

    def prefetch(self, ctx: RequestContext) -> Mapping[str, Any]:
        """Read any state the rules need, holding this request's share of any quota (atomically, so
        concurrent decisions cannot both take the last unit). I/O happens here and in release only.
        Empty when nothing is held: the engine then never asks to ``settle`` the decision's outcome."""
        ...

    def evaluate(self, ctx: RequestContext, candidates: Sequence[Candidate],
                 state: Mapping[str, Any]) -> GuardResult:
        """Pure: verdicts for every candidate and the survivors. No I/O."""
        ...

    def commit(self, ctx: RequestContext, decision: Decision) -> None:
        """The decision was made: what prefetch held stays consumed."""
        ...

    def release(self, ctx: RequestContext, state: Mapping[str, Any]) -> None:
        """No decision (denied, or the pipeline failed): give back what prefetch held in ``state``."""
        ...

    def settle(self, ctx: RequestContext, outcome: Outcome, decided_at: float) -> None:
        """A routed request's outcome is known: true up what prefetch held on estimates (a token
        quota charged the request's estimated tokens; the outcome says how many it used)."""
        ...


@runtime_checkable
class FeatureBuilder(Protocol):
    """Turns (request, candidates, the score stage's estimates) into the feature matrix learners see:
    one row per candidate, one column per name in :attr:`names`."""

    names: tuple[str, ...]

    def build_matrix(self, ctx: RequestContext, candidates: Sequence[Candidate],
                     est: Estimates) -> NDArray[np.float64]: ...


@runtime_checkable
class Learner(Protocol):
    """A routing policy over the allowed arms (implementations: ``learners.registry``).

    ``choose`` must only return an index into ``arms`` and a propensity in (0, 1].
    """

    name: str
    version: str

    def choose(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> Choice: ...

    def update(self, features: Sequence[float], reward: float) -> None: ...


@runtime_checkable
class RewardFunction(Protocol):
    def __call__(self, ctx: RequestContext, outcome: Outcome, expected_ttft_ms: float,
                 cost_per_1k_tokens: float) -> float: ...


@runtime_checkable
class AuditSink(Protocol):
    """Where decision and outcome events go. ``submit_*`` must not block the request path."""

    def submit_decision(self, event: Mapping[str, Any]) -> None: ...

    def submit_outcome(self, event: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class TraceReader(Protocol):
    """Reads decisions back for ``Explain`` and the auditors."""

    def get_decision(self, decision_id: str) -> Mapping[str, Any] | None: ...


# A value the audit log stores masked (keyed pseudonym, audit.masking) starts with this: the engine
# must not take a masked tenant read back from the log for the tenant itself.
PSEUDONYM_PREFIX = "h:"

# The client side (libpq parameters) of every connection to the shared PostgreSQL, the audit writer's
# and the learner store's: keepalives make one whose packets vanish (a partition, no reset) fail
# within seconds (idle 5 s, then 3 probes 2 s apart), as an outage, instead of waiting as long as the
# kernel's retransmissions last.
LIBPQ_KEEPALIVES: Final[Mapping[str, Any]] = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                                              "keepalives_count": 3}


@runtime_checkable
class OutcomeLookup(Protocol):
    """A trace reader that can say which decisions have an outcome (the audit log shared by replicas)."""

    def reported_among(self, decision_ids: Sequence[str]) -> set[str]: ...
