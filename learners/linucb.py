"""LinUCB over per-arm features: a shared ridge model with an upper-confidence bonus."""

from __future__ import annotations

from typing import Any

from learners._linear import EpsilonBest, FloatArray, Prior


class LinUCB(EpsilonBest):
    """Pick the arm maximising ``x . theta + alpha * sqrt(x^T A^-1 x)`` (Li et al., 2010).

    One ridge model is shared by all arms (the features describe the arm), which is the
    "hybrid" model with no per-arm part: arms are endpoints that come and go between requests.
    The argmax is deterministic (ties go to the first offered arm); with probability
    ``epsilon`` a uniformly random arm is taken instead, so every arm's propensity is known and
    at least ``epsilon / K``: ``(1 - epsilon) + epsilon / K`` for the argmax.

    Parameters
    ----------
    n_features
        Length of the feature vectors.
    alpha
        Width of the confidence bonus (exploration).
    epsilon
        Probability of a uniformly random arm (the propensity floor); 0 makes it deterministic.
    l2
        Ridge prior strength (``A`` starts at ``l2 * I``).
    seed
        Seed of the generator behind the epsilon draws.
    prior, safe_slack, safe_margin, default_target_ms
        Warm-start prior and safe set (:class:`learners._linear.LinearLearner`).

    Examples
    --------
    >>> from decision.domain import RequestContext
    >>> from learners.testing import toy_arms
    >>> learner = LinUCB(2, alpha=0.1, epsilon=0.0, seed=7)
    >>> arms = toy_arms([100.0, 140.0], features=[(1.0, 0.0), (0.0, 1.0)])
    >>> for _ in range(20):
    ...     learner.update((1.0, 0.0), 0.2)
    ...     learner.update((0.0, 1.0), 0.9)
    >>> choice = learner.choose(RequestContext("r", "t"), arms)
    >>> choice.arm, choice.propensity
    (1, 1.0)

    The second arm is learned to be better, but an arm the scorer expects to be much slower than
    the best one (400 ms against 100 ms, past ``100 * 1.5 + 0.1 * 500``) is outside the safe set:

    >>> slow = toy_arms([100.0, 400.0], features=[(1.0, 0.0), (0.0, 1.0)])
    >>> learner.choose(RequestContext("r", "t"), slow).arm, learner.probabilities(RequestContext("r", "t"), slow)
    (0, (1.0, 0.0))
    """

    name = "linucb"
    version = "1"

    def __init__(self, n_features: int, *, alpha: float = 1.0, epsilon: float = 0.01, l2: float = 1.0,
                 seed: int | None = None, prior: Prior = "auto",
                 safe_slack: float | None = 0.5, safe_margin: float = 0.1, default_target_ms: float = 500.0) -> None:
        super().__init__(n_features, l2=l2, seed=seed, prior=prior, safe_slack=safe_slack, safe_margin=safe_margin,
                         default_target_ms=default_target_ms)
        if alpha < 0 or not 0.0 <= epsilon < 1.0:
            raise ValueError("alpha must be >= 0 and epsilon in [0, 1)")
        self.alpha = alpha
        self.epsilon = epsilon

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "epsilon": self.epsilon, "l2": self.l2, "seed": self.seed, **self._safe_params()}

    def _bonus(self) -> tuple[FloatArray, float] | None:
        return (self._stats.A_inv, self.alpha) if self.alpha != 0.0 else None
