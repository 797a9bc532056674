"""Off-policy evaluation: what would a candidate policy have earned on the logged traffic?

Pure functions over logged records. For record ``i`` the logging policy took arm ``a_i`` with
propensity ``p_i`` and earned ``r_i``; the candidate policy ``pi`` gives that arm probability
``pi_i`` and the importance weight is ``w_i = pi_i / p_i``.

* IPS (inverse propensity scoring): ``mean(w_i r_i)``. Unbiased when every ``p_i`` is right and
  positive wherever ``pi`` is; high variance when weights are large.
* SNIPS (self-normalised IPS): ``sum(w_i r_i) / sum(w_i)``. Slightly biased, much lower variance.
* DR (doubly robust): ``mean(qhat_pi(x_i) + w_i (r_i - qhat(x_i, a_i)))`` with a reward model
  ``qhat`` and ``qhat_pi(x) = sum_a pi(a|x) qhat(x, a)``. Unbiased if the propensities are right,
  whatever the model; low variance when the model is good.

Confidence intervals use the central limit theorem over the per-record terms (the delta method for
SNIPS's ratio). The effective sample size ``(sum w)^2 / sum w^2`` says how many on-policy samples
the estimate is worth: a small ESS means the candidate strays far from the logged policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ArrayLike = Sequence[float] | FloatArray

Z95 = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Estimate:
    """A policy value estimate with its normal-approximation confidence interval."""

    estimator: str
    value: float
    std_err: float
    ci_low: float
    ci_high: float
    n: int
    ess: float

    def as_dict(self) -> dict[str, float | int | str]:
        return {"estimator": self.estimator, "value": self.value, "std_err": self.std_err,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n, "ess": self.ess}


def _arr(x: ArrayLike) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def _check(rewards: FloatArray, propensities: FloatArray, target: FloatArray) -> None:
    if not rewards.shape == propensities.shape == target.shape or rewards.ndim != 1:
        raise ValueError("rewards, logged propensities and target probabilities must be 1-D, same length")
    if rewards.size == 0:
        raise ValueError("no records")
    # Written so that a NaN fails too (every comparison with NaN is false).
    if not np.all((propensities > 0) & (propensities <= 1)):
        raise ValueError("logged propensities must be in (0, 1]")
    if not np.all((target >= 0) & (target <= 1)):
        raise ValueError("target probabilities must be in [0, 1]")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards must be finite")


def effective_sample_size(weights: ArrayLike) -> float:
    """``(sum w)^2 / sum w^2``; equals n when all weights are equal.

    >>> effective_sample_size([1.0, 1.0, 1.0, 1.0])
    4.0
    >>> effective_sample_size([4.0, 0.0, 0.0, 0.0])
    1.0
    """
    w = _arr(weights)
    s2 = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / s2 if s2 > 0 else 0.0


def _mean_estimate(name: str, terms: FloatArray, ess: float, z: float) -> Estimate:
    n = terms.size
    value = float(terms.mean())
    se = float(terms.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    return Estimate(name, value, se, value - z * se, value + z * se, n, ess)


def ips(rewards: ArrayLike, logged_propensity: ArrayLike, target_prob: ArrayLike, *, z: float = Z95) -> Estimate:
    """Inverse propensity scoring.

    Examples
    --------
    >>> est = ips([1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 1.0, 0.0])
    >>> est.value, est.ess
    (1.0, 2.0)
    """
    r, p, t = _arr(rewards), _arr(logged_propensity), _arr(target_prob)
    _check(r, p, t)
    w = t / p
    return _mean_estimate("ips", w * r, effective_sample_size(w), z)


def snips(rewards: ArrayLike, logged_propensity: ArrayLike, target_prob: ArrayLike, *, z: float = Z95) -> Estimate:
    """Self-normalised IPS, with a delta-method standard error.

    Examples
    --------
    >>> snips([1.0, 0.0, 1.0, 0.0], [0.5, 0.25, 0.5, 0.25], [1.0, 0.0, 1.0, 0.0]).value
    1.0
    """
    r, p, t = _arr(rewards), _arr(logged_propensity), _arr(target_prob)
    _check(r, p, t)
    w = t / p
    n = r.size
    sw = float(w.sum())
    if sw <= 0:
        return Estimate("snips", float("nan"), float("inf"), float("-inf"), float("inf"), n, 0.0)
    value = float((w * r).sum() / sw)
    resid = w * (r - value) / (sw / n)
    se = float(np.sqrt(np.sum(resid**2)) / n) if n > 1 else float("inf")
    return Estimate("snips", value, se, value - z * se, value + z * se, n, effective_sample_size(w))


def doubly_robust(rewards: ArrayLike, logged_propensity: ArrayLike, target_prob: ArrayLike,
                  q_logged: ArrayLike, q_target: ArrayLike, *, z: float = Z95) -> Estimate:
    """Doubly robust estimate.

    ``q_logged[i]`` is the reward model's prediction for the logged arm of record ``i`` and
    ``q_target[i]`` its expectation under the candidate, ``sum_a pi(a|x_i) qhat(x_i, a)``.

    Examples
    --------
    >>> doubly_robust([1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]).value
    1.0
    """
    r, p, t = _arr(rewards), _arr(logged_propensity), _arr(target_prob)
    _check(r, p, t)
    ql, qt = _arr(q_logged), _arr(q_target)
    w = t / p
    return _mean_estimate("dr", qt + w * (r - ql), effective_sample_size(w), z)


def on_policy(rewards: ArrayLike, *, z: float = Z95) -> Estimate:
    """The logged policy's own value: the mean logged reward."""
    r = _arr(rewards)
    return _mean_estimate("logged", r, float(r.size), z)


