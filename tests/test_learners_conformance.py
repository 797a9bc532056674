"""One conformance suite over every registered learner (DESIGN.md section 7)."""

from __future__ import annotations

import numpy as np
import pytest

from decision.domain import RequestContext, ScoredCandidate
from learners.registry import make_learner, names
from learners.store import LearnerStore
from learners.testing import toy_arms
from tests.test_learners_support import migrate

D = 6
CTX = RequestContext("r", "t")


def _arms(rng: np.random.Generator, k: int) -> tuple[ScoredCandidate, ...]:
    feats = rng.random((k, D))
    feats[:, 0] = 1.0
    return toy_arms((rng.random(k) * 500.0).tolist(), feats.tolist())


def _params(name: str) -> dict[str, float]:
    return {} if name == "least-ttft" else {"seed": 11}


def _play(learner: object, seed: int, steps: int) -> list[tuple[int, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        arms = _arms(rng, int(rng.integers(1, 9)))
        c = learner.choose(CTX, arms)  # type: ignore[attr-defined]
        out.append((c.arm, c.propensity))
        learner.update(arms[c.arm].features, float(arms[c.arm].features[1] - 0.5))  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def store(pg_url: str) -> LearnerStore:
    migrate(pg_url)
    return LearnerStore(pg_url)


@pytest.mark.parametrize("name", names())
def test_seeding_is_idempotent(name: str) -> None:
    a, b = make_learner(name, D, **_params(name)), make_learner(name, D, **_params(name))
    assert _play(a, 1, 150) == _play(b, 1, 150)


@pytest.mark.parametrize("name", names())
def test_clone_is_fresh_with_the_same_hyperparameters(name: str) -> None:
    trained = make_learner(name, D, **_params(name))
    _play(trained, 2, 100)
    clone = trained.clone()  # type: ignore[attr-defined]
    assert (type(clone) is type(trained) and repr(clone) == repr(trained)) or name == "least-ttft"
    assert _play(clone, 3, 60) == _play(make_learner(name, D, **_params(name)), 3, 60)


@pytest.mark.parametrize("name", names())
def test_only_offered_arms_and_propensities_in_unit_interval(name: str) -> None:
    learner = make_learner(name, D, **_params(name))
    rng = np.random.default_rng(4)
    for _ in range(300):
        k = int(rng.integers(1, 33))
        arms = _arms(rng, k)
        c = learner.choose(CTX, arms)
        assert 0 <= c.arm < k and 0.0 < c.propensity <= 1.0 and len(c.scores) == k
        probs = learner.probabilities(CTX, arms)  # type: ignore[attr-defined]
        assert len(probs) == k and abs(sum(probs) - 1.0) < 1e-9 and min(probs) >= 0.0
        learner.update(arms[c.arm].features, float(rng.normal()))
    if k > 1:
        assert learner.choose(CTX, arms[:1]).arm == 0


@pytest.mark.parametrize("name", names())
def test_propensity_matches_the_empirical_choice_frequency(name: str) -> None:
    learner = make_learner(name, D, **_params(name))
    rng = np.random.default_rng(5)
    _play(learner, 6, 40)
    arms = _arms(rng, 4)
    state = learner.state_dict()  # type: ignore[attr-defined]
    n = 4000
    counts = np.zeros(4)
    reported = np.zeros(4)
    for _ in range(n):
        c = learner.choose(CTX, arms)
        counts[c.arm] += 1
        reported[c.arm] += c.propensity
    learner.load_state(state)  # type: ignore[attr-defined]
    freq = counts / n
    mean_p = np.divide(reported, counts, out=np.zeros(4), where=counts > 0)
    # The reported propensity of an arm is its frequency (Monte Carlo for Thompson sampling).
    tol = 0.05 if name == "linear-ts" else 0.03
    assert np.all(np.abs(mean_p[counts > 0] - freq[counts > 0]) < tol), (freq, mean_p)


@pytest.mark.parametrize("name", names())
def test_state_round_trips_through_postgresql(name: str, store: LearnerStore) -> None:
    learner = make_learner(name, D, **_params(name))
    _play(learner, 7, 120)
    store.save_snapshot(learner=learner.name, version=learner.version, replica="", watermark=0.0, n_updates=120,
                        delta_marks={}, state=learner.state_dict())  # type: ignore[attr-defined]
    restored = make_learner(name, D, **_params(name))
    snap = store.latest_snapshot(learner=learner.name, version=learner.version)
    assert snap is not None
    restored.load_state(snap.state)  # type: ignore[attr-defined]
    assert _play(restored, 8, 80) == _play(learner, 8, 80)
