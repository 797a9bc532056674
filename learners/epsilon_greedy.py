"""Epsilon-greedy over a shared ridge model: the simplest exploring baseline."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from learners._linear import FloatArray, LinearLearner, Prior, epsilon_mix, sample_epsilon


class EpsilonGreedy(LinearLearner):
    """Take the arm with the best predicted reward, or with probability ``epsilon`` a random one.

    Propensity in closed form: ``1 - epsilon + epsilon / K`` for the greedy arm, ``epsilon / K``
    for any other.

    Parameters
    ----------
    n_features
        Length of the feature vectors.
    epsilon
        Exploration probability.
    l2
        Ridge prior strength.
    seed
        Seed of the exploration draws.
    prior, safe_slack, safe_margin, default_target_ms
        Warm-start prior and safe set (:class:`learners._linear.LinearLearner`).

    Examples
    --------
    >>> from decision.domain import RequestContext
    >>> from learners.testing import toy_arms
    >>> learner = EpsilonGreedy(2, epsilon=0.2, seed=1)
    >>> learner.update((0.0, 1.0), 1.0)
    >>> choice = learner.choose(RequestContext("r", "t"), toy_arms([1.0, 2.0], [(1.0, 0.0), (0.0, 1.0)]))
    >>> choice.arm, choice.propensity
    (1, 0.9)
    """

    name = "epsilon-greedy"
    version = "1"

    def __init__(self, n_features: int, *, epsilon: float = 0.1, l2: float = 1.0,
                 seed: int | None = None, prior: Prior = "auto",
                 safe_slack: float | None = 0.5, safe_margin: float = 0.1, default_target_ms: float = 500.0) -> None:
        super().__init__(n_features, l2=l2, seed=seed, prior=prior, safe_slack=safe_slack, safe_margin=safe_margin,
                         default_target_ms=default_target_ms)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        self.epsilon = epsilon

    def _params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "l2": self.l2, "seed": self.seed, **self._safe_params()}

    def _pick(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
              best: int) -> tuple[int, float]:
        return sample_epsilon(self._rng, best, len(eligible), self.epsilon)

    def _distribution(self, X: FloatArray) -> FloatArray:
        return epsilon_mix(int(np.argmax(X @ self._stats.theta)), X.shape[0], self.epsilon)
