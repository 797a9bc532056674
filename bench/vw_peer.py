"""Vowpal Wabbit (``--cb_explore_adf``) as a peer learner behind our Learner contract (benchmark only).

Each arm is one ADF action example carrying the same feature vector our learners see; VW's
exploration (epsilon-greedy over its cost-sensitive regressor by default) gives the probability
mass function, we draw from it with a seeded generator, and the propensity is the drawn arm's
mass. Learning needs the propensity with the reward; the contract's ``update(features, reward)``
does not carry it, so the peer remembers it per chosen feature vector (bounded).

Install with ``pip install -e '.[bench]'``. Importing this module registers the peer as
``vw-cb-explore-adf`` in :mod:`learners.registry`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from vowpalwabbit import Workspace

from decision.domain import Choice, RequestContext, ScoredCandidate
from learners import registry


def _action_line(features: Sequence[float]) -> str:
    return "|a " + " ".join(f"f{i}:{v:.6g}" for i, v in enumerate(features) if v != 0.0)


class VowpalWabbitPeer:
    """VW contextual bandit with action-dependent features.

    Parameters
    ----------
    n_features
        Length of the feature vectors (used to check input).
    epsilon
        VW's exploration rate.
    seed
        Seed of VW and of the draw from its pmf.
    extra_args
        More VW command-line arguments (e.g. ``"--cb_type dr -q aa"``).
    """

    name = "vw-cb-explore-adf"
    version = "9"

    def __init__(self, n_features: int, *, epsilon: float = 0.05, seed: int | None = None,
                 extra_args: str = "") -> None:
        self.n_features = n_features
        self.epsilon = epsilon
        self.seed = seed
        self.extra_args = extra_args
        self._vw = Workspace(f"--cb_explore_adf --epsilon {epsilon} --quiet --random_seed {seed or 0} {extra_args}")
        self._rng = np.random.default_rng(seed)
        self._props: OrderedDict[tuple[float, ...], float] = OrderedDict()

    def clone(self) -> VowpalWabbitPeer:
        return VowpalWabbitPeer(self.n_features, epsilon=self.epsilon, seed=self.seed, extra_args=self.extra_args)

    def _pmf(self, arms: Sequence[ScoredCandidate]) -> np.ndarray:
        ex = ["shared |s bias"] + [_action_line(a.features) for a in arms]
        pmf: np.ndarray = np.asarray(self._vw.predict(ex), dtype=float)
        out: np.ndarray = pmf / pmf.sum()
        return out

    def choose(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> Choice:
        if not arms:
            raise ValueError("no arms offered")
        pmf = self._pmf(arms)
        drawn = int(np.searchsorted(np.cumsum(pmf), self._rng.random(), side="right"))
        arm = min(drawn, len(arms) - 1)
        if pmf[arm] <= 0:
            arm = int(np.argmax(pmf))
        self._props[tuple(arms[arm].features)] = float(pmf[arm])
        while len(self._props) > 100_000:
            self._props.popitem(last=False)
        return Choice(arm, float(pmf[arm]), tuple(pmf.tolist()))

    def probabilities(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> tuple[float, ...]:
        return tuple(self._pmf(arms).tolist())

    def update(self, features: Sequence[float], reward: float) -> None:
        p = self._props.pop(tuple(features), 1.0)
        self._vw.learn(["shared |s bias", f"0:{-reward:.6g}:{p:.6g} {_action_line(features)}"])

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("the VW peer is for benchmarks; it is not persisted")


def _factory(n_features: int, **params: Any) -> VowpalWabbitPeer:
    return VowpalWabbitPeer(n_features, **params)


registry.register(VowpalWabbitPeer.name, _factory)
