"""Shared machinery of the linear learners: ridge sufficient statistics, deltas, state.

A linear reward model ``r ~ x . theta`` over the per-arm feature vector ``x`` keeps the ridge
sufficient statistics ``A = l2 I + sum x x^T`` and ``b = sum r x``. They are additive: replicas
exchange the increments (``dA``, ``db``) made since their last sync and add each other's
(:mod:`learners.sync`). ``A^-1`` is kept up to date by Sherman-Morrison on each update and
recomputed exactly after a merge or every ``refresh_every`` updates (bounding numerical drift).

Every learner here shares one model (one ``theta``) over all arms: arms change from request to
request, so what is learned must be about the arm's features (site, GPU type, load...), not
its index.

Safe from the first request (both on by default):

* **Warm-start prior** (``prior``). The ridge model starts at a prior mean ``theta0`` instead of 0:
  ``A = l2 I`` and ``b = l2 theta0``, so ``theta = theta0`` before any update and the data then
  pulls it away as a Bayesian ridge posterior with prior ``N(theta0, A^-1)`` would. ``"scorer"``
  sets ``theta0`` to the reward the deterministic scorer predicts when its estimates are right:
  ``1 - ttft_ratio - 0.1 cost_ratio`` on :class:`learners.features.RouteFeatures` (the shape of
  :class:`learners.reward.ObjectiveReward` with its default weights), so an untrained learner
  ranks arms like the expected-TTFT/cost scorer. The prior lives in the initial ``b``, not in the
  deltas, so merging replicas adds it once per replica's own model and never twice.
* **Safe exploration** (``safe_slack``, ``safe_margin``). Every choice, exploring or not, is made
  among the *eligible* arms: those whose scorer-expected TTFT is at most
  ``best * (1 + safe_slack) + safe_margin * target``, where ``best`` is the least expected TTFT
  offered and ``target`` the request's TTFT target (``default_target_ms`` when it has none).
  The UCB bonus, Thompson draws and epsilon floor act inside that set only, so the arm the scorer
  ranks first is always eligible and an arm the scorer expects to be far slower is never tried.
  Propensities are computed over the eligible set and stay exact and in (0, 1]; arms outside it
  have probability 0 (off-policy evaluation of another policy is then only supported on the
  eligible arms). ``safe_slack=None`` switches the filter off. When the score stage prices cost
  (component ``cost_penalty_ms``, ``decision.cost_weight_ms``) the expected TTFT ranked is the
  price-inclusive :attr:`~decision.domain.ScoredArms.rank_ms`, but the slack stays a fraction of
  the best arm's *time*: ``best + safe_slack * (best - its cost penalty) + safe_margin * target``,
  so putting a price on cost does not widen what exploration may cost in TTFT.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from decision import _kernels
from decision.domain import Choice, RequestContext, ScoredArms, ScoredCandidate

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class RidgeStats:
    """Ridge-regression sufficient statistics with Sherman-Morrison updates and a delta log."""

    __slots__ = ("A", "A_inv", "_since", "_trace", "b", "d", "dA", "db", "dn", "l2", "n", "refresh_every", "theta")

    def __init__(self, d: int, l2: float, refresh_every: int = 2000, prior: FloatArray | None = None) -> None:
        self.d = d
        self.l2 = l2
        self.refresh_every = refresh_every
        self.A: FloatArray = np.eye(d) * l2
        self.A_inv: FloatArray = np.eye(d) / l2
        # A prior mean theta0 enters as l2 * theta0 in b (it is not part of any delta).
        self.b: FloatArray = np.zeros(d) if prior is None else l2 * np.asarray(prior, dtype=np.float64)
        self.theta: FloatArray = self.A_inv @ self.b
        self.n = 0
        self.dA: FloatArray = np.zeros((d, d))
        self.db: FloatArray = np.zeros(d)
        self.dn = 0
        self._since = 0
        self._trace = float(d * l2)  # trace of A, kept along (a finite trace bounds every entry of A and dA)

    def update(self, x: FloatArray, r: float) -> None:
        """Add one observation; raises ValueError, changing nothing, if the model would stop being finite.

        A finite but huge ``x`` or ``r`` can overflow ``A``, ``b`` or ``A^-1``: committed, it would
        make ``theta`` NaN for good (later data cannot heal it) and the delta would carry the NaN to
        every replica. So the new values are computed first and kept only if finite.
        """
        # Overflow is detected here and refused with a ValueError: numpy's own warnings would only be noise.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            xx = np.outer(x, x)
            rx = r * x
            b = self.b + rx
            db = self.db + rx
            # A is positive semi-definite, so |A_ij| <= max(A_ii): a finite trace means a finite A (and dA).
            trace = self._trace + x.dot(x)
            exact = None
            if self._since + 1 >= self.refresh_every:
                A = self.A + xx
                try:
                    exact = np.asarray(np.linalg.inv(A), dtype=np.float64)
                except np.linalg.LinAlgError:  # numerically singular (a tiny l2, collinear features):
                    self._since = 0  # keep the incremental inverse; try the exact one again later
            if exact is not None:
                A_inv = exact
                theta = A_inv @ b
                # One scalar test: NaN and inf propagate through sums and products (0 * inf is NaN).
                _check_finite(trace + theta.dot(db), "update")
                self.A, self.A_inv, self._since = A, A_inv, 0
            else:
                ax = self.A_inv @ x
                q = x.dot(ax)
                # A new array, not an in-place edit: a concurrent reader sees the old or the new inverse.
                A_inv = self.A_inv - np.outer(ax, ax) / (1.0 + q)
                theta = A_inv @ b
                _check_finite(trace + q + theta.dot(db), "update")
                self.A += xx
                self.A_inv = A_inv
                self._since += 1
        self.dA += xx
        self.b, self.db, self.theta, self._trace = b, db, theta, float(trace)
        self.n += 1
        self.dn += 1

    def refresh(self) -> None:
        """Recompute ``A^-1`` and ``theta`` exactly from ``A`` and ``b``; ValueError if ``A`` is singular."""
        self.A_inv = _inverse(self.A, "refresh")
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
        """Add another replica's increments (they do not enter this replica's own delta).

        Raises ValueError, changing nothing, on a wrong shape, a negative count or a non-finite
        result (a corrupt or overflowing delta must not poison this replica).
        """
        dA = _matrix(dA, self.d, "merge: dA")
        db = _vector(db, self.d, "merge: db")
        dn = _count(dn, "merge: dn")
        A = self.A + dA
        b = self.b + db
        A_inv = _inverse(A, "merge")
        theta = A_inv @ b
        _check_finite(float(theta.sum()) + float(b.sum()), "merge")
        _check_finite(0.0 if np.isfinite(A).all() else np.inf, "merge")
        self.A, self.b, self.A_inv, self.theta, self.n, self._since = A, b, A_inv, theta, self.n + dn, 0
        self._trace = float(np.trace(A))

    def state(self) -> dict[str, Any]:
        return {"A": self.A.tolist(), "b": self.b.tolist(), "n": self.n, "dA": self.dA.tolist(),
                "db": self.db.tolist(), "dn": self.dn, "A_inv": self.A_inv.tolist(), "since": self._since}

    def load(self, state: Mapping[str, Any], *, keep_delta: bool = True) -> None:
        """Restore :meth:`state`; ``keep_delta=False`` drops the pending delta it holds.

        Everything is checked (shapes, finiteness, counts) before anything is changed: a bad
        state raises ValueError and leaves these statistics as they were.
        """
        d = self.d
        missing = [k for k in ("A", "b", "n") if k not in state]
        if missing:
            raise ValueError(f"state: no {', '.join(missing)}")
        A = _matrix(state["A"], d, "state: A")
        b = _vector(state["b"], d, "state: b")
        n = _count(state["n"], "state: n")
        if keep_delta:
            dA = _matrix(state.get("dA", np.zeros((d, d))), d, "state: dA")
            db = _vector(state.get("db", np.zeros(d)), d, "state: db")
            dn = _count(state.get("dn", 0), "state: dn")
        else:  # another replica's pending increments are its own to push, not this one's
            dA, db, dn = np.zeros((d, d)), np.zeros(d), 0
        if "A_inv" in state:  # exactly as it was (an exact inverse would differ in the last bits)
            A_inv = _matrix(state["A_inv"], d, "state: A_inv")
            since = _count(state.get("since", 0), "state: since")
        else:
            A_inv, since = _inverse(A, "state"), 0
        theta = A_inv @ b
        _check_finite(float(theta.sum()), "state")
        self.A, self.b, self.n, self.dA, self.db, self.dn = A, b, n, dA, db, dn
        self.A_inv, self.theta, self._since = A_inv, theta, since
        self._trace = float(np.trace(A))


def _check_finite(total: float, what: str) -> None:
    if not math.isfinite(total):
        raise ValueError(f"{what}: the model would not be finite (inputs too large or corrupt); nothing was changed")


def _matrix(value: Any, d: int, what: str) -> FloatArray:
    try:
        a = np.array(value, dtype=np.float64)  # a copy: the caller's array never aliases the model
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not a numeric matrix: {e}") from None
    if a.shape != (d, d):
        raise ValueError(f"{what} has shape {a.shape}, expected {(d, d)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} is not finite")
    return a


def _vector(value: Any, d: int, what: str) -> FloatArray:
    try:
        v = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not a numeric vector: {e}") from None
    if v.shape != (d,):
        raise ValueError(f"{what} has shape {v.shape}, expected {(d,)}")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} is not finite")
    return v


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def _inverse(A: FloatArray, what: str) -> FloatArray:
    try:
        return np.asarray(np.linalg.inv(A), dtype=np.float64)
    except np.linalg.LinAlgError:
        raise ValueError(f"{what}: A is singular") from None


SCORER_PRIOR: Mapping[str, float] = {"bias": 1.0, "ttft_ratio": -1.0, "cost_ratio": -0.1}
"""The ``"scorer"`` prior mean: :class:`learners.reward.ObjectiveReward` (default weights) with the
scorer's expected TTFT and cost in place of the observed ones."""

