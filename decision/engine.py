"""The in-process decision pipeline: locate -> guard -> score -> choose -> audit.

One :class:`DecisionEngine` serves every front end (gRPC, CLI, simulator, Envoy ext_proc), so
what is benchmarked and simulated is the code that serves traffic. Each stage reads frozen
inputs and contributes its part of the "why this route" trace.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from decision.bounded import make_room, put_bounded
from decision.budget import apply_budget, over_budget
from decision.candidates import CandidateSet, Placement, endpoint_ids_of, endpoints_of, max_age_of
from decision.contracts import (
    PSEUDONYM_PREFIX,
    AuditSink,
    FeatureBuilder,
    Guard,
    Learner,
    OutcomeLookup,
    RewardFunction,
    TraceReader,
)
from decision.domain import (
    EXPIRED_PREFIX,
    Candidate,
    Choice,
    Decision,
    Endpoint,
    GuardResult,
    Outcome,
    OutcomeStatus,
    RequestContext,
    Route,
    ScoredArms,
    ScoredCandidate,
    is_expiry,
)
from decision.errors import InvalidArgument, NoCandidate, NotFound, QuotaExceeded, Unavailable
from decision.fleet import Fleet, endpoints_serving
from decision.ledger import EndpointLedger
from decision.outcome_claims import OutcomeClaims
from decision.scoring import ADDED_DELAY_WEIGHT, COST_WEIGHT_MS, BasicFeatures, score_candidates
from decision.telemetry import TelemetryStore
from decision.trace_format import TraceParts, assemble_trace, endpoint_row, expand_trace, trace_arms, trace_parts
from decision.validation import validate_outcome, validate_request

log = logging.getLogger("infermesh.engine")


def new_decision_id(now: float | None = None) -> str:
    """A UUIDv7-style id: time-ordered (good for partitions and cursors), 74 random bits."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 64) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def default_reward(ctx: RequestContext, outcome: Outcome, expected_ttft_ms: float,
                   cost_per_1k_tokens: float) -> float:
    """TTFT relative to target, minus failures: 1 at or under target, falling as TTFT grows; 0 for a
    cancellation (the client gave up, which says little about the route)."""
    if outcome.status is OutcomeStatus.CANCELLED:
        return 0.0
    if outcome.status is not OutcomeStatus.OK:
        return -1.0
    target = ctx.ttft_target_ms or 500.0
    return max(-1.0, 1.0 - max(0.0, outcome.ttft_ms - target) / target)


class LazyTrace(Mapping[str, Any]):
    """The trace, built on first read.

    Building the JSON-able trace costs more than the decision itself at 64 candidates, and the
    request path never reads it: the audit writer (off the request path, in its own process by
    default) or ``infermesh decide`` does. Everything it is built from is immutable, so building it
    later, or elsewhere, gives the same result. A stored trace is made from
    :class:`~decision.trace_format.TraceParts` (``gather``), which an audit sink may take instead
    of the built dict (:meth:`parts`).
    """

    __slots__ = ("_build", "_data", "_gather", "_parts")

    def __init__(self, build: Callable[[], dict[str, Any]] | None = None, *,
                 gather: Callable[[], TraceParts] | None = None) -> None:
        if (build is None) == (gather is None):
            raise ValueError("give exactly one of build and gather")
        self._build = build
        self._gather = gather
        self._parts: TraceParts | None = None
        self._data: dict[str, Any] | None = None

    def parts(self) -> TraceParts | None:
        """The parts a stored trace is assembled from (None for a view built otherwise)."""
        if self._parts is None and self._gather is not None:
            self._parts = self._gather()
            self._gather = None
        return self._parts

    def _materialise(self) -> dict[str, Any]:
        if self._data is None:
            if self._build is not None:
                self._data = self._build()
                self._build = None
            else:
                parts = self.parts()
                assert parts is not None
                self._data = assemble_trace(parts)
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._materialise()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._materialise())

    def __len__(self) -> int:
        return len(self._materialise())


@dataclass(slots=True)
class _Pending:
    ctx: RequestContext
    endpoint_id: str
    features: tuple[float, ...]
    expected_ttft_ms: float
    cost_per_1k_tokens: float
    deadline: float
    rtt_ms: float = 0.0  # the network part of expected_ttft_ms (calibration compares the rest)
    slowness: float = 1.0  # the endpoint's slowness the estimate used
    # When this decision's guard took its quota share (prefetch returned state); 0: nothing held here
    # (a policy without quota rules, or decided elsewhere): its outcome then trues nothing up.
    held_at: float = 0.0


@dataclass(frozen=True, slots=True)
class OutcomeResult:
    decision_id: str
    accepted: bool
    duplicate: bool
    reward: float | None


