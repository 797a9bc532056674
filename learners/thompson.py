"""Linear Thompson sampling over per-arm features, with Monte Carlo propensities."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import numpy.typing as npt

from decision import _kernels
from learners._linear import FloatArray, LinearLearner, Prior


class LinearThompson(LinearLearner):
    """Sample ``theta ~ N(theta_hat, v^2 A^-1)`` and pick the arm it scores best (Agrawal & Goyal, 2013).

    Propensity: Thompson sampling has no closed form for the probability of its choice, so it
    is estimated by Monte Carlo. ``mc_samples`` draws are made at once (of the eligible arms'
    scores, which are jointly normal under the posterior, rather than of ``theta`` itself: the
    same distribution from fewer random numbers); the first one acts, and the propensity is the
    fraction of all draws (the acting one included) whose argmax is the chosen arm. It is
    therefore at least ``1 / mc_samples`` (never 0) and biased upwards by at most that much; its
    standard error is about ``sqrt(p (1 - p) / mc_samples)``.
    With probability ``epsilon`` a uniformly random arm is taken instead, mixed in exactly:
    ``propensity = (1 - epsilon) p_TS + epsilon / K``. ``scores`` are the posterior means.

    Parameters
    ----------
    n_features
        Length of the feature vectors.
    v
        Scale of the posterior (exploration).
    epsilon
        Probability of a uniformly random arm (the propensity floor).
    mc_samples
        Draws used to estimate the propensity (the cost is linear in it).
    l2
        Ridge prior strength.
    seed
        Seed of the sampler.
    prior, safe_slack, safe_margin, default_target_ms
        Warm-start prior and safe set (:class:`learners._linear.LinearLearner`).

    Examples
    --------
    >>> from decision.domain import RequestContext
    >>> from learners.testing import toy_arms
    >>> learner = LinearThompson(2, v=0.05, seed=3)
    >>> for _ in range(50):
    ...     learner.update((1.0, 0.0), 0.1)
    ...     learner.update((0.0, 1.0), 0.8)
    >>> choice = learner.choose(RequestContext("r", "t"), toy_arms([1.0, 2.0], [(1.0, 0.0), (0.0, 1.0)]))
    >>> choice.arm, round(choice.propensity, 2)
    (1, 0.99)
    """

    name = "linear-ts"
    version = "1"

    def __init__(self, n_features: int, *, v: float = 0.2, epsilon: float = 0.01, mc_samples: int = 32,
                 l2: float = 1.0, seed: int | None = None, prior: Prior = "auto",
                 safe_slack: float | None = 0.5, safe_margin: float = 0.1, default_target_ms: float = 500.0) -> None:
        super().__init__(n_features, l2=l2, seed=seed, prior=prior, safe_slack=safe_slack, safe_margin=safe_margin,
                         default_target_ms=default_target_ms)
        # epsilon > 0: the logged propensity is a Monte Carlo estimate, and without a floor it misstates
        # rarely drawn arms several times over (off-policy estimates then go wrong).
        if v < 0 or not 0.0 < epsilon < 1.0 or mc_samples < 1:
            raise ValueError("v must be >= 0, epsilon in (0, 1), mc_samples >= 1")
        self.v = v
        self.epsilon = epsilon
        self.mc_samples = mc_samples
        # (A^-1, its Cholesky factor): the factor is used only while A^-1 is still that very array.
        self._chol: tuple[FloatArray, FloatArray] | None = None

    def _params(self) -> dict[str, Any]:
        return {"v": self.v, "epsilon": self.epsilon, "mc_samples": self.mc_samples, "l2": self.l2,
                "seed": self.seed, **self._safe_params()}

    def _after_update(self) -> None:
        self._chol = None

    def _factor(self) -> FloatArray:
        """The Cholesky factor of the current ``A^-1`` (cached until the next update or merge)."""
        cached = self._chol
        if cached is not None and cached[0] is self._stats.A_inv:  # the hot path: no lock
            return cached[1]
        # Factor under the update lock: computed outside it, a factor of the previous A^-1 could be
        # stored after an update cleared the cache, and used until the next update.
        with self._lock:
            a_inv = self._stats.A_inv
            cached = self._chol
            if cached is not None and cached[0] is a_inv:  # another thread just did it
                return cached[1]
            try:
                chol = np.asarray(np.linalg.cholesky(a_inv), dtype=np.float64)
            except np.linalg.LinAlgError:  # Sherman-Morrison drift: recompute exactly, if A allows
                with contextlib.suppress(ValueError):  # singular A: symmetrise what there is
                    self._stats.refresh()
                a_inv = self._stats.A_inv
                sym = 0.5 * (a_inv + a_inv.T)
                chol = np.asarray(np.linalg.cholesky(sym + 1e-12 * np.eye(self.n_features)), dtype=np.float64)
            self._chol = (a_inv, chol)
            return chol

    def _winners(self, X: FloatArray, eligible: npt.NDArray[np.intp]) -> tuple[int, npt.NDArray[np.intp]]:
        """``mc_samples`` posterior draws over the ``eligible`` rows of ``X``: the first draw's
        winner and how many draws each eligible arm won (positions in ``eligible``).

        The draws are of the eligible arms' scores, which are jointly normal: ``len(eligible)``
        standard normals per draw instead of ``n_features`` (``decision._kernels.thompson_draws``).
        """
        m = len(eligible)
        z = self._rng.standard_normal((self.mc_samples, m))
        counts = np.zeros(m, dtype=np.intp)
        first = _kernels.thompson_draws(np.ascontiguousarray(X, dtype=np.float64), np.ascontiguousarray(eligible),
                                        self._stats.theta, self._factor(), self.v, z, counts, np.empty((m, m)))
        return first, counts

    def _pick(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
              best: int) -> tuple[int, float]:
        k = len(eligible)
        arm, counts = self._winners(X, eligible)
        if self.epsilon > 0.0 and self._rng.random() < self.epsilon:
            arm = int(self._rng.integers(k))
        p_ts = float(counts[arm]) / self.mc_samples
        return arm, (1.0 - self.epsilon) * p_ts + self.epsilon / k

    def _distribution(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
                      best: int) -> FloatArray:
        k = len(eligible)
        counts = self._winners(X, eligible)[1] / self.mc_samples
        p: FloatArray = (1.0 - self.epsilon) * counts + self.epsilon / k
        return p
