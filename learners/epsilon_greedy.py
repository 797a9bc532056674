"""Epsilon-greedy over a shared ridge model: the simplest exploring baseline."""

from __future__ import annotations

from typing import Any

from learners._linear import EpsilonBest, Prior


class EpsilonGreedy(EpsilonBest):
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