class DecisionEngine:
    """Composes the stages. Thread-safe: decisions may run concurrently with reloads."""

    def __init__(
        self,
        fleet: Fleet,
        telemetry: TelemetryStore,
        guard: Guard,
        learner: Learner,
        *,
        features: FeatureBuilder | None = None,
        audit: AuditSink | None = None,
        traces: TraceReader | None = None,
        reward: RewardFunction | None = None,
        shadow: Sequence[Learner] = (),
        max_fallbacks: int = 3,
        max_candidates: int = 256,
        count_inflight: bool = True,
        routers: int = 1,
        added_delay_weight: float = ADDED_DELAY_WEIGHT,
        cost_weight_ms: float = COST_WEIGHT_MS,
        outcome_timeout_s: float = 300.0,
        max_pending: int = 200_000,
        clock: Callable[[], float] = time.time,
        claims: OutcomeClaims | None = None,
    ) -> None:
        self._fleet = fleet
        self.telemetry = telemetry
        self._guard = guard
        self.learner = learner
        self.features: FeatureBuilder = features or BasicFeatures()
        self.audit = audit
        self.traces = traces
        self.reward: RewardFunction = reward or default_reward
        self.shadow = tuple(shadow)
        self.max_fallbacks = max_fallbacks
        self.max_candidates = max_candidates
        self.outcome_timeout_s = outcome_timeout_s
        self.max_pending = max_pending
        self.clock = clock
        # Replicas sharing a log: the first to claim a decision's outcome learns it (decision.outcome_claims).
        self.claims = claims
        # What this engine knows of each endpoint from its own traffic (in flight, prefill backlog,
        # outcome-calibrated slowness): exact and immediate, where scraped telemetry is seconds old
        # (a burst would herd onto what looked idle). count_inflight=False scores on telemetry alone.
        # With ``routers`` processes splitting the traffic, each counts its requests that many times.
        self.ledger = EndpointLedger(routers=routers)
        self.count_inflight = count_inflight
        self.added_delay_weight = added_delay_weight
        self.cost_weight_ms = cost_weight_ms
        self._placement: dict[tuple[str, str, str, str, str], Placement] = {}
        self._endpoint_rows: dict[tuple[str, str, str, str, str], list[list[Any]]] = {}
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._reported: dict[str, float | None] = {}
        self._reporting: set[str] = set()  # outcomes being recorded now (see report_outcome)
        self._claimed: set[str] = set()  # ... whose shared claim this replica holds (released if recording fails)
        # Decisions whose outcome did not come in time: a timeout was learnt; a late outcome is still
        # audited, and trues up the tenant's tokens (what the request held is kept for that).
        self._expired: dict[str, tuple[RequestContext, float]] = {}  # -> (request, held_at)
        # Past their deadline and being timed out now (off _pending, not yet learnt): an outcome that
        # arrives meanwhile takes the decision back and is recorded as in time.
        self._expiring: dict[str, _Pending] = {}
        # Recent denials (id -> status): an outcome for one is refused the same way at once, not
        # NOT_FOUND until the audit writer has stored the denial and INVALID_ARGUMENT after.
        self._denied: dict[str, str] = {}
        # Outcomes the audit log refused (fail-closed, queue full): the caller was told UNAVAILABLE and
        # its retry picks the decision up here, so the outcome is learnt and audited once, not lost.
        self._unrecorded: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        # Held from an outcome's reported_at stamp (the audit submit) to its learning, and by a learner
        # snapshot while it takes state and watermark (LearnerSync's barrier): an outcome is then in a
        # snapshot exactly when it was stamped at or before the watermark, so a restore that replays the
        # log after the watermark neither loses nor repeats it. Re-entrant: _learn takes it too.
        self._learn_lock = threading.RLock()
        self.stats: dict[str, int] = {"decisions": 0, "denied": 0, "quota_denied": 0, "outcomes": 0,
                                      "outcomes_missing": 0, "outcomes_duplicate": 0, "outcomes_late": 0,
                                      "outcomes_elsewhere": 0, "outcomes_by_fallback": 0, "updates_refused": 0,
                                      "expiries_unlogged": 0}
        # Called with each decision's stage times (µs) once it is made (metrics, benchmarks).
        self.on_stages: Callable[[Mapping[str, float]], None] | None = None

    # -- hot-swappable parts: a decision reads each reference once, so it sees one revision --
    @property
    def fleet(self) -> Fleet:
        return self._fleet

    def set_fleet(self, fleet: Fleet) -> None:
        self._fleet = fleet

    @property
    def guard(self) -> Guard:
        return self._guard

    def set_guard(self, guard: Guard) -> None:
        self._guard = guard

    # -- the pipeline --
    def locate(self, fleet: Fleet, ctx: RequestContext, now: float, *, client: str | None = None) -> CandidateSet:
        """The candidates for ``ctx``: where its model is placed, with their telemetry at ``now``.

        ``client`` is ``ctx.client_region`` as ``fleet.topology.canonical_client`` gives it, when the
        caller has it already (:meth:`decide` looks it up once, for this stage and the trace).
        """
        if client is None:
            client = fleet.topology.canonical_client(ctx.client_region)
        if ctx.model and ctx.model not in fleet.models:
            raise NotFound("model", ctx.model)
        if ctx.model and ctx.model_family and fleet.models[ctx.model].family != ctx.model_family:
            # Routed on the model alone, the trace would record a family the route does not have.
            raise InvalidArgument("model_family", f"model {ctx.model!r} is of family "
                                                  f"{fleet.models[ctx.model].family!r}, not {ctx.model_family!r}")
        if not ctx.model and ctx.model_family not in fleet.by_family:
            raise NotFound("model_family", ctx.model_family)
        placement = self._placed(fleet, ctx.model, ctx.model_family, ctx.modality, client)
        if not placement.endpoints and ctx.modality:
            self._check_modality(fleet, ctx)
        return CandidateSet(placement, self.telemetry.batch(placement.endpoint_ids, now, placement.telemetry_rows))

    @staticmethod
    def with_modality(fleet: Fleet, ctx: RequestContext) -> RequestContext:
        """``ctx`` with an unset modality set to what the model takes (rules, features and the audit log
        see that); unchanged when it names one."""
        if ctx.modality:
            return ctx
        return replace(ctx, modality=fleet.default_modality(ctx.model, ctx.model_family))

    @staticmethod
    def _check_modality(fleet: Fleet, ctx: RequestContext) -> None:
        """Nothing located for this modality: if the model is deployed, the request asked it for the wrong kind."""
        served = sorted({e.modality for e in endpoints_serving(fleet, ctx.model, ctx.model_family)})
        if served:  # else nothing is deployed at all: the guard stage's answer, as without a modality
            what = f"model {ctx.model}" if ctx.model else f"model family {ctx.model_family}"
            raise InvalidArgument("modality", f"{what} takes {' or '.join(served)} requests, not {ctx.modality}")

    def _placed(self, fleet: Fleet, model: str, family: str, modality: str, client: str) -> Placement:
        """The index read plus each endpoint's RTT and egress from the client, memoised per inventory revision."""
        key = (fleet.revision, model, family, modality, client)
        hit = self._placement.get(key)
        if hit is None:
            for gone in make_room(self._placement, 65536):
                del self._endpoint_rows[gone]
            serving = endpoints_serving(fleet, model, family, modality)
            hit = self._placement[key] = self.placement_of(fleet, serving, client, self.max_candidates,
                                                           rows_of=self.telemetry.rows_of)
            self._endpoint_rows[key] = [endpoint_row(e, rtt) for e, rtt in zip(hit.endpoints, hit.rtt_ms.tolist(),
                                                                                strict=True)]
        return hit

    @staticmethod
    def placement_of(fleet: Fleet, endpoints: Iterable[Endpoint], client: str, limit: int | None = None, *,
                     rows_of: Callable[[Sequence[str]], npt.NDArray[np.intp]] | None = None) -> Placement:
        """``endpoints`` with their RTT and egress from ``client`` (at most ``limit``: the nearest);
        with ``rows_of`` (``TelemetryStore.rows_of``), also their telemetry rows."""
        topo = fleet.topology
        paths = [(e, topo.path(client, e.site_id) if client else (fleet.spec.default_rtt_ms, 0.0)) for e in endpoints]
        if limit is not None and len(paths) > limit:
            # Bound the per-request work on huge fleets: the nearest endpoints by RTT (stable,
            # so ties keep inventory order). The guard stage still judges every one kept.
            paths = sorted(paths, key=lambda p: p[1][0])[:limit]
        eps = tuple(e for e, _ in paths)
        return Placement(eps, np.array([p[0] for _, p in paths], dtype=np.float64),
                         np.array([p[1] for _, p in paths], dtype=np.float64),
                         rows_of([e.endpoint_id for e in eps]) if rows_of is not None else None)

    def decide(self, ctx: RequestContext, *, alive: Callable[[], bool] | None = None) -> Decision:
        """Run the pipeline for one request; raises a :class:`DecisionError` subclass on failure.

        ``alive`` (the gRPC caller still waiting?) is asked once the decision is made, before it is
        logged and booked: one nobody will act on must hold no quota share, count no request in
        flight and teach the learner no timeout.
        """
        validate_request(ctx)
        t0 = time.perf_counter()
        now = self.clock()
        fleet, guard, learner = self._fleet, self._guard, self.learner
        ctx = self.with_modality(fleet, ctx)
        decision_id = new_decision_id(now)
        client = fleet.topology.canonical_client(ctx.client_region)  # keys the placement and the trace's rows
        candidates = self.locate(fleet, ctx, now, client=client)
        t1 = time.perf_counter()
        # Pre-fetched state (quota counters, with this request's share held) plus what memoising
        # guards key on. A request that is not routed (denied, failed, refused) gives its share back.
        prefetched = guard.prefetch(ctx)
        state = {**prefetched, "inventory_revision": fleet.revision, "now": now}
        try:
            t2 = time.perf_counter()
            result = guard.evaluate(ctx, candidates, state)
            t3 = time.perf_counter()
            guarded_us = {"locate": (t1 - t0) * 1e6, "prefetch": (t2 - t1) * 1e6, "guard": (t3 - t2) * 1e6}
            if not result.allowed:
                self._deny(decision_id, ctx, fleet, client, candidates, result, learner, now, guarded_us)
            scored = self._score(ctx, fleet, result.allowed, now)
            over = over_budget(scored.cost_per_1k, ctx.max_cost_per_1k_tokens)
            if over is not None:  # the request's own cost cap, a hard rule like the guard's
                result = apply_budget(result, scored.cost_per_1k, over, ctx.max_cost_per_1k_tokens)
                if not result.allowed:
                    self._deny(decision_id, ctx, fleet, client, candidates, result, learner, now, guarded_us)
                scored = self._score(ctx, fleet, result.allowed, now)
            t4 = time.perf_counter()
            choice = learner.choose(ctx, scored)
            if not 0 <= choice.arm < len(scored) or not 0.0 < choice.propensity <= 1.0:
                raise RuntimeError(f"learner {learner.name} returned an invalid choice {choice}")
            shadows = [self._shadow_choice(s, ctx, scored) for s in self.shadow]
            t5 = time.perf_counter()
            # The chosen arm is read from the score stage's columns (a ScoredCandidate would build the
            # candidate's whole telemetry reading, which nothing here needs).
            arm = choice.arm
            allowed_eps = endpoints_of(scored.candidates)
            ep = allowed_eps[arm]
            ttft_ms, cost = float(scored.ttft_ms[arm]), float(scored.cost_per_1k[arm])
            # Fallbacks: the next best by the learner's scores (stable: ties keep the offered order).
            order = np.argsort(-np.asarray(choice.scores, dtype=np.float64), kind="stable")[: self.max_fallbacks + 1]
            fallbacks = tuple(Route.of(allowed_eps[i]) for i in order.tolist() if i != arm)[: self.max_fallbacks]
            timings = {**guarded_us, "score": (t4 - t3) * 1e6, "choose": (t5 - t4) * 1e6}
            stored, trace = self._trace(ctx, fleet, client, candidates, result, scored, choice, fallbacks, learner,
                                        shadows, timings, now)
            decision_us = (time.perf_counter() - t0) * 1e6
            decision = Decision(
                decision_id=decision_id, request=ctx, route=Route.of(ep), fallbacks=fallbacks,
                propensity=choice.propensity, policy_revision=result.revision,
                learner=f"{learner.name}@{learner.version}", expected_ttft_ms=ttft_ms, expected_cost_per_1k_tokens=cost,
                reason=self._reason(ep, ttft_ms, cost, len(candidates), len(result.allowed), choice, learner),
                trace=trace, decided_at=now, decision_us=decision_us, stored_trace=stored,
                telemetry_age_s=max_age_of(scored.candidates, arm),
            )
            if alive is not None and not alive():
                raise Unavailable("the caller went away before the decision was made; it was not routed")
            if self.audit is not None:
                self.audit.submit_decision(decision_event(decision, "routed", ()))  # may refuse (fail-closed)
            # Only once the log took it: a refused decision was never routed, so it must leave no trace in
            # the ledger (in flight, prefill backlog, arrival rate). No outcome can come before we return.
            self._remember(decision_id, _Pending(ctx, ep.endpoint_id, tuple(scored.matrix[arm].tolist()), ttft_ms, cost,
                                                 now + self.outcome_timeout_s, float(scored.components["rtt_ms"][arm]),
                                                 self.ledger.slowness(ep.endpoint_id) if self.count_inflight else 1.0,
                                                 now if prefetched else 0.0),
                           now, float(scored.components["prefill_ms"][arm]) / 1000.0)
        except BaseException:
            self._forget(decision_id)  # never routed, so never in flight nor learnt
            guard.release(ctx, state)
            raise
        guard.commit(ctx, decision)
        self.stats["decisions"] += 1
        if self.on_stages is not None:
            self.on_stages(timings)
        return decision

    def _score(self, ctx: RequestContext, fleet: Fleet, allowed: Sequence[Candidate], now: float) -> ScoredArms:
        return score_candidates(ctx, allowed, self.features, self._egress(fleet, ctx.client_region, allowed),
                                ledger=self.ledger if self.count_inflight else None, now=now,
                                added_delay_weight=self.added_delay_weight, cost_weight_ms=self.cost_weight_ms)

    @staticmethod
    def _egress(fleet: Fleet, client: str, allowed: Sequence[Candidate]) -> Mapping[str, float]:
        """Egress $/GB to the client per site (a located set carries it already)."""
        if not client or isinstance(allowed, CandidateSet):
            return {}
        return {sid: fleet.topology.path(client, sid)[1] for sid in {c.endpoint.site_id for c in allowed}}

    def _shadow_choice(self, learner: Learner, ctx: RequestContext, scored: ScoredArms) -> dict[str, Any]:
        try:
            c = learner.choose(ctx, scored)
            return {"learner": f"{learner.name}@{learner.version}",
                    "chosen": endpoint_ids_of(scored.candidates)[c.arm], "propensity": c.propensity}
        except Exception as exc:  # a shadow must never break the acting decision
            return {"learner": f"{learner.name}@{learner.version}", "error": repr(exc)}

    def _deny(self, decision_id: str, ctx: RequestContext, fleet: Fleet, client: str, candidates: Sequence[Candidate],
              result: GuardResult, learner: Learner, now: float, timings: Mapping[str, float]) -> None:
        rules = result.removing_rules()
        trace, _ = self._trace(ctx, fleet, client, candidates, result, (), None, (), learner, [], timings, now)
        status = "quota_denied" if result.quota_denied else "denied"
        self.stats[status] += 1
        with self._lock:
            put_bounded(self._denied, decision_id, status, self.max_pending)
        if self.audit is not None:
            self.audit.submit_decision(denial_event(decision_id, ctx, now, result.revision,
                                                    f"{learner.name}@{learner.version}", status, rules, trace))
        if result.quota_denied:
            raise QuotaExceeded(rules, decision_id)
        raise NoCandidate(rules, decision_id)

    @staticmethod
    def _reason(ep: Endpoint, ttft_ms: float, cost: float, n_located: int, n_allowed: int, choice: Choice,
                learner: Learner) -> str:
        return (f"{learner.name} chose {ep.endpoint_id} ({ep.gpu_type} at {ep.site_id}, {ep.tier}) of "
                f"{n_allowed} allowed/{n_located} located: expected TTFT {ttft_ms:.0f} ms, "
                f"${cost:.5f}/1K tokens, p={choice.propensity:.3f}")

    def _trace(self, ctx: RequestContext, fleet: Fleet, client: str, candidates: Sequence[Candidate],
               result: GuardResult, scored: Sequence[ScoredCandidate], choice: Choice | None,
               fallbacks: tuple[Route, ...], learner: Learner, shadows: list[dict[str, Any]],
               timings: Mapping[str, float], now: float) -> tuple[LazyTrace, LazyTrace]:
        """(stored compact trace, readable view of it), both built only when first read; ``client`` is
        the canonical client the locate stage keyed its placement on."""
        endpoints = self._endpoint_rows.get((fleet.revision, ctx.model, ctx.model_family, ctx.modality, client))
        stored = LazyTrace(gather=lambda: trace_parts(
            ctx=ctx, inventory_revision=fleet.revision, learner=f"{learner.name}@{learner.version}", now=now,
            candidates=candidates, result=result, scored=scored, choice=choice, fallbacks=fallbacks,
            shadows=shadows, feature_names=self.features.names, timings=timings, endpoints=endpoints))
        return stored, LazyTrace(lambda: expand_trace(stored))

    # -- outcomes --
    def _remember(self, decision_id: str, pending: _Pending, now: float, prefill_s: float) -> None:
        expired: list[str] = []
        eid = pending.endpoint_id
        with self._lock:
            self._pending[decision_id] = pending
            self.ledger.sent(eid, now, prefill_s)
            while len(self._pending) > self.max_pending:
                did, oldest = self._pending.popitem(last=False)
                self._expiring[did] = self._release(oldest)
                expired.append(did)
        for did in expired:
            self._time_out(did, f"more than {self.max_pending} decisions were waiting for theirs")

    def _time_out(self, decision_id: str, why: str) -> None:
        """Learn and log the timeout of an expiring decision, unless its outcome came meanwhile.

        Under the learning lock from the moment it counts as expired: a late outcome (which takes that
        lock to be logged) is then logged after the timeout, never before it.
        """
        with self._learn_lock:
            with self._lock:
                p = self._expiring.pop(decision_id, None)
                if p is None:  # an outcome took it back: recorded as in time
                    return
                put_bounded(self._expired, decision_id, (p.ctx, p.held_at), self.max_pending)
            self._learn_missing(decision_id, p, why)

    def _forget(self, decision_id: str) -> None:
        """Drop a remembered decision that was not answered after all (no outcome will come)."""
        with self._lock:
            p = self._pending.pop(decision_id, None)
            if p is not None:
                self._release(p)

    def _release(self, p: _Pending) -> _Pending:
        """The decision is no longer in flight at its endpoint (call with ``_lock`` held)."""
        self.ledger.done(p.endpoint_id)
        return p

    def inflight(self, endpoint_id: str) -> int:
        """Decisions routed to ``endpoint_id`` whose outcome has not come back (nor timed out), each
        counted ``routers`` times (the ledger's estimate of every router's, see decision.ledger)."""
        return self.ledger.inflight(endpoint_id)

    def _learn_missing(self, decision_id: str, p: _Pending, why: str) -> None:
        """A decision whose outcome never came: a failure signal for the learner, and a timeout outcome
        in the audit log with the reward learnt, so a restore replays it and a late outcome reaching
        another replica (or this one after a restart) is recorded there without being learnt again."""
        self.stats["outcomes_missing"] += 1
        missing = Outcome(decision_id, OutcomeStatus.TIMEOUT, error=f"{EXPIRED_PREFIX}{why}")
        reward = self.reward(p.ctx, missing, p.expected_ttft_ms, p.cost_per_1k_tokens)
        # The caller (_time_out) holds _learn_lock: stamped and learnt as one (see outcome_barrier).
        if self.audit is not None:
            try:
                self.audit.submit_outcome(outcome_event(missing, reward, self.clock()))
            except Exception as exc:  # learnt all the same; only a restore will not see it
                self.stats["expiries_unlogged"] += 1
                log.warning("could not log the timeout of decision %s: %s", decision_id, exc)
        self._learn(p.features, reward)

    def _learn(self, features: tuple[float, ...], reward: float) -> None:
        """The acting learner and every shadow learn from the acting policy's logged outcome."""
        with self._learn_lock:
            for learner in (self.learner, *self.shadow):
                try:
                    learner.update(features, reward)
                except ValueError as exc:  # refused whole (non-finite or overflowing): the rest still learn
                    self.stats["updates_refused"] += 1
                    log.warning("learner %s refused an update: %s", learner.name, exc)

    def expire_outcomes(self, now: float | None = None) -> int:
        """Treat outcomes past their timeout as failures; returns how many expired.

        An outcome another replica or worker recorded in the shared audit log (a client's retry or
        load balancer may send it anywhere) is not a failure: that replica learnt it, so it is not
        learnt here again as a timeout.
        """
        t = self.clock() if now is None else now
        expired: list[tuple[str, _Pending]] = []
        with self._lock:
            while self._pending:
                did, p = next(iter(self._pending.items()))
                if p.deadline > t:
                    break
                self._release(self._pending.popitem(last=False)[1])
                expired.append((did, p))
                self._expiring[did] = p
            # Outcomes the audit log refused (released already) whose caller never retried: missing too.
            for did in [d for d, p in self._unrecorded.items() if p.deadline <= t]:
                p = self._unrecorded.pop(did)
                expired.append((did, p))
                self._expiring[did] = p
        elsewhere: set[str] = set()
        if expired and isinstance(self.traces, OutcomeLookup):
            try:
                elsewhere = self.traces.reported_among([did for did, _ in expired])
            except Exception:  # the log is down: a timeout is what this replica knows
                log.warning("could not ask the audit log which of %d expired decisions have outcomes", len(expired),
                            exc_info=True)
        for did, _ in expired:
            if did in elsewhere:  # learnt there; an outcome retried here later is a duplicate, not late
                with self._lock:
                    if self._expiring.pop(did, None) is not None:
                        put_bounded(self._reported, did, None, self.max_pending)
                self.stats["outcomes_elsewhere"] += 1
            else:
                self._time_out(did, f"no outcome was reported within {self.outcome_timeout_s:g} s")
        return len(expired)

    def report_outcome(self, outcome: Outcome) -> OutcomeResult:
        """Join an outcome to its decision, update the learner once, and audit it. Idempotent."""
        validate_outcome(outcome)
        did = outcome.decision_id
        with self._lock:
            held = self._held(did)
            if held is not None:  # before anything is claimed: a corrected retry is taken as usual
                self._check_served(outcome, held.endpoint_id)
            pending = self._pending.pop(did, None)
            if pending is not None:
                self._release(pending)
            else:  # being timed out right now (released already): in time after all; or a retry after
                # the audit log refused it
                pending = self._expiring.pop(did, None) or self._unrecorded.pop(did, None)
            if pending is None and (did in self._reported or did in self._reporting):  # reported, or being now
                self.stats["outcomes_duplicate"] += 1
                return OutcomeResult(did, True, True, self._reported.get(did))
            # Claimed under the lock, so a concurrent duplicate (a retry, a hedge) is answered as one.
            self._reporting.add(did)
            late = self._expired.get(did) if pending is None else None
        recorded = False
        try:
            result = self._record_outcome(outcome, pending, late)
            recorded = True
            return result
        finally:
            with self._lock:
                self._reporting.discard(did)
                claimed = did in self._claimed
                self._claimed.discard(did)
            if claimed and not recorded and self.claims is not None:  # e.g. the audit log refused it: a retry
                self.claims.release(did)  # must be able to claim it again

    def _claim(self, decision_id: str) -> bool:
        """Whether this replica records (and learns) the outcome: no shared claims, or the first to claim."""
        if self.claims is None:
            return True
        if not self.claims.claim(decision_id):
            return False
        with self._lock:
            self._claimed.add(decision_id)
        return True

    def _learnt_elsewhere(self, decision_id: str) -> OutcomeResult:
        """Another replica claimed this outcome first and learnt it: a duplicate here, learnt once."""
        self.stats["outcomes_duplicate"] += 1
        self.stats["outcomes_elsewhere"] += 1
        with self._lock:
            put_bounded(self._reported, decision_id, None, self.max_pending)
            self._expired.pop(decision_id, None)
        return OutcomeResult(decision_id, True, True, None)

    def _record_outcome(self, outcome: Outcome, pending: _Pending | None,
                        late: tuple[RequestContext, float] | None) -> OutcomeResult:
        did = outcome.decision_id
        reward: float | None = None
        if pending is not None:
            if not self._claim(did):
                return self._learnt_elsewhere(did)
            outcome, learnt, fallback = self._as_learnt(outcome, pending.endpoint_id, pending.expected_ttft_ms)
            reward = self.reward(pending.ctx, learnt, pending.expected_ttft_ms, pending.cost_per_1k_tokens)
            with self._learn_lock:  # stamped and learnt as one, for snapshots (see outcome_barrier)
                self._audit_outcome(outcome, reward, pending)  # before learning: a refused outcome is retried whole
                self._learn(pending.features, reward)
            if pending.held_at:
                self._guard.settle(pending.ctx, outcome, pending.held_at)
            if outcome.status == OutcomeStatus.OK and outcome.ttft_ms > 0 and not fallback:
                with self._lock:
                    self.ledger.observed(pending.endpoint_id, expected_ms=pending.expected_ttft_ms - pending.rtt_ms,
                                         observed_ms=outcome.ttft_ms - pending.rtt_ms, slowness=pending.slowness)
        elif late is not None:  # the timeout was learnt; what did happen belongs in the log, learnt once is enough
            self.stats["outcomes_late"] += 1
            with self._learn_lock:  # after the timeout's own log entry, if that is being written now
                self._audit_outcome(outcome, None, None)
            late_ctx, held_at = late
            if held_at:
                self._guard.settle(late_ctx, outcome, held_at)  # a long generation still counts its tokens
        else:  # not decided here since this process started (a restart, another replica): ask the log
            denied = self._denied.get(did)
            record = self.traces.get_decision(did) if self.traces is not None and denied is None else None
            if record is None and denied is None:
                raise NotFound("decision", did, "decision_id")
            status = denied or (record or {}).get("status", "routed")
            if status != "routed":  # a denial was never routed: nothing ran that could have an outcome
                raise InvalidArgument("decision_id", f"decision {did!r} was {status}, not routed; it has no outcome")
            assert record is not None  # a routed decision found in the log
            stored = record.get("outcome")
            if stored and is_expiry(stored):  # the deciding replica learnt a timeout: record, learn nothing
                return self._record_late_elsewhere(outcome, record)
            if stored:  # reported before: idempotent across restarts too (the log keeps the first)
                prior = stored.get("reward")
                with self._lock:
                    put_bounded(self._reported, did, prior, self.max_pending)
                self.stats["outcomes_duplicate"] += 1
                return OutcomeResult(did, True, True, prior)
            route = str(record.get("endpoint_id") or "")
            self._check_served(outcome, route)
            if not self._claim(did):
                return self._learnt_elsewhere(did)
            logged = self._logged_arm(record)
            outcome, learnt, _ = self._as_learnt(outcome, route, logged.expected_ttft_ms if logged else 0.0)
            if logged is not None:
                reward = self.reward(logged.ctx, learnt, logged.expected_ttft_ms, logged.cost_per_1k_tokens)
            with self._learn_lock:
                self._audit_outcome(outcome, reward, None)
                if logged is not None and reward is not None:
                    self._learn(logged.features, reward)
            self._settle_logged(record, outcome)
        with self._lock:
            put_bounded(self._reported, did, reward, self.max_pending)
            self._expired.pop(did, None)
        self.stats["outcomes"] += 1
        return OutcomeResult(did, True, False, reward)

    def _check_served(self, outcome: Outcome, route_endpoint_id: str) -> None:
        """An outcome names the route, or an endpoint of the inventory (a fallback): else a typo, refused.
        The route's own id is taken even after a reload removed its endpoint."""
        served = outcome.served_endpoint_id
        if served and served != route_endpoint_id and served not in self._fleet.by_id:
            raise InvalidArgument("served_endpoint_id", f"unknown endpoint {served!r}")

    def _as_learnt(self, outcome: Outcome, route_endpoint_id: str,
                   expected_ttft_ms: float) -> tuple[Outcome, Outcome, bool]:
        """(the outcome to log, the outcome the route's arm learns, whether a fallback served it).

        When a fallback served, the route did not: its arm learns a failure (the fallback's result is
        not the route's, and the fallback's own propensity is unknown); the log keeps what happened.
        An OK outcome with no TTFT (0, the API's unset value) is learnt at the expected TTFT: the
        route is credited for serving, not for a first token faster than any measured.
        """
        if outcome.served_endpoint_id in ("", route_endpoint_id):
            if outcome.status is OutcomeStatus.OK and outcome.ttft_ms <= 0 and expected_ttft_ms > 0:
                return outcome, replace(outcome, ttft_ms=expected_ttft_ms), False
            return outcome, outcome, False
        self.stats["outcomes_by_fallback"] += 1
        note = f"served by fallback {outcome.served_endpoint_id}"
        logged = replace(outcome, error=f"{outcome.error}; {note}" if outcome.error else note)
        return logged, replace(logged, status=OutcomeStatus.ERROR), True

    def _record_late_elsewhere(self, outcome: Outcome, record: Mapping[str, Any]) -> OutcomeResult:
        """An outcome for a decision whose deciding replica already logged a timeout (and learnt it):
        kept in the log after that timeout (``outcome_conflicts``), counted against the tenant's
        tokens, not learnt again."""
        did = outcome.decision_id
        if any(not is_expiry(o) for o in record.get("conflicting_outcomes") or ()):  # recorded once already
            self.stats["outcomes_duplicate"] += 1
            with self._lock:
                put_bounded(self._reported, did, None, self.max_pending)
            return OutcomeResult(did, True, True, None)
        self.stats["outcomes_late"] += 1
        self._audit_outcome(outcome, None, None)
        self._settle_logged(record, outcome)
        with self._lock:
            put_bounded(self._reported, did, None, self.max_pending)
        self.stats["outcomes"] += 1
        return OutcomeResult(did, True, False, None)

    def _settle_logged(self, record: Mapping[str, Any], outcome: Outcome) -> None:
        """True up the tokens of a decision known only from its log record (another replica's, or
        this one's before a restart): the tenant's counters are shared, any replica can."""
        held = _logged_hold(record)
        if held is not None:
            held_ctx, decided_at = held
            self._guard.settle(held_ctx, outcome, decided_at)

    def _audit_outcome(self, outcome: Outcome, reward: float | None, pending: _Pending | None) -> None:
        """Submit the outcome to the audit log; when it refuses, keep ``pending`` for the caller's retry."""
        if self.audit is None:
            return
        try:
            self.audit.submit_outcome(outcome_event(outcome, reward, self.clock()))
        except BaseException:
            if pending is not None:
                with self._lock:
                    put_bounded(self._unrecorded, outcome.decision_id, pending, self.max_pending)
            raise

    def _logged_arm(self, record: Mapping[str, Any]) -> _Pending | None:
        """What learning needs of a decision made by another replica (or before a restart), from its logged
        trace; ``None`` when another learner version made it (its features may not be this one's)."""
        learner = f"{self.learner.name}@{self.learner.version}"
        trace = record.get("trace") or {}
        try:
            if record.get("learner") != learner:
                return None
            arms = trace_arms(trace, self.features.names)
            if arms.chosen < 0:
                return None
            i = arms.chosen
            request = trace.get("request") or {}
            ctx = RequestContext(str(record.get("request_id") or ""), str(record.get("tenant") or ""),
                                 user_tier=str(record.get("user_tier") or "standard"),
                                 ttft_target_ms=float(request.get("ttft_target_ms") or 0.0),
                                 max_cost_per_1k_tokens=float(request.get("max_cost_per_1k_tokens") or 0.0))
            return _Pending(ctx, arms.endpoint_ids[i], tuple(arms.features[i].tolist()), arms.expected_ttft_ms[i],
                            arms.expected_cost_per_1k_tokens[i], 0.0)
        except (KeyError, TypeError, ValueError, IndexError):  # an older trace shape: record, do not learn
            return None

    @property
    def outcome_barrier(self) -> AbstractContextManager[Any]:
        """The lock held from an outcome's ``reported_at`` stamp to its learning: hand it to
        :class:`learners.sync.LearnerSync` as ``barrier`` so a snapshot never falls between the two."""
        return self._learn_lock

    def pending_outcomes(self) -> int:
        return len(self._pending)

    def holds(self, decision_id: str) -> bool:
        """Whether an outcome for ``decision_id`` is answered from memory, without I/O (a hint: it may
        change the moment after; an asyncio server uses it to keep database and Redis calls off its
        loop). One this replica holds needs the shared claim first, when claims are configured."""
        if decision_id in self._reported or decision_id in self._denied or decision_id in self._expired:
            return True
        return self.claims is None and self._held(decision_id) is not None

    def _held(self, decision_id: str) -> _Pending | None:
        """The decision an outcome for ``decision_id`` would settle: waiting, being timed out, or
        refused by the audit log and kept for a retry."""
        return self._pending.get(decision_id) or self._expiring.get(decision_id) or self._unrecorded.get(decision_id)