Prior = str | Mapping[str, float] | None


def arms_matrix(arms: Sequence[ScoredCandidate]) -> FloatArray:
    """The arms' feature vectors as a matrix, one row per arm.

    The score stage's :class:`~decision.domain.ScoredArms` already holds it (the request path);
    any other sequence of arms (replays, tests) is converted.
    """
    return ScoredArms.of(arms).matrix


def route_feature_names(n_features: int) -> tuple[str, ...] | None:
    """The names of :class:`learners.features.RouteFeatures` with ``n_features`` columns, if it can have that many.

    >>> route_feature_names(40)[:3], route_feature_names(40)[-1], route_feature_names(6)
    (('bias', 'ttft_ratio', 'queue_ratio'), 'site_7', None)
    """
    from learners.features import BASE_NAMES

    if n_features < len(BASE_NAMES):
        return None
    return BASE_NAMES + tuple(f"site_{i}" for i in range(n_features - len(BASE_NAMES)))


def prior_mean(prior: Prior, n_features: int) -> FloatArray | None:
    """The prior mean ``theta0`` a ``prior`` setting gives on ``n_features`` columns (None: zero).

    ``"auto"`` is ``"scorer"`` when the columns can be :class:`learners.features.RouteFeatures`
    (at least its 32 base columns) and no prior otherwise; ``"scorer"`` is :data:`SCORER_PRIOR`;
    ``"none"`` or ``None`` is no prior; a mapping names RouteFeatures columns and their weights.
    Naming a column the layout does not have fails.

    >>> theta0 = prior_mean("scorer", 40)
    >>> float(theta0[0]), float(theta0[1]), float(theta0[22]), float(abs(theta0).sum())
    (1.0, -1.0, -0.1, 2.1)
    >>> prior_mean("auto", 6) is None
    True
    """
    if prior is None or prior == "none":
        return None
    names = route_feature_names(n_features)
    if prior == "auto":
        if names is None:
            return None
        prior = "scorer"
    if isinstance(prior, str):
        if prior != "scorer":
            raise ValueError(f"prior must be 'auto', 'scorer', 'none' or a mapping, got {prior!r}")
        prior = SCORER_PRIOR
    if names is None:
        raise ValueError(f"a prior names RouteFeatures columns; a learner over {n_features} features "
                         "is not on that layout")
    theta0 = np.zeros(n_features)
    for key, w in prior.items():
        if key not in names:
            raise ValueError(f"prior: unknown feature {key!r}")
        theta0[names.index(key)] = float(w)
    return theta0


