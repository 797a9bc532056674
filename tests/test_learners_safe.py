"""Warm-start prior and safe exploration of the linear learners (learners/_linear.py)."""

from __future__ import annotations

import numpy as np
import pytest

from decision.domain import RequestContext, ScoredArms, ScoredCandidate
from decision.engine import DecisionEngine
from decision.fleet import Fleet
from decision.fleetgen import demo_fleet
from decision.health_guard import BuiltinHealthGuard
from decision.telemetry import KV_CACHE_USAGE, QUEUE_RUNNING, QUEUE_WAITING, TelemetryStore
from learners._linear import LinearLearner, eligible, prior_mean
from learners.features import FEATURE_NAMES, RouteFeatures
from learners.least_ttft import LeastExpectedTtft
from learners.registry import make_learner
from learners.testing import toy_arms

LINEAR = ("linucb", "linear-ts", "epsilon-greedy", "softmax")
# The most exploring settings of each: exploration must still stay inside the safe set.
WILD = {"linucb": {"alpha": 5.0, "epsilon": 0.5}, "linear-ts": {"v": 5.0, "epsilon": 0.5},
        "epsilon-greedy": {"epsilon": 1.0}, "softmax": {"temperature": 100.0}}


def _real_arms(seed: int, n: int) -> list[tuple[RequestContext, tuple[ScoredCandidate, ...]]]:
    """Scored candidates as the engine builds them (demo fleet, RouteFeatures, random telemetry)."""
    rng = np.random.default_rng(seed)
    fleet = Fleet.from_mapping(demo_fleet())
    now = 1_700_000_000.0
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints}, clock=lambda: now)
    captured: list[tuple[RequestContext, tuple[ScoredCandidate, ...]]] = []

    class Spy(LeastExpectedTtft):
        def choose(self, ctx, arms):  # type: ignore[no-untyped-def]
            captured.append((ctx, tuple(arms)))
            return super().choose(ctx, arms)

    engine = DecisionEngine(fleet, store, BuiltinHealthGuard(), Spy(), features=RouteFeatures(), clock=lambda: now)
    regions = sorted({s.region for s in fleet.spec.sites})
    for i in range(n):
        for e in fleet.endpoints:
            conc = e.max_concurrency
            store.update_endpoint(e.endpoint_id, {QUEUE_RUNNING: float(rng.integers(0, conc + 1)),
                                                  QUEUE_WAITING: float(rng.integers(0, conc // 2 + 1)),
                                                  KV_CACHE_USAGE: float(rng.uniform(0.1, 0.95))}, now)
        engine.decide(RequestContext(
            f"r{i}", "t", model="llama-3.1-8b", client_region=regions[int(rng.integers(len(regions)))],
            estimated_input_tokens=int(rng.integers(64, 4096)), expected_output_tokens=int(rng.integers(32, 512)),
            ttft_target_ms=float(rng.choice([300.0, 800.0, 2000.0]))))
    return captured


def test_the_scorer_prior_ranks_arms_like_the_deterministic_scorer() -> None:
    """Untrained, the model's mean is the scorer's reward: same ranking as least expected TTFT + cost."""
    learner = make_learner("linucb", len(FEATURE_NAMES), alpha=0.0, epsilon=0.0, seed=0)
    assert isinstance(learner, LinearLearner)
    for ctx, arms in _real_arms(1, 60):
        # The prior's cost weight (0.1 per cost_ref of $0.001) in the scorer's units: ms per $0.001.
        scorer = LeastExpectedTtft(cost_weight=0.1 * ctx.ttft_target_ms)
        unclipped = [i for i, a in enumerate(arms) if a.expected_ttft_ms < 5 * ctx.ttft_target_ms]
        mean = learner.predict(np.array([a.features for a in arms]))
        want = scorer.choose(ctx, arms)
        assert np.argsort(-mean[unclipped], kind="stable").tolist() == \
            np.argsort(-np.array(want.scores)[unclipped], kind="stable").tolist()
        assert learner.choose(ctx, arms).arm == want.arm


@pytest.mark.parametrize("name", LINEAR)
def test_no_choice_is_ever_outside_the_safe_set(name: str) -> None:
    learner = make_learner(name, len(FEATURE_NAMES), seed=3, **WILD[name])
    assert isinstance(learner, LinearLearner)
    rng = np.random.default_rng(9)
    outside = 0
    for ctx, arms in _real_arms(2, 120):
        ttft = ScoredArms.of(arms).rank_ms  # expected TTFT plus the delay each would add to later requests
        mask = eligible(ttft, ctx.ttft_target_ms, learner.safe_slack, learner.safe_margin)
        safe = np.ones(len(arms), bool) if mask is None else mask
        outside += int((~safe).sum())
        assert learner.is_eligible(ctx, arms) == tuple(safe.tolist())
        for _ in range(5):
            c = learner.choose(ctx, arms)
            assert safe[c.arm] and 0.0 < c.propensity <= 1.0
            assert ttft[c.arm] <= ttft.min() * 1.5 + 0.1 * ctx.ttft_target_ms
            # Fallbacks are ordered by score: every eligible arm ranks above every other.
            scores = np.array(c.scores)
            if not safe.all():
                assert scores[safe].min() > scores[~safe].max()
            learner.update(arms[c.arm].features, float(rng.normal()))
        p = np.array(learner.probabilities(ctx, arms))
        assert abs(p.sum() - 1.0) < 1e-9 and np.all(p[~safe] == 0.0)
    assert outside > 0  # the safe set did exclude arms in this stream


@pytest.mark.parametrize("name", ("linucb", "epsilon-greedy", "softmax"))
def test_propensities_are_exact_over_the_safe_set(name: str) -> None:
    learner = make_learner(name, 2, seed=5, **WILD[name])
    assert isinstance(learner, LinearLearner)
    ctx = RequestContext("r", "t", ttft_target_ms=500.0)
    arms = toy_arms([100.0, 120.0, 140.0, 900.0], [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 1.0)])
    probs = np.array(learner.probabilities(ctx, arms))
    assert probs[3] == 0.0 and np.all(probs[:3] > 0.0)
    counts = np.zeros(4)
    for _ in range(3000):
        c = learner.choose(ctx, arms)
        counts[c.arm] += 1
        assert abs(c.propensity - probs[c.arm]) < 1e-12
    assert np.all(np.abs(counts / 3000 - probs) < 0.03)


def test_the_safe_set_can_be_switched_off_and_always_holds_the_best_arm() -> None:
    ttft = np.array([300.0, 90.0, 2000.0])
    mask = eligible(ttft, 500.0, 0.5, 0.1)
    assert mask is not None and mask.tolist() == [False, True, False]
    assert eligible(ttft, 500.0, None, 0.1) is None
    learner = make_learner("epsilon-greedy", 2, epsilon=1.0, seed=1, safe_slack=None)
    assert isinstance(learner, LinearLearner)
    arms = toy_arms(ttft.tolist(), [(1.0, 0.0)] * 3)
    assert learner.probabilities(RequestContext("r", "t"), arms) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_the_prior_is_in_the_model_not_in_the_deltas() -> None:
    a = make_learner("linucb", len(FEATURE_NAMES), seed=1)
    b = make_learner("linucb", len(FEATURE_NAMES), seed=2)
    assert isinstance(a, LinearLearner) and isinstance(b, LinearLearner)
    theta0 = prior_mean("scorer", len(FEATURE_NAMES))
    assert theta0 is not None and np.allclose(a.stats.theta, theta0)
    dA, db, dn = a.take_delta()
    assert dn == 0 and not dA.any() and not db.any()
    x = np.linspace(0.0, 1.0, len(FEATURE_NAMES))
    a.update(x.tolist(), 0.5)
    b.merge(*a.take_delta())
    # b = its own prior + a's observation; a = its own prior + the same observation: one model.
    assert np.allclose(a.stats.b, b.stats.b) and np.allclose(a.stats.theta, b.stats.theta)


def test_prior_settings_are_validated() -> None:
    assert prior_mean("auto", 6) is None and prior_mean("none", 40) is None
    custom = prior_mean({"bias": 1.0, "ttft_ratio": -2.0}, 40)
    assert custom is not None and custom[1] == -2.0
    with pytest.raises(ValueError, match="unknown feature"):
        prior_mean({"nope": 1.0}, 40)
    with pytest.raises(ValueError, match="layout"):
        make_learner("linucb", 6, prior="scorer")
    with pytest.raises(ValueError, match="prior must be"):
        make_learner("linear-ts", 40, prior="optimistic")
    with pytest.raises(ValueError, match="safe_slack"):
        make_learner("softmax", 40, safe_slack=-1.0)


@pytest.mark.parametrize("name", LINEAR)
def test_a_price_on_cost_does_not_widen_the_safe_set_in_time(name: str) -> None:
    """With ``cost_penalty_ms``, the slack is a fraction of the best arm's time, not of its price."""
    learner = make_learner(name, 2, seed=1, safe_slack=0.5, safe_margin=0.0)
    assert isinstance(learner, LinearLearner)
    ctx = RequestContext("r", "t", ttft_target_ms=500.0)
    base = ScoredArms.of(toy_arms([100.0, 160.0, 140.0]))
    ttft = np.array([100.0, 160.0, 140.0])
    # A 200 ms price on every arm: ranks 300 / 360 / 340. Best time 100 ms: eligible up to 300 + 50.
    priced = ScoredArms(base.candidates, base.matrix, ttft, base.cost_per_1k,
                        {"cost_penalty_ms": np.full(3, 200.0)}, rank_ms=ttft + 200.0)
    assert learner.is_eligible(ctx, priced) == (True, False, True)
    assert learner.is_eligible(ctx, tuple(priced)) == (True, False, True)  # rebuilt arms (replays): same rule
    # Unpriced, the same times: 100 x 1.5 = 150 is the bound, as before.
    assert learner.is_eligible(ctx, ScoredArms(base.candidates, base.matrix, ttft, base.cost_per_1k, {})) == \
        (True, False, True)
    # A cheaper slow arm: 190 ms + 50 ms of price ranks 240, within 300 + 50 of the best.
    cheap = ScoredArms(base.candidates, base.matrix, np.array([100.0, 190.0, 400.0]), base.cost_per_1k,
                       {"cost_penalty_ms": np.array([200.0, 50.0, 0.0])}, rank_ms=np.array([300.0, 240.0, 400.0]))
    # Best rank is 240 (time 190): bound 240 + 0.5 x 190 = 335; the 300 one is in, the 400 one out.
    assert learner.is_eligible(ctx, cheap) == (True, True, False)
