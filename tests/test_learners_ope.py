"""Off-policy estimators against a simulated environment whose policy values are known exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from learners.ope import LoggedRecord, evaluate, ips

Z99 = 2.576


@dataclass
class Env:
    """A finite set of contexts drawn uniformly, K arms each, Bernoulli rewards with known means."""

    X: np.ndarray  # (contexts, arms, d)
    mu: np.ndarray  # (contexts, arms) true mean reward

    @staticmethod
    def make(seed: int, contexts: int = 40, arms: int = 5, d: int = 4, linear: bool = False) -> Env:
        rng = np.random.default_rng(seed)
        X = rng.random((contexts, arms, d))
        X[..., 0] = 1.0
        w = rng.normal(size=d)
        s = X @ w
        mu = 0.2 + 0.6 * (s - s.min()) / (s.max() - s.min()) if linear else 1.0 / (1.0 + np.exp(-3.0 * np.sin(2 * s)))
        return Env(X, mu)

    def softmax_policy(self, w: np.ndarray, temperature: float) -> np.ndarray:
        z = (self.X @ w) / temperature
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        out: np.ndarray = p / p.sum(axis=1, keepdims=True)
        return out

    def value(self, pi: np.ndarray) -> float:
        """The exact value of a policy given as probabilities per (context, arm)."""
        return float((pi * self.mu).sum(axis=1).mean())

    def log(self, logging_pi: np.ndarray, n: int, rng: np.random.Generator) -> tuple[list[LoggedRecord], np.ndarray]:
        ctx = rng.integers(self.X.shape[0], size=n)
        cum = logging_pi[ctx].cumsum(axis=1)
        acts = np.minimum((rng.random(n)[:, None] > cum).sum(axis=1), self.X.shape[1] - 1)
        rewards = (rng.random(n) < self.mu[ctx, acts]).astype(float)
        recs = [LoggedRecord(self.X[c], int(a), float(logging_pi[c, a]), float(r))
                for c, a, r in zip(ctx, acts, rewards, strict=True)]
        return recs, ctx


def _policies(env: Env, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    d = env.X.shape[2]
    logging_pi = env.softmax_policy(np.asarray(rng.normal(size=d)), 1.0)
    greedy = np.zeros_like(env.mu)
    greedy[np.arange(env.mu.shape[0]), env.mu.argmax(axis=1)] = 1.0  # the oracle: far from the logger
    eps = 0.9 * greedy + 0.1 / env.mu.shape[1]
    return logging_pi, greedy, eps


@pytest.mark.parametrize("target_kind", ["greedy", "epsilon"])
def test_estimates_cover_the_exact_value_on_a_large_log(target_kind: str) -> None:
    env = Env.make(1)
    logging_pi, greedy, eps = _policies(env, 1)
    target = greedy if target_kind == "greedy" else eps
    truth, logged_truth = env.value(target), env.value(logging_pi)
    assert truth - logged_truth > 0.05  # the candidate really differs from the logger
    recs, ctx = env.log(logging_pi, 20_000, np.random.default_rng(2))
    est = evaluate(recs, [target[c] for c in ctx], z=Z99)
    for name in ("ips", "snips", "dr"):
        e = est[name]
        assert e.ci_low <= truth <= e.ci_high, (name, e, truth)
        assert 0 < e.ess < len(recs)
    # The naive answer (the logged mean) is confidently wrong: the test can tell estimators apart.
    assert not est["logged"].ci_low <= truth <= est["logged"].ci_high
    assert est["logged"].ci_low <= logged_truth <= est["logged"].ci_high


def test_estimators_are_unbiased_and_their_intervals_cover() -> None:
    env = Env.make(3)
    logging_pi, _, eps = _policies(env, 3)
    truth = env.value(eps)
    rng = np.random.default_rng(4)
    reps, n = 120, 600
    values: dict[str, list[float]] = {"ips": [], "snips": [], "dr": []}
    covered = dict.fromkeys(values, 0)
    for _ in range(reps):
        recs, ctx = env.log(logging_pi, n, rng)
        est = evaluate(recs, [eps[c] for c in ctx])
        for k in values:
            values[k].append(est[k].value)
            covered[k] += est[k].ci_low <= truth <= est[k].ci_high
    for k, vs in values.items():
        v = np.array(vs)
        # Unbiased: the mean over replications is within 3 standard errors of the truth.
        assert abs(v.mean() - truth) < 3.0 * v.std(ddof=1) / np.sqrt(reps), (k, v.mean(), truth)
        # Nominal 95% intervals cover at least ~87% of the time (CLT at n=600).
        assert covered[k] / reps >= 0.87, (k, covered[k] / reps)


def test_doubly_robust_beats_ips_variance_with_a_good_reward_model() -> None:
    env = Env.make(5, linear=True)
    logging_pi, greedy, _ = _policies(env, 5)
    recs, ctx = env.log(logging_pi, 5000, np.random.default_rng(6))
    est = evaluate(recs, [greedy[c] for c in ctx])
    assert est["dr"].std_err < 0.8 * est["ips"].std_err
    truth = env.value(greedy)
    assert abs(est["dr"].value - truth) < 3 * est["dr"].std_err


def test_wrong_propensities_are_detected_as_bias() -> None:
    # Logging with the true softmax but recording uniform propensities biases IPS: the CI misses.
    env = Env.make(7)
    logging_pi, greedy, _ = _policies(env, 7)
    recs, ctx = env.log(logging_pi, 20_000, np.random.default_rng(8))
    k = env.mu.shape[1]
    bad = ips([r.reward for r in recs], [1.0 / k] * len(recs), [greedy[c][r.action] for c, r in zip(ctx, recs,
                                                                                                  strict=True)])
    good = ips([r.reward for r in recs], [r.propensity for r in recs],
               [greedy[c][r.action] for c, r in zip(ctx, recs, strict=True)], z=Z99)
    truth = env.value(greedy)
    assert good.ci_low <= truth <= good.ci_high
    assert not bad.ci_low <= truth <= bad.ci_high


def test_invalid_inputs_fail_fast() -> None:
    with pytest.raises(ValueError):
        ips([1.0], [0.0], [1.0])
    with pytest.raises(ValueError):
        ips([], [], [])
    nan = float("nan")  # each passed a check written as comparisons, and the estimate came out NaN
    for rewards, logged, target, what in (([1.0, 1.0], [nan, 0.5], [1.0, 1.0], "propensities"),
                                          ([1.0, 1.0], [0.5, 0.5], [nan, 1.0], "target"),
                                          ([nan, 1.0], [0.5, 0.5], [1.0, 1.0], "rewards")):
        with pytest.raises(ValueError, match=what):
            ips(rewards, logged, target)


def test_thompson_sampling_needs_an_exploration_floor() -> None:
    """Without one its Monte Carlo propensities misstate rare arms (IPS of 0.36 for a true 1.0)."""
    from learners.thompson import LinearThompson

    with pytest.raises(ValueError, match="epsilon in"):
        LinearThompson(4, epsilon=0.0)
