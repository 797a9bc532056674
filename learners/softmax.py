"""Softmax (Boltzmann) exploration over a shared ridge model."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from learners._linear import FloatArray, LinearLearner, Prior


class Softmax(LinearLearner):
    """Draw an arm with probability proportional to ``exp(predicted reward / temperature)``.

    The propensity is exact: the softmax probability of the drawn arm.

    Parameters
    ----------
    n_features
        Length of the feature vectors.
    temperature
        Softmax temperature in reward units; lower is greedier.
    l2
        Ridge prior strength.
    seed
        Seed of the draws.
    prior, safe_slack, safe_margin, default_target_ms
        Warm-start prior and safe set (:class:`learners._linear.LinearLearner`).

    Examples
    --------
    >>> from decision.domain import RequestContext
    >>> from learners.testing import toy_arms
    >>> learner = Softmax(2, temperature=0.5, seed=0)
    >>> learner.probabilities(RequestContext("r", "t"), toy_arms([1.0, 2.0], [(1.0, 0.0), (0.0, 1.0)]))
    (0.5, 0.5)
    """

    name = "softmax"
    version = "1"

    def __init__(self, n_features: int, *, temperature: float = 0.1, l2: float = 1.0,
                 seed: int | None = None, prior: Prior = "auto",
                 safe_slack: float | None = 0.5, safe_margin: float = 0.1, default_target_ms: float = 500.0) -> None:
        super().__init__(n_features, l2=l2, seed=seed, prior=prior, safe_slack=safe_slack, safe_margin=safe_margin,
                         default_target_ms=default_target_ms)
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "l2": self.l2, "seed": self.seed, **self._safe_params()}

    def _probs(self, scores: FloatArray) -> FloatArray:
        z = (scores - scores.max()) / self.temperature
        e = np.exp(z)
        p: FloatArray = e / e.sum()
        return p

    def _pick(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
              best: int) -> tuple[int, float]:
        p = self._probs(scores[eligible])
        arm = int(np.searchsorted(np.cumsum(p), self._rng.random() * p.sum(), side="right"))
        arm = min(arm, len(p) - 1)
        if p[arm] <= 0.0:  # an underflowed arm cannot be drawn (float edge case): take the likeliest
            arm = int(np.argmax(p))
        return arm, float(p[arm])

    def _distribution(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
                      best: int) -> FloatArray:
        return self._probs(scores[eligible])
