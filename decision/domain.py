"""The domain of a routing decision, as frozen dataclasses.

Every pipeline stage (locate -> guard -> score -> choose -> audit) is a function over these
types. They carry no behaviour beyond small derived values, so any front end (gRPC, CLI,
simulator, Envoy ext_proc) can build them and any stage can be tested on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal, TypeVar, overload

import numpy as np
from numpy.typing import NDArray

from decision.bounded import put_bounded

Tier = Literal["datacenter", "edge", "device"]
TIERS: tuple[Tier, ...] = ("datacenter", "edge", "device")
Runtime = Literal["vllm", "triton"]
Modality = Literal["text", "image", "multimodal", "embedding"]
MODALITIES: tuple[str, ...] = ("text", "image", "multimodal", "embedding")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One deployed model on one node, flattened with its node and site for fast reads."""

    endpoint_id: str
    address: str
    model: str
    family: str
    runtime: Runtime
    max_concurrency: int
    modality: str
    safety_tier: str
    node_id: str
    gpu_type: str
    gpu_count: int
    gpu_hour_usd: float
    watts_per_gpu: float
    site_id: str
    region: str
    jurisdiction: str
    tier: Tier
    certifications: frozenset[str]
    owner_tenant: str | None
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    cold_start_ms: float
    warm: bool
    # Derived once at load (see nominal_cost_per_1k_tokens); read on the hot path.
    nominal_cost_per_1k: float = 0.0
    # Batch size at which a sequence's decode rate has halved (decision.gpu_profiles.batch_half);
    # 0: unknown, the rate is taken as independent of the batch.
    batch_half: float = 0.0

    def cost_per_1k_tokens(self) -> float:
        return nominal_cost_per_1k_tokens(self.gpu_hour_usd, self.gpu_count, self.decode_tokens_per_s,
                                          self.max_concurrency)


def nominal_cost_per_1k_tokens(gpu_hour_usd: float, gpu_count: int, decode_tokens_per_s: float,
                               max_concurrency: int) -> float:
    """Dollars per 1K generated tokens at nominal decode throughput.

    A node's hourly price is shared by the ``max_concurrency`` sequences it batches, each
    decoding at ``decode_tokens_per_s``.
    """
    tokens_per_hour = decode_tokens_per_s * max(1, max_concurrency) * 3600.0
    return gpu_hour_usd * gpu_count / tokens_per_hour * 1000.0


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the caller tells us about one inference request."""

    request_id: str
    tenant: str
    user_tier: str = "standard"
    model: str = ""
    model_family: str = ""
    modality: str = ""  # "": what the model takes (the engine fills it in before the guard stage)
    prompt_class: str = "general"
    estimated_input_tokens: int = 0
    expected_output_tokens: int = 0
    allowed_jurisdictions: tuple[str, ...] = ()
    data_class: str = "public"
    client_region: str = ""
    session_id: str = ""
    ttft_target_ms: float = 0.0
    max_cost_per_1k_tokens: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "user_tier": self.user_tier,
            "model": self.model,
            "model_family": self.model_family,
            "modality": self.modality,
            "prompt_class": self.prompt_class,
            "estimated_input_tokens": self.estimated_input_tokens,
            "expected_output_tokens": self.expected_output_tokens,
            "allowed_jurisdictions": list(self.allowed_jurisdictions),
            "data_class": self.data_class,
            "client_region": self.client_region,
            "session_id": self.session_id,
            "ttft_target_ms": self.ttft_target_ms,
            "max_cost_per_1k_tokens": self.max_cost_per_1k_tokens,
            "labels": dict(self.labels),
        }


@dataclass(frozen=True, slots=True)
class TelemetryReading:
    """The telemetry of one endpoint at decision time; every value keeps its age.

    ``values`` maps a canonical metric name (see :mod:`decision.telemetry`) to its value and
    ``ages_s`` to its age in seconds when the snapshot was taken. A metric absent from
    ``values`` is unknown (never reported, or older than the staleness limit).
    """

    endpoint_id: str
    values: Mapping[str, float]
    ages_s: Mapping[str, float]
    # What the telemetry store precomputes so the score stage reads arrays, not dictionaries:
    # ``values`` in :data:`decision.telemetry.CANONICAL` order (NaN: unknown), and the oldest age.
    dense: tuple[float, ...] | None = None
    oldest_age_s: float | None = None

    def get(self, name: str, default: float | None = None) -> float | None:
        return self.values.get(name, default)

    @property
    def max_age_s(self) -> float:
        """Age of the oldest value, stale ones included; infinity when nothing was ever reported."""
        if self.oldest_age_s is not None:
            return self.oldest_age_s
        return max(self.ages_s.values()) if self.ages_s else float("inf")


@dataclass(frozen=True, slots=True)
class Candidate:
    """An endpoint under consideration, with the telemetry the decision saw for it."""

    endpoint: Endpoint
    telemetry: TelemetryReading
    rtt_ms: float


class Severity(enum.StrEnum):
    DENY = "deny"
    WARN = "warn"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One rule's verdict on one candidate (or on the request, when ``endpoint_id`` is empty)."""

    rule_id: str
    engine: str
    kind: str
    allow: bool
    reason: str
    revision: str
    endpoint_id: str = ""
    severity: Severity = Severity.DENY

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "engine": self.engine,
            "kind": self.kind,
            "allow": self.allow,
            "reason": self.reason,
            "revision": self.revision,
            "endpoint_id": self.endpoint_id,
            "severity": str(self.severity),
        }


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """What a verdict says about its rule (shared by every verdict of the rule)."""

    rule_id: str
    engine: str
    kind: str
    severity: Severity = Severity.DENY


