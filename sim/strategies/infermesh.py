"""The ``infermesh`` strategy: the real :class:`decision.engine.DecisionEngine`, on simulated time.

Nothing of the pipeline is re-implemented here. The strategy builds the engine with the guard
and learner it is given (by default the best available: the policy bundle's ``PolicyGuard`` and
the LinUCB learner over ``learners.features``; else the built-in health rule and the
least-expected-TTFT scorer), feeds the engine's ``TelemetryStore`` the simulator's stale
telemetry, asks ``decide`` for every request, and reports every outcome back through
``report_outcome``, so the learner learns from simulated TTFTs exactly as it would from live ones.

Candidate search is hierarchical, as a large fleet needs: the simulator's router view narrows
the family to at most a few thousand endpoints (cells), and this strategy offers the engine a
shortlist of ``shortlist`` endpoints drawn from them, half from the client's own region. The
shortlist replaces only the index read of the locate stage; guard, score, choose and outcome
handling are the engine's own.

With ``workers`` > 1 the strategy is ``serve --workers N``: one engine per worker process, each
with what a process has of its own (the engine and its ledger, the guard, the learner, the
feature builder) and seeing only the requests assigned to it; each worker's outcomes go back to
it. What the processes share is shared as they share it: every worker scrapes the same
telemetry (one store here, fed the same snapshots: the scrape phases are not modelled), and
linear learners merge their sufficient statistics through the learner store every
``sync_interval_s`` (the real :class:`learners.sync.LearnerSync`, over an in-memory
:class:`DeltaLog` instead of PostgreSQL). The simulator's engine queues the requests at the workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from decision.candidates import CandidateSet
from decision.contracts import FeatureBuilder, Guard, Learner, RewardFunction
from decision.domain import Endpoint, Outcome, OutcomeStatus, RequestContext
from decision.engine import DecisionEngine
from decision.errors import DecisionError
from decision.fleet import Fleet, taking_modality
from decision.health_guard import BuiltinHealthGuard
from decision.scoring import ADDED_DELAY_WEIGHT, COST_WEIGHT_MS
from decision.telemetry import TelemetryStore
from decision.workers import worker_replica
from learners.least_ttft import LeastExpectedTtft
from learners.store import Delta, LearnerStore
from learners.sync import LearnerSync
from sim.model import Request
from sim.strategies.base import RouterView, Strategy
from sim.world import I64

log = logging.getLogger("infermesh.sim")
DEFAULT_SHORTLIST = 16  # endpoints offered to the engine per decision


def _default_sync_interval() -> float:
    """The service's ``learner.sync_interval_s`` default (its config is the one source)."""
    from decision.config import LearnerSection

    return float(LearnerSection.model_fields["sync_interval_s"].default)