def eligible(ttft: FloatArray, target_ms: float, slack: float | None, margin: float) -> BoolArray | None:
    """Mask of the arms safe to explore: expected TTFT within the slack of the best (None: all).

    An arm is eligible when ``ttft <= min(ttft) * (1 + slack) + margin * target_ms``; the best
    arm always is. ``slack=None`` disables the filter. (The rule itself is
    ``decision._kernels.safe_scores``, which :meth:`LinearLearner.choose` runs with the scores.)

    >>> eligible(np.array([100.0, 140.0, 180.0, 900.0]), 500.0, 0.5, 0.05)
    array([ True,  True, False, False])
    """
    n = len(ttft)
    _, idx, m = _safe_set(np.empty((n, 0)), np.asarray(ttft, dtype=np.float64), np.empty(0), None, 0.0,
                          -1.0 if slack is None else slack, margin * target_ms, np.empty(n))
    if m == n:
        return None
    mask: BoolArray = np.zeros(n, dtype=np.bool_)
    mask[idx[:m]] = True
    return mask


def _safe_set(X: FloatArray, ttft: FloatArray, theta: FloatArray, a_inv: FloatArray | None, alpha: float,
              slack: float, margin_ms: float, scores: FloatArray) -> tuple[int, npt.NDArray[np.intp], int]:
    """(position of the best eligible arm, eligible indices, how many) with ``scores`` filled in
    (``decision._kernels.safe_scores``); ``slack < 0`` means no safe set."""
    idx = np.empty(len(ttft), dtype=np.intp)
    best, m = _kernels.safe_scores(np.ascontiguousarray(X, dtype=np.float64), ttft, theta, a_inv, alpha, slack,
                                   margin_ms, scores, idx)
    return best, idx, m