def _logged_hold(record: Mapping[str, Any]) -> tuple[RequestContext, float] | None:
    """What a decision made elsewhere (another replica, before a restart) held of its tenant's quota:
    the request's tenant and token estimate, and when; ``None`` when its log record cannot say (a
    masked or removed tenant, an older trace shape)."""
    tenant = str(record.get("tenant") or "")
    if not tenant or tenant.startswith(PSEUDONYM_PREFIX):
        return None
    request = (record.get("trace") or {}).get("request") or {}
    try:
        ctx = RequestContext(str(record.get("request_id") or ""), tenant,
                             user_tier=str(record.get("user_tier") or "standard"),
                             estimated_input_tokens=int(request.get("estimated_input_tokens") or 0),
                             expected_output_tokens=int(request.get("expected_output_tokens") or 0))
        return ctx, int(record["decided_at_us"]) / 1e6
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def decision_event(d: Decision, status: str, rules: tuple[str, ...]) -> dict[str, Any]:
    """The audit record of a routed decision (``DecisionEventV1`` fields)."""
    return {
        "event_version": 1, "decision_id": d.decision_id, "decided_at": d.decided_at, "status": status,
        "request_id": d.request.request_id, "tenant": d.request.tenant, "user_tier": d.request.user_tier,
        "model": d.route.model, "endpoint_id": d.route.endpoint_id, "site_id": d.route.site_id,
        "region": d.route.region, "tier": d.route.tier, "gpu_type": d.route.gpu_type,
        "propensity": d.propensity, "policy_revision": d.policy_revision, "learner": d.learner,
        "expected_ttft_ms": d.expected_ttft_ms, "expected_cost_per_1k_tokens": d.expected_cost_per_1k_tokens,
        "deny_rules": list(rules), "reason": d.reason, "decision_us": d.decision_us, "trace": d.stored_trace,
    }


def denial_event(decision_id: str, ctx: RequestContext, now: float, revision: str, learner: str,
                 status: str, rules: tuple[str, ...], trace: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "event_version": 1, "decision_id": decision_id, "decided_at": now, "status": status,
        "request_id": ctx.request_id, "tenant": ctx.tenant, "user_tier": ctx.user_tier,
        "model": ctx.model or ctx.model_family, "endpoint_id": None, "site_id": None, "region": None,
        "tier": None, "gpu_type": None, "propensity": None, "policy_revision": revision, "learner": learner,
        "expected_ttft_ms": None, "expected_cost_per_1k_tokens": None, "deny_rules": list(rules),
        "reason": f"denied by {', '.join(rules) or 'no candidates'}", "decision_us": None, "trace": trace,
    }


def outcome_event(o: Outcome, reward: float | None, now: float) -> dict[str, Any]:
    return {"event_version": 1, "decision_id": o.decision_id, "status": str(o.status), "ttft_ms": o.ttft_ms,
            "latency_ms": o.latency_ms, "input_tokens": o.input_tokens, "output_tokens": o.output_tokens,
            "error": o.error, "reward": reward, "reported_at": o.reported_at or now}
