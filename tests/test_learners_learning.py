"""The bandit learns what the heuristic cannot see: hidden per-site slowdowns (real engine in the loop)."""

from __future__ import annotations

from learners.features import FEATURE_NAMES
from learners.registry import make_learner
from learners.simenv import SlowSiteEnv

STEPS = 3000
THIRD = STEPS // 3
UNSAFE = {"prior": "none", "safe_slack": None}  # a cold, unconstrained learner: learning from scratch


def test_linucb_regret_is_sublinear_and_it_beats_the_deterministic_scorer() -> None:
    env = SlowSiteEnv(seed=0)
    heuristic = env.run(make_learner("least-ttft", len(FEATURE_NAMES)), STEPS)
    bandit = SlowSiteEnv(seed=0).run(make_learner("linucb", len(FEATURE_NAMES), seed=1, **UNSAFE), STEPS)
    # The heuristic's regret grows linearly: it never stops sending traffic to the slow sites.
    assert heuristic.regret(2 * THIRD) > 0.8 * heuristic.regret(0, THIRD)
    # The bandit's per-step regret falls: late thirds cost clearly less than the first.
    assert bandit.regret(2 * THIRD) < 0.75 * bandit.regret(0, THIRD)
    # After warm-up it beats the scorer on the same request stream, in regret and in reward.
    assert bandit.regret(THIRD) < 0.6 * heuristic.regret(THIRD)
    assert bandit.mean_reward(THIRD) > heuristic.mean_reward(THIRD) + 0.03


def test_the_shipped_linucb_is_safe_from_the_first_request_and_still_learns() -> None:
    """Warm-start prior + safe set (the defaults): no bad warm-up, and it still finds the hidden slow sites."""
    heuristic = SlowSiteEnv(seed=0).run(make_learner("least-ttft", len(FEATURE_NAMES)), STEPS)
    cold = SlowSiteEnv(seed=0).run(make_learner("linucb", len(FEATURE_NAMES), seed=1, **UNSAFE), STEPS)
    safe = SlowSiteEnv(seed=0).run(make_learner("linucb", len(FEATURE_NAMES), seed=1), STEPS)
    first = slice(0, 200)
    # From the first requests it does no worse than the scorer (the cold learner does far worse)...
    assert safe.regret(first.start, first.stop) <= 1.1 * heuristic.regret(first.start, first.stop)
    assert safe.regret(first.start, first.stop) < 0.5 * cold.regret(first.start, first.stop)
    # ...and it beats the scorer in every third, the first included, and the cold learner overall.
    for i in range(3):
        assert safe.regret(i * THIRD, (i + 1) * THIRD) < 0.5 * heuristic.regret(i * THIRD, (i + 1) * THIRD)
    assert safe.regret() < 0.6 * cold.regret()
    assert safe.mean_reward(THIRD) > heuristic.mean_reward(THIRD) + 0.03


def test_thompson_sampling_also_beats_the_deterministic_scorer_after_warm_up() -> None:
    heuristic = SlowSiteEnv(seed=2).run(make_learner("least-ttft", len(FEATURE_NAMES)), STEPS)
    ts = SlowSiteEnv(seed=2).run(make_learner("linear-ts", len(FEATURE_NAMES), seed=3), STEPS)
    assert ts.regret(THIRD) < 0.8 * heuristic.regret(THIRD)
