"""Shared machinery of the linear learners: ridge sufficient statistics, deltas, state.

A linear reward model ``r ~ x . theta`` over the per-arm feature vector ``x`` keeps the ridge
sufficient statistics ``A = l2 I + sum x x^T`` and ``b = sum r x``. They are additive: replicas
exchange the increments (``dA``, ``db``) made since their last sync and add each other's
(:mod:`learners.sync`). ``A^-1`` is kept up to date by Sherman-Morrison on each update and
recomputed exactly after a merge or every ``refresh_every`` updates (bounding numerical drift).

Every learner here shares one model (one ``theta``) over all arms: arms change from request to
request, so what is learned must be about the arm's features (site, GPU type, load...), not
its index.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from decision.domain import Choice, RequestContext, ScoredCandidate

FloatArray = npt.NDArray[np.float64]


class RidgeStats:
    """Ridge-regression sufficient statistics with Sherman-Morrison updates and a delta log."""

    __slots__ = ("A", "A_inv", "_since", "b", "d", "dA", "db", "dn", "l2", "n", "refresh_every", "theta")

    def __init__(self, d: int, l2: float, refresh_every: int = 2000) -> None:
        self.d = d
        self.l2 = l2
        self.refresh_every = refresh_every
        self.A: FloatArray = np.eye(d) * l2
        self.A_inv: FloatArray = np.eye(d) / l2
        self.b: FloatArray = np.zeros(d)
        self.theta: FloatArray = np.zeros(d)
        self.n = 0
        self.dA: FloatArray = np.zeros((d, d))
        self.db: FloatArray = np.zeros(d)
        self.dn = 0
        self._since = 0

    def update(self, x: FloatArray, r: float) -> None:
        xx = np.outer(x, x)
        self.A += xx
        self.dA += xx
        rx = r * x
        self.b += rx
        self.db += rx
        self.n += 1
        self.dn += 1
        self._since += 1
        if self._since >= self.refresh_every:
            self.refresh()
            return
        ax = self.A_inv @ x
        # A new array, not an in-place edit: a concurrent reader sees the old or the new inverse.
        self.A_inv = self.A_inv - np.outer(ax, ax) / (1.0 + x @ ax)
        self.theta = self.A_inv @ self.b

    def refresh(self) -> None:
        """Recompute ``A^-1`` and ``theta`` exactly from ``A`` and ``b``."""
        self.A_inv = np.asarray(np.linalg.inv(self.A), dtype=np.float64)
        self.theta = self.A_inv @ self.b
        self._since = 0

    def take_delta(self) -> tuple[FloatArray, FloatArray, int]:
        """The increments since the last call, and reset them."""
        out = (self.dA, self.db, self.dn)
        self.dA = np.zeros((self.d, self.d))
        self.db = np.zeros(self.d)
        self.dn = 0
        return out

    def merge(self, dA: FloatArray, db: FloatArray, dn: int) -> None:
        """Add another replica's increments (they do not enter this replica's own delta)."""
        self.A += dA
        self.b += db
        self.n += dn
        self.refresh()

    def state(self) -> dict[str, Any]:
        return {"A": self.A.tolist(), "b": self.b.tolist(), "n": self.n, "dA": self.dA.tolist(),
                "db": self.db.tolist(), "dn": self.dn, "A_inv": self.A_inv.tolist(), "since": self._since}

    def load(self, state: Mapping[str, Any]) -> None:
        A = np.asarray(state["A"], dtype=float)
        if A.shape != (self.d, self.d):
            raise ValueError(f"state has {A.shape[0]} features, learner has {self.d}")
        self.A = A
        self.b = np.asarray(state["b"], dtype=float)
        self.n = int(state["n"])
        self.dA = np.asarray(state.get("dA", np.zeros((self.d, self.d))), dtype=float)
        self.db = np.asarray(state.get("db", np.zeros(self.d)), dtype=float)
        self.dn = int(state.get("dn", 0))
        if "A_inv" in state:  # exactly as it was (an exact inverse would differ in the last bits)
            self.A_inv = np.asarray(state["A_inv"], dtype=float)
            self.theta = self.A_inv @ self.b
            self._since = int(state.get("since", 0))
        else:
            self.refresh()


_LAST: list[tuple[Sequence[ScoredCandidate], FloatArray]] = []


def arms_matrix(arms: Sequence[ScoredCandidate]) -> FloatArray:
    """The arms' feature vectors as a matrix, one row per arm.

    Converting Python floats is most of a linear learner's choose cost, so the last matrix is
    kept for the same ``arms`` object: the acting learner and its shadows convert it once.
    """
    last = _LAST[0] if _LAST else None
    if last is not None and last[0] is arms:
        return last[1]
    X = np.array([a.features for a in arms], dtype=float)
    X.setflags(write=False)
    if _LAST:
        _LAST[0] = (arms, X)
    else:
        _LAST.append((arms, X))
    return X


class LinearLearner:
    """Base of the linear learners: hyperparameters, the ridge model, state, clone, update.

    Subclasses implement :meth:`_decide` (the arm, its propensity, per-arm scores) and
    :meth:`_distribution` (the probability of each arm, for off-policy evaluation).
    """

    name = "linear"
    version = "1"

    def __init__(self, n_features: int, *, l2: float = 1.0, seed: int | None = None) -> None:
        if n_features < 1:
            raise ValueError("n_features must be >= 1")
        if l2 <= 0:
            raise ValueError("l2 must be > 0")
        self.n_features = n_features
        self.l2 = l2
        self.seed = seed
        self._stats = RidgeStats(n_features, l2)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    # -- river-style conventions --
    def _params(self) -> dict[str, Any]:
        """Constructor arguments, as given."""
        return {"l2": self.l2, "seed": self.seed}

    def clone(self) -> LinearLearner:
        """A fresh, unfitted learner with the same hyperparameters."""
        return type(self)(self.n_features, **self._params())

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}(n_features={self.n_features}, {params})"

    # -- the Learner contract --
    def _matrix(self, arms: Sequence[ScoredCandidate]) -> FloatArray:
        if not arms:
            raise ValueError("no arms offered")
        X = arms_matrix(arms)
        if X.shape[1] != self.n_features:
            raise ValueError(f"arms have {X.shape[1]} features, learner expects {self.n_features}")
        return X

    def choose(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> Choice:
        X = self._matrix(arms)
        arm, propensity, scores = self._decide(X)
        return Choice(arm, propensity, tuple(scores.tolist()))

    def probabilities(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> tuple[float, ...]:
        """The probability this learner gives each offered arm now (for off-policy evaluation)."""
        return tuple(self._distribution(self._matrix(arms)).tolist())

    def update(self, features: Sequence[float], reward: float) -> None:
        """Learn from the reward observed for the chosen arm's features."""
        x = np.asarray(features, dtype=float)
        if x.shape != (self.n_features,):
            raise ValueError(f"update got {x.shape[0]} features, learner expects {self.n_features}")
        if not np.isfinite(reward) or not np.all(np.isfinite(x)):
            raise ValueError("non-finite reward or features")
        with self._lock:
            self._stats.update(x, float(reward))
            self._after_update()

    def _after_update(self) -> None:
        """Hook for subclasses caching factorisations of ``A^-1``."""

    def _decide(self, X: FloatArray) -> tuple[int, float, FloatArray]:
        raise NotImplementedError

    def _distribution(self, X: FloatArray) -> FloatArray:
        raise NotImplementedError

    # -- model access for replicas, persistence and off-policy evaluation --
    @property
    def stats(self) -> RidgeStats:
        return self._stats

    @property
    def n_updates(self) -> int:
        return self._stats.n

    def predict(self, X: FloatArray) -> FloatArray:
        """The reward model's estimate for each row of ``X``."""
        return X @ self._stats.theta

    def merge(self, dA: FloatArray, db: FloatArray, dn: int) -> None:
        """Add another replica's increments of the sufficient statistics."""
        with self._lock:
            self._stats.merge(dA, db, dn)
            self._after_update()

    def take_delta(self) -> tuple[FloatArray, FloatArray, int]:
        """This replica's increments since the last call (then reset)."""
        with self._lock:
            return self._stats.take_delta()

    def state_dict(self) -> dict[str, Any]:
        """Learned state (JSON-able): the ridge statistics and the random generator's state."""
        with self._lock:
            return {"learner": self.name, "version": self.version, "n_features": self.n_features,
                    "params": self._params(), "stats": self._stats.state(),
                    "rng": self._rng.bit_generator.state}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (hyperparameters stay this instance's)."""
        if state.get("learner") != self.name or int(state.get("n_features", -1)) != self.n_features:
            raise ValueError(f"state of {state.get('learner')} with {state.get('n_features')} features "
                             f"does not fit {self.name} with {self.n_features}")
        with self._lock:
            self._stats.load(state["stats"])
            self._rng.bit_generator.state = dict(state["rng"])
            self._after_update()


def epsilon_mix(best: int, k: int, epsilon: float) -> FloatArray:
    """The distribution of "argmax with probability 1 - epsilon, else uniform"."""
    p = np.full(k, epsilon / k)
    p[best] += 1.0 - epsilon
    return p


def sample_epsilon(rng: np.random.Generator, best: int, k: int, epsilon: float) -> tuple[int, float]:
    """Draw from :func:`epsilon_mix` and return (arm, its probability). No draw when epsilon is 0."""
    arm = best
    if epsilon > 0.0 and rng.random() < epsilon:
        arm = int(rng.integers(k))
    return arm, (1.0 - epsilon) * (arm == best) + epsilon / k