@dataclass(frozen=True, slots=True)
class LoggedRecord:
    """One logged decision: the arms' features, what was taken, with which propensity, and the reward."""

    features: FloatArray  # (arms, features)
    action: int
    propensity: float
    reward: float


PolicyFn = Callable[[LoggedRecord], Sequence[float] | FloatArray]


def fit_reward_model(records: Sequence[LoggedRecord], l2: float = 1.0) -> FloatArray:
    """Ridge regression of reward on the taken arm's features (the DR estimator's ``qhat``)."""
    if not records:
        raise ValueError("no records")
    X = np.array([r.features[r.action] for r in records], dtype=np.float64)
    y = np.array([r.reward for r in records], dtype=np.float64)
    theta: FloatArray = np.asarray(np.linalg.solve(X.T @ X + l2 * np.eye(X.shape[1]), X.T @ y), dtype=np.float64)
    return theta


def evaluate(records: Sequence[LoggedRecord], target: Iterable[Sequence[float] | FloatArray] | PolicyFn, *,
             z: float = Z95, folds: int = 2) -> dict[str, Estimate]:
    """IPS, SNIPS, DR and the logged policy's value over ``records``.

    ``target`` gives, per record, the candidate's probability of every arm: either a function of
    the record or a sequence aligned with ``records``. DR's reward model is cross-fitted over
    ``folds`` contiguous folds (each fold is predicted by a model fitted on the others), which
    keeps it from being fitted on the very rewards it corrects.
    """
    if not records:
        raise ValueError("no records")
    probs = [np.asarray(target(r), dtype=np.float64) for r in records] if callable(target) else \
        [np.asarray(p, dtype=np.float64) for p in target]
    if len(probs) != len(records):
        raise ValueError("one target distribution per record")
    rewards = np.array([r.reward for r in records])
    logged_p = np.array([r.propensity for r in records])
    target_p = np.array([p[r.action] for p, r in zip(probs, records, strict=True)])
    q_logged = np.empty(len(records))
    q_target = np.empty(len(records))
    n = len(records)
    folds = max(1, min(folds, n // 2 or 1))
    bounds = np.linspace(0, n, folds + 1).astype(int)
    for f in range(folds):
        lo, hi = int(bounds[f]), int(bounds[f + 1])
        train = list(records[:lo]) + list(records[hi:]) if folds > 1 else list(records)
        theta = fit_reward_model(train)
        for i in range(lo, hi):
            q = records[i].features @ theta
            q_logged[i] = q[records[i].action]
            q_target[i] = float(probs[i] @ q)
    return {"logged": on_policy(rewards, z=z), "ips": ips(rewards, logged_p, target_p, z=z),
            "snips": snips(rewards, logged_p, target_p, z=z),
            "dr": doubly_robust(rewards, logged_p, target_p, q_logged, q_target, z=z)}