class DeltaLog:
    """The ``learner_deltas`` table in memory: what :class:`learners.sync.LearnerSync` writes and reads.

    Writes are idempotent on (learner, version, replica, seq) and reads return every other
    replica's deltas past the caller's marks in (replica, seq) order, as
    :class:`learners.store.LearnerStore` does in PostgreSQL.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str, int], Delta] = {}

    def write_delta(self, *, learner: str, version: str, replica: str, seq: int, dA: NDArray[np.float64],
                    db: NDArray[np.float64], dn: int) -> None:
        """Store one delta (a copy: the learner's arrays are its own); a repeated seq is a no-op.

        Parameters
        ----------
        learner, version
            The learner's key (``LearnerSync.key``).
        replica, seq
            The writing replica and its delta's number.
        dA, db, dn
            The increments of the sufficient statistics and the number of updates they hold.
        """
        self._rows.setdefault((learner, version, replica, seq), Delta(replica, seq, dA.copy(), db.copy(), dn))

    def read_deltas(self, *, learner: str, version: str, after: Mapping[str, int],
                    exclude_replica: str | None = None) -> list[Delta]:
        """Deltas of every replica but ``exclude_replica`` with a seq above ``after``'s mark for it.

        Parameters
        ----------
        learner, version
            The learner's key.
        after
            The last seq already merged, by replica (none: 0).
        exclude_replica
            The reader's own replica id.

        Returns
        -------
        list of Delta
            In (replica, seq) order.
        """
        return [d for (name, ver, rep, seq), d in sorted(self._rows.items(), key=lambda kv: kv[0])
                if name == learner and ver == version and rep != exclude_replica and seq > after.get(rep, 0)]


class ShortlistEngine(DecisionEngine):
    """The engine with the locate stage's index read narrowed to a given shortlist."""

    shortlist: Sequence[Endpoint] | None = None

    def locate(self, fleet: Fleet, ctx: RequestContext, now: float, *, client: str | None = None) -> CandidateSet:
        eps = self.shortlist
        if eps is None:
            return super().locate(fleet, ctx, now, client=client)
        placement = self.placement_of(fleet, taking_modality(eps, ctx.modality), ctx.client_region)  # as locate does
        return CandidateSet(placement, self.telemetry.batch(placement.endpoint_ids, now))


def default_guard(clock: Callable[[], float]) -> Guard:
    """The shipped policy bundle if the policies package is installed, else the built-in rule."""
    try:
        from policies.bundle import DEFAULT_BUNDLE, compile_bundle
        from policies.guard import PolicyGuard
    except ImportError:
        return BuiltinHealthGuard()
    return PolicyGuard(compile_bundle(DEFAULT_BUNDLE), clock=clock)


def default_learner(name: str, seed: int, params: Mapping[str, Any] | None = None, cost_weight_ms: float = 0.0,
                    ) -> tuple[Learner, FeatureBuilder | None, RewardFunction | None]:
    """A registered learner (with ``params``) over the learners' feature builder and reward (which
    prices cost as the score stage does, ``cost_weight_ms``), else the scorer."""
    try:
        from learners.features import default_feature_builder
        from learners.registry import make_learner
        from learners.reward import ObjectiveReward
    except ImportError:
        return LeastExpectedTtft(), None, None
    fb = default_feature_builder()
    kw: dict[str, Any] = {} if name == "least-ttft" else {"seed": seed}
    kw.update(params or {})
    return make_learner(name, len(fb.names), **kw), fb, ObjectiveReward(cost_weight_ms=cost_weight_ms)


class InferMesh(Strategy):
    """Routes through the real decision pipeline.

    Parameters
    ----------
    learner
        Registered learner name (``linucb``, ``linear-ts``, ``least-ttft``...).
    params
        The learner's hyperparameters (its defaults otherwise).
    shortlist
        Endpoints offered to the engine per decision.
    added_delay, cost_weight_ms
        The engine's ``added_delay_weight`` and ``cost_weight_ms`` (config ``decision.*``; None: the
        engine's defaults, :meth:`configure` sets them from a scenario).
    routers
        The engine's ``routers`` (config ``decision.routers``): how many times each worker counts its
        own requests in its ledger; None or 0: the workers, as ``serve`` does.
    seed
        Seeds the learner and the shortlist sampling (every worker's learner gets the same seed, as
        every ``serve`` worker builds its learner from the same config).
    """

    needs_store = True
    modelled_workers = True

    def __init__(self, learner: str = "linucb", *, shortlist: int = DEFAULT_SHORTLIST, seed: int = 0,
                 label: str = "infermesh", expected_output_tokens: int = 256, params: Mapping[str, Any] | None = None,
                 make: Callable[[int], tuple[Learner, FeatureBuilder | None, RewardFunction | None]] | None = None,
                 added_delay: float | None = None, cost_weight_ms: float | None = None,
                 routers: int | None = None) -> None:
        self.name = label
        self.learner_name = learner
        self.params = dict(params or {})
        self.k = shortlist
        self.added_delay = ADDED_DELAY_WEIGHT if added_delay is None else added_delay
        self.cost_weight_ms = COST_WEIGHT_MS if cost_weight_ms is None else cost_weight_ms
        self.routers = routers or 0  # 0: the workers, as serve's decision.routers
        self._set = {name for name, v in (("added_delay_weight", added_delay), ("cost_weight_ms", cost_weight_ms),
                                          ("routers", routers)) if v is not None}
        self.seed = seed
        self.expected_output_tokens = expected_output_tokens
        self._make = make
        self.denied = 0
        self.family = ""

    def configure(self, decision: Mapping[str, Any]) -> None:
        """Take a scenario's ``decision`` settings for what the strategy's name did not set."""
        if "added_delay_weight" in decision and "added_delay_weight" not in self._set:
            self.added_delay = float(decision["added_delay_weight"])
        if "cost_weight_ms" in decision and "cost_weight_ms" not in self._set:
            self.cost_weight_ms = float(decision["cost_weight_ms"])
        if "routers" in decision and "routers" not in self._set:
            self.routers = int(decision["routers"])

    def bind(self, view: RouterView) -> None:
        super().bind(view)
        w = view.world
        clock: Callable[[], float] = lambda: view.now  # noqa: E731 - the simulated clock
        self.store = TelemetryStore({e.endpoint_id: e.node_id for e in w.endpoints}, clock=clock)
        self.engines: list[ShortlistEngine] = []
        self.syncs: list[LearnerSync] = []
        log_ = DeltaLog()
        for i in range(self.workers):
            learner, fb, reward = (self._make(self.seed) if self._make is not None
                                   else default_learner(self.learner_name, self.seed, self.params, self.cost_weight_ms))
            self.engines.append(ShortlistEngine(w.fleet, self.store, default_guard(clock), learner, features=fb,
                                                reward=reward, clock=clock, outcome_timeout_s=600.0,
                                                routers=self.routers or self.workers,
                                                added_delay_weight=self.added_delay,
                                                cost_weight_ms=self.cost_weight_ms))
            if self.workers > 1:  # one process has nothing to merge with
                names = fb.names if fb is not None else ()
                self.syncs.append(LearnerSync(learner, cast(LearnerStore, log_), names,
                                              replica=worker_replica("sim", i), clock=clock))
        self.engine = self.engines[0]
        self.sync_interval_s = _default_sync_interval() if self.workers > 1 else 0.0
        self.index = {e.endpoint_id: i for i, e in enumerate(w.endpoints)}
        self.rng = np.random.default_rng(self.seed + 101)
        self._eps = w.endpoints
        # Only the family-wide candidate arrays are cached (they live as long as the world); the
        # hierarchical search builds a fresh array per request, whose id() a later one may reuse.
        self._stable = {id(a): a for a in w.by_family.values()}
        self._local_cache: dict[tuple[int, int], list[int]] = {}

    def _shortlist(self, req: Request, cands: I64) -> list[Endpoint]:
        n = len(cands)
        eps = self._eps
        if n <= self.k:
            return [eps[i] for i in cands.tolist()]
        local = self._local(req.region, cands)
        rnd = self.rng.random
        picks: dict[int, None] = {}
        half = min(len(local), self.k // 2)
        nl = len(local)
        while len(picks) < half:
            picks[local[int(rnd() * nl)]] = None
        while len(picks) < self.k:
            picks[int(cands[int(rnd() * n)])] = None
        return [eps[i] for i in picks]

    def _local(self, region: int, cands: I64) -> list[int]:
        """The client region's endpoints among ``cands`` (cached for the family-wide arrays, which repeat)."""
        w = self.view.world
        if self._stable.get(id(cands)) is not cands:
            return cands[w.node_region[cands] == region].tolist()  # type: ignore[no-any-return]
        key = (region, id(cands))
        hit = self._local_cache.get(key)
        if hit is None:
            hit = cands[w.node_region[cands] == region].tolist()
            self._local_cache[key] = hit
        return hit

    def _context(self, req: Request) -> RequestContext:
        w = self.view.world
        return RequestContext(
            request_id=f"r{req.rid}", tenant=req.tenant, user_tier=str(req.tag or "standard"),
            model_family=self.family or w.endpoints[0].family,
            estimated_input_tokens=req.in_tokens, expected_output_tokens=self.expected_output_tokens,
            allowed_jurisdictions=req.jurisdictions, data_class=req.data_class,
            client_region=w.regions[req.region], session_id=req.session, ttft_target_ms=req.ttft_target_ms)

    def sync(self, worker: int) -> None:
        """Worker ``worker`` pushes its learner's increments and merges the others' (``LearnerSync.sync``).

        Parameters
        ----------
        worker
            The worker's index (nothing to do with one worker).
        """
        if self.syncs:
            self.syncs[worker].sync()

    def _engine_of(self, req: Request) -> ShortlistEngine:
        return self.engines[req.worker] if req.worker > 0 else self.engine

    def choose(self, req: Request, cands: I64) -> int:
        ctx = self._context(req)
        eng = self._engine_of(req)
        eng.shortlist = self._shortlist(req, cands)
        try:
            d = eng.decide(ctx)
        except DecisionError as first:
            eng.shortlist = [self._eps[i] for i in cands.tolist()]  # widen to every located endpoint
            try:
                d = eng.decide(ctx)
            except DecisionError as exc:
                self.denied += 1
                req.drop_reason = f"{type(exc).__name__}: {exc}"[:120] or repr(first)
                return -1
        req.ctx = d.decision_id
        return self.index[d.route.endpoint_id]

    def hedge_target(self, req: Request, cands: I64, exclude: int) -> int:
        return -1  # the pipeline returns fallbacks but does not hedge

    def on_complete(self, req: Request, node: int, ok: bool) -> None:
        if req.ctx is None:
            return
        if not ok:  # refused by the endpoint (e.g. larger than its KV cache): no token was produced
            self._engine_of(req).report_outcome(Outcome(str(req.ctx), OutcomeStatus.ERROR, input_tokens=req.in_tokens,
                                               error=req.drop_reason, reported_at=self.view.now))
            return
        # From the end of the decision, as the service counts them (ext_proc's t0 is taken once the
        # route is decided): the wait for a busy decision worker and the decision itself are the
        # router's, not the endpoint's, and must not be learnt as its slowness (ledger.observed) or
        # its reward. The simulator's own TTFT (the tables) still counts from the arrival.
        t0 = req.decided_at + req.decision_us / 1e6
        ttft = (req.first_token_at - t0) * 1000.0
        lat = (req.done_at - t0) * 1000.0
        self._engine_of(req).report_outcome(Outcome(str(req.ctx), OutcomeStatus.OK if ok else OutcomeStatus.ERROR,
                                           ttft_ms=ttft, latency_ms=lat, input_tokens=req.in_tokens,
                                           output_tokens=req.out_tokens, reported_at=self.view.now))
