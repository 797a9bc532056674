"""The one registry of learners: kebab-case names, one factory signature.

``make_learner(name, n_features, **params)`` builds any registered learner; ``params`` are its
hyperparameters (constructor keyword arguments). Configuration strings of the form
``"name"`` or ``"name:key=value,key=value"`` (used by ``infermesh learn evaluate --learner`` and
for shadow learners) are parsed by :func:`parse_spec`.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from decision.contracts import Learner
from learners.epsilon_greedy import EpsilonGreedy
from learners.least_ttft import LeastExpectedTtft
from learners.linucb import LinUCB
from learners.softmax import Softmax
from learners.thompson import LinearThompson

Factory = Callable[..., Learner]


def _least_ttft(n_features: int, **params: Any) -> Learner:
    return LeastExpectedTtft(**params)


_CLASSES: dict[str, type] = {
    "least-ttft": LeastExpectedTtft,
    "linucb": LinUCB,
    "linear-ts": LinearThompson,
    "epsilon-greedy": EpsilonGreedy,
    "softmax": Softmax,
}

REGISTRY: dict[str, Factory] = {
    "least-ttft": _least_ttft,
    "linucb": LinUCB,
    "linear-ts": LinearThompson,
    "epsilon-greedy": EpsilonGreedy,
    "softmax": Softmax,
}


def register(name: str, factory: Factory) -> None:
    """Add a learner (e.g. the Vowpal Wabbit peer of the benchmark) under a kebab-case name."""
    if name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"learner names are kebab-case, got {name!r}")
    REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))


def make_learner(name: str, n_features: int, **params: Any) -> Learner:
    """Build the learner registered as ``name``; unknown names and parameters fail fast.

    >>> learner = make_learner("linucb", 4, alpha=0.5, seed=1, safe_slack=1.0)
    >>> type(learner).__name__, learner.alpha, learner.safe_slack, learner.prior
    ('LinUCB', 0.5, 1.0, 'auto')
    """
    factory = REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown learner {name!r}; registered: {', '.join(names())}")
    cls = _CLASSES.get(name)
    if cls is not None:
        signature = inspect.signature(cls).parameters
        accepted = set(signature) - {"n_features"}
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise ValueError(f"learner {name}: unknown parameter(s) {', '.join(unknown)}; "
                             f"accepted: {', '.join(sorted(accepted))}")
        for key, value in params.items():  # a string where a number goes fails later, and obscurely
            default = signature[key].default
            if isinstance(default, int | float) and not isinstance(default, bool) and value is not None and (
                    not isinstance(value, int | float) or isinstance(value, bool)):  # None: "off" where taken
                raise ValueError(f"learner {name}: {key} must be a number, got {value!r}")
    # A NaN alpha or temperature passes every range check written as a comparison; an integer past
    # a float's range (400 digits) passes them too, then overflows in every decision.
    bad = sorted(k for k, v in params.items() if isinstance(v, int | float) and not isinstance(v, bool)
                 and not (abs(v) < 1e300 and math.isfinite(v)))
    if bad:
        shown = str(params[bad[0]])
        raise ValueError(f"learner {name}: {bad[0]} must be a finite number, got "
                         f"{shown if len(shown) <= 24 else shown[:21] + '...'}")
    return factory(n_features, **params)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,..."`` into the name and its parameters (values parsed as JSON).

    >>> parse_spec("linear-ts:v=0.1,seed=3")
    ('linear-ts', {'v': 0.1, 'seed': 3})
    """
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"learner spec {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = _value(value.strip())
    return name, params


def learner_from_spec(spec: str | Mapping[str, Any], n_features: int) -> Learner:
    """A learner from a spec string or a ``{"name": ..., "params": {...}}`` mapping."""
    if isinstance(spec, str):
        name, params = parse_spec(spec)
    else:
        name, params = str(spec["name"]), dict(spec.get("params", {}))
    return make_learner(name, n_features, **params)