RuleOutcome = tuple[int, bool, str]
"""(index into the table's rules, allow, reason): one rule's answer, shared by every candidate
that got the same answer from it."""


_T = TypeVar("_T")


class BuiltOnRead(Sequence[_T]):
    """A sequence whose items are built when read, from columns a subclass keeps (``_item(i)``)."""

    __slots__ = ()

    def _item(self, i: int) -> _T:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> _T: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[_T, ...]: ...

    def __getitem__(self, i: int | slice) -> _T | tuple[_T, ...]:
        n = len(self)
        if isinstance(i, slice):
            return tuple(self._item(k) for k in range(*i.indices(n)))
        if not -n <= i < n:
            raise IndexError(i)
        return self._item(i % n)

    def __iter__(self) -> Iterator[_T]:
        return (self._item(i) for i in range(len(self)))


JudgedGroup = Sequence[tuple[bool, Sequence[RuleOutcome]]]
"""One group of rules' answers for n candidates: per candidate, (it survives these rules, their outcomes)."""


class VerdictTable(BuiltOnRead[Verdict]):
    """Every verdict of one guard evaluation as columns; a :class:`Verdict` is built when read.

    ``request`` holds the request-scope rules' outcomes; each of ``groups`` holds, per candidate
    ``endpoint_ids[i]``, one group of rules' outcomes (a guard judges rules in groups that it
    memoises separately). Outcomes are shared tuples, so a decision's verdicts cost a few lists of
    references, not one object per rule and candidate. Indexing walks the table: iterate instead.
    """

    __slots__ = ("endpoint_ids", "groups", "request", "revision", "rules")

    def __init__(self, rules: Sequence[RuleInfo], revision: str, request: Sequence[RuleOutcome],
                 endpoint_ids: Sequence[str], groups: Sequence[JudgedGroup]) -> None:
        for g in groups:
            if len(g) != len(endpoint_ids):
                raise ValueError(f"{len(endpoint_ids)} endpoints but outcomes for {len(g)}")
        self.rules = tuple(rules)
        self.revision = revision
        self.request = tuple(request)
        self.endpoint_ids = endpoint_ids
        self.groups = tuple(groups)

    def rows(self) -> Iterator[tuple[int, RuleOutcome]]:
        """(candidate position, or -1 for the request, outcome), in :meth:`__iter__` order."""
        for o in self.request:
            yield -1, o
        groups = self.groups
        for i in range(len(self.endpoint_ids)):
            for g in groups:
                for o in g[i][1]:
                    yield i, o

    def _verdict(self, position: int, o: RuleOutcome) -> Verdict:
        r = self.rules[o[0]]
        eid = self.endpoint_ids[position] if position >= 0 else ""
        return Verdict(r.rule_id, r.engine, r.kind, o[1], o[2], self.revision, eid, r.severity)

    def __iter__(self) -> Iterator[Verdict]:
        return (self._verdict(i, o) for i, o in self.rows())

    def __len__(self) -> int:
        return len(self.request) + sum(len(j[1]) for g in self.groups for j in g)

    def _item(self, i: int) -> Verdict:
        return self._verdict(*next(islice(self.rows(), i, None)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def removing_rules(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for _, (r, allow, _reason) in self.rows():
            info = self.rules[r]
            if not allow and info.severity is Severity.DENY:
                seen.setdefault(info.rule_id, None)
        return tuple(seen)


@dataclass(frozen=True, slots=True)
class GuardResult:
    """What the guard stage returns: the survivors and every verdict it reached."""

    allowed: Sequence[Candidate]
    verdicts: Sequence[Verdict]
    revision: str
    quota_denied: bool = False

    def removing_rules(self) -> tuple[str, ...]:
        """Rule ids that removed at least one candidate, in first-seen order."""
        if isinstance(self.verdicts, VerdictTable):
            return self.verdicts.removing_rules()
        seen: dict[str, None] = {}
        for v in self.verdicts:
            if not v.allow and v.severity is Severity.DENY:
                seen.setdefault(v.rule_id, None)
        return tuple(seen)


@dataclass(frozen=True, slots=True)
class ScoredCandidate:
    """A surviving candidate with its feature vector and the scorer's estimates."""

    candidate: Candidate
    features: tuple[float, ...]
    expected_ttft_ms: float
    expected_cost_per_1k_tokens: float
    components: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Estimates:
    """The score stage's numbers for n candidates as columns: what a feature builder reads.

    ``telemetry`` has one row per candidate in :data:`decision.telemetry.CANONICAL` column order
    (NaN: unknown or stale); ``max_age_s`` is each candidate's oldest telemetry age (inf: none).
    """

    ttft_ms: NDArray[np.float64]
    cost_per_1k: NDArray[np.float64]
    queue_ms: NDArray[np.float64]
    rtt_ms: NDArray[np.float64]
    telemetry: NDArray[np.float64]
    max_age_s: NDArray[np.float64]


class ScoredArms(BuiltOnRead[ScoredCandidate]):
    """The score stage's output as columns: one row per allowed candidate.

    Learners read :attr:`matrix` (features) and :attr:`rank_ms` as they are, so nothing converts
    Python floats back into arrays on the request path. A :class:`ScoredCandidate` is built only
    for the arms someone reads by index (the chosen one, the fallbacks, the trace off the request
    path). The arrays are read-only.
    """

    __slots__ = ("candidates", "components", "cost_per_1k", "matrix", "rank_ms", "ttft_ms")

    def __init__(self, candidates: Sequence[Candidate], matrix: NDArray[np.float64], ttft_ms: NDArray[np.float64],
                 cost_per_1k: NDArray[np.float64], components: Mapping[str, NDArray[np.float64]],
                 rank_ms: NDArray[np.float64] | None = None) -> None:
        n = len(candidates)
        if matrix.shape[0] != n or ttft_ms.shape != (n,) or cost_per_1k.shape != (n,):
            raise ValueError(f"{n} candidates but arrays of shapes {matrix.shape}, {ttft_ms.shape}, "
                             f"{cost_per_1k.shape}")
        for a in (matrix, ttft_ms, cost_per_1k, *components.values()):
            a.setflags(write=False)
        self.candidates = candidates
        self.matrix = matrix
        self.ttft_ms = ttft_ms
        self.cost_per_1k = cost_per_1k
        self.components = dict(components)
        # What choices rank and fence by: the expected TTFT plus the delay the request would add to
        # later ones at that endpoint and the price put on its cost (score stage components
        # ``added_delay_ms`` and ``cost_penalty_ms``, when present). The score stage hands its own
        # sum over; arms rebuilt from ScoredCandidates derive it.
        if rank_ms is None:
            rank_ms = ttft_ms
            for name in ("added_delay_ms", "cost_penalty_ms"):
                extra = self.components.get(name)
                if extra is not None:
                    rank_ms = rank_ms + extra
        self.rank_ms = rank_ms
        self.rank_ms.setflags(write=False)

    @classmethod
    def of(cls, arms: Sequence[ScoredCandidate]) -> ScoredArms:
        """``arms`` as columns: itself when it already is, else converted (replays, tests)."""
        if isinstance(arms, ScoredArms):
            return arms
        names = list(arms[0].components) if arms else []
        width = len(arms[0].features) if arms else 0
        return cls([a.candidate for a in arms],
                   np.array([a.features for a in arms], dtype=np.float64).reshape(len(arms), width),
                   np.array([a.expected_ttft_ms for a in arms], dtype=np.float64),
                   np.array([a.expected_cost_per_1k_tokens for a in arms], dtype=np.float64),
                   {k: np.array([a.components.get(k, np.nan) for a in arms], dtype=np.float64) for k in names})

    def __len__(self) -> int:
        return len(self.candidates)

    def _item(self, i: int) -> ScoredCandidate:
        return ScoredCandidate(self.candidates[i], tuple(self.matrix[i].tolist()), float(self.ttft_ms[i]),
                               float(self.cost_per_1k[i]), {k: float(v[i]) for k, v in self.components.items()})


@dataclass(frozen=True, slots=True)
class Choice:
    """A learner's pick among the offered arms.

    ``arm`` indexes the sequence of arms offered; ``propensity`` is the probability with which
    this learner would have chosen that arm (1.0 for a deterministic learner); ``scores`` holds
    one score per offered arm, in order, higher is better.
    """

    arm: int
    propensity: float
    scores: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Route:
    endpoint_id: str
    address: str
    model: str
    node_id: str
    gpu_type: str
    site_id: str
    region: str
    tier: str

    @staticmethod
    def of(ep: Endpoint) -> Route:
        """The route to ``ep`` (one shared object per endpoint object: routes are immutable)."""
        hit = _ROUTES.get(id(ep))
        if hit is not None and hit[0] is ep:
            return hit[1]
        route = Route(ep.endpoint_id, ep.address, ep.model, ep.node_id, ep.gpu_type, ep.site_id, ep.region, ep.tier)
        put_bounded(_ROUTES, id(ep), (ep, route), 1_000_000)  # bounded: a fleet reload leaves old endpoints behind
        return route


_ROUTES: dict[int, tuple[Endpoint, Route]] = {}


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request, with its whole trace."""

    decision_id: str
    request: RequestContext
    route: Route
    fallbacks: tuple[Route, ...]
    propensity: float
    policy_revision: str
    learner: str
    expected_ttft_ms: float
    expected_cost_per_1k_tokens: float
    reason: str
    trace: Mapping[str, Any]
    decided_at: float
    decision_us: float
    # The compact form the audit log stores (decision.trace_format); ``trace`` is its readable view.
    stored_trace: Mapping[str, Any] = field(default_factory=dict)
    # Age of the oldest telemetry value the chosen endpoint was judged on (inf: none known).
    telemetry_age_s: float = float("inf")


class OutcomeStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Outcome:
    decision_id: str
    status: OutcomeStatus
    ttft_ms: float = 0.0
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    reported_at: float = 0.0
    served_endpoint_id: str = ""  # a fallback that served instead of the route ("" : the route)


# The error of a timeout the service logs for a decision whose outcome never came (see
# DecisionEngine._learn_missing). Reserved: a reported outcome's error may not start with it.
EXPIRED_PREFIX = "expired: "


def is_expiry(stored: Mapping[str, Any]) -> bool:
    """Whether a logged outcome is a timeout the service recorded (not one a client reported).

    >>> is_expiry({"status": "timeout", "error": EXPIRED_PREFIX + "no outcome within 120 s"})
    True
    >>> is_expiry({"status": "timeout", "error": "upstream timed out"})
    False
    """
    return stored.get("status") == "timeout" and str(stored.get("error") or "").startswith(EXPIRED_PREFIX)