class LinearLearner:
    """Base of the linear learners: hyperparameters, the ridge model, state, clone, update.

    :meth:`choose` computes, in one pass (``decision._kernels.safe_scores``), the safe set
    (module docstring) and every arm's score: the model's mean ``x . theta``, plus the bonus of
    :meth:`_bonus` if any, with the arms outside the safe set ranked below every eligible one.
    Subclasses implement :meth:`_pick` (which eligible arm, and its propensity) and
    :meth:`_distribution` (the probability of each arm, for off-policy evaluation) over the
    eligible arms only.

    Parameters (shared by every subclass)
    -------------------------------------
    prior
        Warm-start prior mean: ``"auto"`` (default; the scorer's reward on the RouteFeatures layout,
        none on any other), ``"scorer"``, ``"none"``, or a mapping ``{feature name: weight}``.
    safe_slack
        Relative TTFT slack of the safe set (``None``: no safe set).
    safe_margin
        Absolute slack of the safe set, as a fraction of the request's TTFT target.
    default_target_ms
        TTFT target of requests that give none (as :class:`learners.features.RouteFeatures`).
    """

    name = "linear"
    version = "1"

    def __init__(self, n_features: int, *, l2: float = 1.0, seed: int | None = None, prior: Prior = "auto",
                 safe_slack: float | None = 0.5, safe_margin: float = 0.1,
                 default_target_ms: float = 500.0) -> None:
        if n_features < 1:
            raise ValueError("n_features must be >= 1")
        if l2 <= 0:
            raise ValueError("l2 must be > 0")
        if (safe_slack is not None and safe_slack < 0) or safe_margin < 0 or default_target_ms <= 0:
            raise ValueError("safe_slack and safe_margin must be >= 0, default_target_ms > 0")
        self.n_features = n_features
        self.l2 = l2
        self.seed = seed
        self.prior = prior
        self.safe_slack = safe_slack
        self.safe_margin = safe_margin
        self.default_target_ms = default_target_ms
        self._stats = RidgeStats(n_features, l2, prior=prior_mean(prior, n_features))
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    # -- river-style conventions --
    def _params(self) -> dict[str, Any]:
        """Constructor arguments, as given."""
        return {"l2": self.l2, "seed": self.seed}

    def _safe_params(self) -> dict[str, Any]:
        return {"prior": self.prior, "safe_slack": self.safe_slack, "safe_margin": self.safe_margin,
                "default_target_ms": self.default_target_ms}

    def clone(self) -> LinearLearner:
        """A fresh, unfitted learner with the same hyperparameters."""
        return type(self)(self.n_features, **self._params())

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}(n_features={self.n_features}, {params})"

    # -- the Learner contract --
    def _inputs(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> tuple[FloatArray, FloatArray, float,
                                                                                     float]:
        """The feature matrix, expected TTFTs, and the safe set's slack (-1: none) and margin (ms)."""
        if not arms:
            raise ValueError("no arms offered")
        cols = ScoredArms.of(arms)
        X, ttft = cols.matrix, cols.rank_ms
        if X.shape[1] != self.n_features:
            raise ValueError(f"arms have {X.shape[1]} features, learner expects {self.n_features}")
        target = ctx.ttft_target_ms if ctx.ttft_target_ms > 0 else self.default_target_ms
        slack = -1.0 if self.safe_slack is None else self.safe_slack
        penalty = cols.components.get("cost_penalty_ms")
        if slack > 0.0 and penalty is not None and len(ttft) > 1:
            # The slack is a fraction of the best arm's time, not of its price-inclusive rank: the
            # safe_scores kernel's bound best * (1 + s) equals best + slack * (best - its penalty).
            lo = int(np.argmin(ttft))
            best = float(ttft[lo])
            if best > 0.0:
                slack = slack * max(best - float(penalty[lo]), 0.0) / best
        return X, ttft, slack, self.safe_margin * target

    def _bonus(self) -> tuple[FloatArray, float] | None:
        """``(A^-1, alpha)`` when an arm's score is its mean plus ``alpha * sqrt(x A^-1 x)`` (UCB)."""
        return None

    def _pick(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
              best: int) -> tuple[int, float]:
        """The position in ``eligible`` of the arm to take and its propensity; ``best`` is the
        position of the greatest eligible score (scores of every offered arm, in order)."""
        raise NotImplementedError

    def _distribution(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
                      best: int) -> FloatArray:
        """The probability of each ``eligible`` arm (same arguments as :meth:`_pick`)."""
        raise NotImplementedError

    def _scored(self, ctx: RequestContext,
                arms: Sequence[ScoredCandidate]) -> tuple[FloatArray, FloatArray, npt.NDArray[np.intp], int]:
        """The feature matrix, every arm's score, the eligible arms' indices and the best one's
        position among them: one pass of ``decision._kernels.safe_scores``."""
        X, ttft, slack, margin = self._inputs(ctx, arms)
        bonus = self._bonus()
        a_inv, alpha = bonus if bonus is not None else (None, 0.0)
        scores = np.empty(len(ttft))
        best, idx, m = _safe_set(X, ttft, self._stats.theta, a_inv, alpha, slack, margin, scores)
        return X, scores, idx[:m], best

    def choose(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> Choice:
        """Pick one of ``arms`` for ``ctx`` among the safe set, with its propensity and every arm's score.

        Parameters
        ----------
        ctx : RequestContext
            The request; its TTFT target sets the safe set's margin.
        arms : sequence of ScoredCandidate
            The score stage's output (a ``ScoredArms`` on the request path).

        Returns
        -------
        Choice
            ``arm`` indexes ``arms``; ``propensity`` is this learner's probability of that arm;
            ``scores`` has one score per arm, those outside the safe set below every eligible one.

        Examples
        --------
        The third arm has the best model estimate but an expected TTFT far beyond the safe set:

        >>> from decision.domain import RequestContext
        >>> from learners.linucb import LinUCB
        >>> from learners.testing import toy_arms
        >>> learner = LinUCB(2, alpha=0.0, epsilon=0.0, prior="none")
        >>> learner.update((0.0, 1.0), 1.0)
        >>> arms = toy_arms([100.0, 120.0, 900.0], [(1.0, 0.0), (0.0, 1.0), (0.0, 2.0)])
        >>> c = learner.choose(RequestContext("r", "t"), arms)
        >>> c.arm, c.propensity, c.scores[2] < min(c.scores[:2])
        (1, 1.0, True)
        """
        X, scores, eligible, best = self._scored(ctx, arms)
        pos, propensity = self._pick(X, scores, eligible, best)
        return Choice(int(eligible[pos]), propensity, tuple(scores.tolist()))

    def probabilities(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> tuple[float, ...]:
        """The probability this learner gives each offered arm now (for off-policy evaluation)."""
        X, scores, eligible, best = self._scored(ctx, arms)
        p = np.zeros(len(scores))
        p[eligible] = self._distribution(X, scores, eligible, best)
        return tuple(p.tolist())

    def is_eligible(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> tuple[bool, ...]:
        """Which offered arms this learner may choose (its safe set) for this request."""
        eligible = self._scored(ctx, arms)[2]
        mask = np.zeros(len(arms), dtype=np.bool_)
        mask[eligible] = True
        return tuple(mask.tolist())

    def update(self, features: Sequence[float], reward: float) -> None:
        """Learn from the reward observed for the chosen arm's features.

        Raises ValueError, learning nothing, on non-finite inputs or on inputs so large that the
        model would overflow (one such update would otherwise make it NaN for good).

        Examples
        --------
        >>> from learners.linucb import LinUCB
        >>> learner = LinUCB(2, prior="none")
        >>> learner.update((1.0, 0.0), 1.0)
        >>> learner.update((1e160, 1.0), 1.0)
        Traceback (most recent call last):
        ...
        ValueError: update: the model would not be finite (inputs too large or corrupt); nothing was changed
        >>> learner.n_updates, learner.stats.theta.tolist()
        (1, [0.5, 0.0])
        """
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
        """Add another replica's increments of the sufficient statistics.

        Raises ValueError (nothing changed) on a wrong shape or a non-finite result.

        Examples
        --------
        >>> from learners.linucb import LinUCB
        >>> a, b = LinUCB(2, prior="none"), LinUCB(2, prior="none")
        >>> a.update((1.0, 0.0), 1.0)
        >>> b.merge(*a.take_delta())
        >>> b.n_updates, b.stats.theta.tolist()
        (1, [0.5, 0.0])
        >>> b.merge(np.full((2, 2), np.inf), np.zeros(2), 1)
        Traceback (most recent call last):
        ...
        ValueError: merge: dA is not finite
        """
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
            return self._state()

    def _state(self) -> dict[str, Any]:
        return {"learner": self.name, "version": self.version, "n_features": self.n_features,
                "params": self._params(), "stats": self._stats.state(), "rng": self._rng.bit_generator.state}

    def checkpoint(self, clock: Callable[[], float]) -> Checkpoint:
        """Take the pending delta, then the state (holding no pending delta) and ``clock()``, atomically.

        All three come from one critical section of the update lock: an update is in the state
        if and only if it finished before ``clock()`` was read, and its increments are either in
        the returned delta or were taken by an earlier :meth:`take_delta`, never in both.

        Examples
        --------
        >>> from learners.linucb import LinUCB
        >>> learner = LinUCB(2, prior="none")
        >>> learner.update((1.0, 0.0), 1.0)
        >>> cp = learner.checkpoint(lambda: 1000.0)
        >>> cp.watermark, cp.n_updates, cp.dn, cp.state["stats"]["dn"], learner.take_delta()[2]
        (1000.0, 1, 1, 0, 0)
        """
        with self._lock:
            dA, db, dn = self._stats.take_delta()
            return Checkpoint(self._state(), clock(), self._stats.n, dA, db, dn)

    def load_state(self, state: Mapping[str, Any], *, keep_delta: bool = True, reseed: int | None = None) -> None:
        """Restore what :meth:`state_dict` returned (hyperparameters stay this instance's).

        Parameters
        ----------
        state
            A :meth:`state_dict` (or :meth:`checkpoint` state).
        keep_delta
            Keep the pending delta the state holds. ``False`` for a state another replica wrote:
            its unsynced increments are that replica's to push, not this one's.
        reseed
            ``None`` restores the random generator's state. An integer (a stream id, e.g. from the
            replica id) instead seeds it from this learner's ``seed`` and that stream, so replicas
            loading one snapshot do not all draw the same random numbers.

        Everything is checked before anything is changed: a bad state raises ValueError and
        leaves the learner as it was.

        Examples
        --------
        A state another replica wrote: its model, without its pending delta.

        >>> from learners.linucb import LinUCB
        >>> a = LinUCB(2, seed=7, prior="none")
        >>> a.update((1.0, 0.0), 1.0)
        >>> b = LinUCB(2, seed=7, prior="none")
        >>> b.load_state(a.state_dict(), keep_delta=False, reseed=1)
        >>> b.n_updates, b.stats.theta.tolist(), b.take_delta()[2], a.take_delta()[2]
        (1, [0.5, 0.0], 0, 1)
        """
        if not isinstance(state, Mapping):  # a damaged snapshot row can hold any JSON value
            raise ValueError(f"state is a {type(state).__name__}, not a mapping")
        if state.get("learner") != self.name or state.get("n_features") != self.n_features:
            raise ValueError(f"state of {state.get('learner')} with {state.get('n_features')} features "
                             f"does not fit {self.name} with {self.n_features}")
        if not isinstance(state.get("stats"), Mapping):
            raise ValueError("state: no 'stats' mapping")
        if reseed is None:
            bits = type(self._rng.bit_generator)()
            try:
                bits.state = dict(state["rng"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"state: bad random generator state: {e!r}") from None
            rng = np.random.Generator(bits)
        else:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(reseed,)))
        with self._lock:
            self._stats.load(state["stats"], keep_delta=keep_delta)
            self._rng = rng
            self._after_update()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What :meth:`LinearLearner.checkpoint` took in one critical section."""

    state: dict[str, Any]
    watermark: float  # the clock, read after the last update the state holds
    n_updates: int  # updates (own and merged) the state holds
    dA: FloatArray  # the pending delta taken out of the state
    db: FloatArray
    dn: int


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


class EpsilonBest(LinearLearner):
    """A linear learner that takes the best-scoring eligible arm, or with probability ``epsilon`` a
    uniformly random eligible one (LinUCB with its bonus, epsilon-greedy without)."""

    epsilon: float

    def _pick(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
              best: int) -> tuple[int, float]:
        return sample_epsilon(self._rng, best, len(eligible), self.epsilon)

    def _distribution(self, X: FloatArray, scores: FloatArray, eligible: npt.NDArray[np.intp],
                      best: int) -> FloatArray:
        return epsilon_mix(best, len(eligible), self.epsilon)
