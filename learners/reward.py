"""The learners' objective: TTFT against the request's target, $ per 1K tokens, and failures.

For an outcome with status ``ok``::

    reward = w_ttft * max(-ttft_floor, 1 - ttft_ms / target) - w_cost * min(cost_cap, cost / cost_ref)

(with ``cost_weight_ms`` set, ``ttft_ms`` counts ``cost_weight_ms x cost / $0.001`` more: the price
the score stage puts on cost, ``decision.cost_weight_ms``, so what a learner fits is what choices
rank by), so a TTFT of 0 scores ``w_ttft``, exactly the target scores 0, twice the target ``-w_ttft`` (down to
``-w_ttft * ttft_floor``): linear in TTFT, which is what a linear reward model can fit. ``target`` is
the request's ``ttft_target_ms`` or ``default_target_ms``; ``cost_ref`` is the request's budget
(``max_cost_per_1k_tokens``) or the configured ``cost_ref``. ``error`` and ``timeout`` (including an
outcome that never arrived) score ``-w_failure``; ``cancelled`` scores ``cancelled_reward`` (the
client gave up, which says little about the route). Weights are chosen per tenant first, then per
user tier, then the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from decision.domain import Outcome, OutcomeStatus, RequestContext


@dataclass(frozen=True, slots=True)
class Weights:
    """One set of objective weights (see the module docstring)."""

    w_ttft: float = 1.0
    w_cost: float = 0.1
    w_failure: float = 2.0
    ttft_floor: float = 2.0
    cost_cap: float = 5.0
    cancelled_reward: float = 0.0

    @staticmethod
    def parse(data: Mapping[str, Any], base: Weights | None = None, where: str = "reward") -> Weights:
        """Weights from a config mapping; unknown keys fail fast, naming the key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: must be a mapping of weights, not {type(data).__name__}")
        known = {f.name for f in fields(Weights)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {k: float(v) for k, v in data.items()}
        for k, v in values.items():
            if not math.isfinite(v):  # a NaN or infinite weight makes every reward non-finite: nothing is learnt
                raise ValueError(f"{where}.{k}: must be a finite number, got {v}")
            if k != "cancelled_reward" and v < 0:
                raise ValueError(f"{where}.{k}: must be >= 0, got {v}")
        return replace(base or Weights(), **values)


class ObjectiveReward:
    """The configurable reward; implements :class:`decision.contracts.RewardFunction`.

    Parameters
    ----------
    default
        Weights for requests no override matches.
    tenants
        Weights per tenant (take precedence).
    user_tiers
        Weights per user tier.
    default_target_ms
        TTFT target when the request gives none.
    cost_ref
        $ per 1K tokens that counts as one unit of cost when the request gives no budget.
    cost_weight_ms
        Milliseconds of TTFT that $0.001 per 1K tokens is worth (``decision.cost_weight_ms``).

    Examples
    --------
    >>> from decision.domain import Outcome, OutcomeStatus, RequestContext
    >>> reward = ObjectiveReward(Weights(w_cost=0.0))
    >>> ctx = RequestContext("r", "t", ttft_target_ms=200.0)
    >>> reward(ctx, Outcome("d", OutcomeStatus.OK, ttft_ms=100.0), 120.0, 0.001)
    0.5
    >>> reward(ctx, Outcome("d", OutcomeStatus.TIMEOUT), 120.0, 0.001)
    -2.0
    >>> priced = ObjectiveReward(Weights(w_cost=0.0), cost_weight_ms=50.0)  # $0.001/1K = 50 ms
    >>> priced(ctx, Outcome("d", OutcomeStatus.OK, ttft_ms=100.0), 120.0, 0.001)
    0.25
    """

    def __init__(self, default: Weights | None = None, *, tenants: Mapping[str, Weights] | None = None,
                 user_tiers: Mapping[str, Weights] | None = None, default_target_ms: float = 500.0,
                 cost_ref: float = 0.001, cost_weight_ms: float = 0.0) -> None:
        self.default = default or Weights()
        self.cost_weight_ms = cost_weight_ms
        self.tenants = dict(tenants or {})
        self.user_tiers = dict(user_tiers or {})
        self.default_target_ms = default_target_ms
        self.cost_ref = cost_ref

    def weights_for(self, ctx: RequestContext) -> Weights:
        w = self.tenants.get(ctx.tenant)
        if w is None:
            w = self.user_tiers.get(ctx.user_tier, self.default)
        return w

    def __call__(self, ctx: RequestContext, outcome: Outcome, expected_ttft_ms: float,
                 cost_per_1k_tokens: float) -> float:
        w = self.weights_for(ctx)
        status = outcome.status
        if status is OutcomeStatus.ERROR or status is OutcomeStatus.TIMEOUT:
            return -w.w_failure
        if status is OutcomeStatus.CANCELLED:
            return w.cancelled_reward
        target = ctx.ttft_target_ms if ctx.ttft_target_ms > 0 else self.default_target_ms
        budget = ctx.max_cost_per_1k_tokens if ctx.max_cost_per_1k_tokens > 0 else self.cost_ref
        ttft_ms = outcome.ttft_ms + self.cost_weight_ms * max(0.0, cost_per_1k_tokens) * 1000.0
        ttft_term = max(-w.ttft_floor, 1.0 - ttft_ms / target)
        cost_term = min(w.cost_cap, max(0.0, cost_per_1k_tokens) / budget)
        return w.w_ttft * ttft_term - w.w_cost * cost_term


def reward_from_config(config: Mapping[str, Any], *, cost_weight_ms: float = 0.0) -> ObjectiveReward:
    """Build the reward from the service config's ``learner.reward`` mapping.

    Keys: the :class:`Weights` fields (defaults), ``default_target_ms``, ``cost_ref``, and
    ``tenants`` / ``user_tiers`` mapping names to partial weight overrides of the defaults.
    ``cost_weight_ms`` is the score stage's price of cost (``decision.cost_weight_ms``).

    >>> r = reward_from_config({"w_cost": 0.5, "tenants": {"acme": {"w_failure": 5}}})
    >>> r.tenants["acme"].w_failure, r.tenants["acme"].w_cost
    (5.0, 0.5)
    """
    data = dict(config)
    tenants = data.pop("tenants", {}) or {}
    tiers = data.pop("user_tiers", {}) or {}
    for key, section in (("tenants", tenants), ("user_tiers", tiers)):
        if not isinstance(section, Mapping):
            raise ValueError(f"reward.{key}: must map names to weights, not {type(section).__name__}")
    target = float(data.pop("default_target_ms", 500.0))
    cost_ref = float(data.pop("cost_ref", 0.001))
    if not (0 < target < math.inf and 0 < cost_ref < math.inf):  # NaN fails both comparisons
        raise ValueError(f"reward: default_target_ms and cost_ref must be finite and > 0, got {target} and {cost_ref}")
    default = Weights.parse(data)
    return ObjectiveReward(
        default,
        tenants={str(k): Weights.parse(v, default, f"reward.tenants.{k}") for k, v in tenants.items()},
        user_tiers={str(k): Weights.parse(v, default, f"reward.user_tiers.{k}") for k, v in tiers.items()},
        default_target_ms=target, cost_ref=cost_ref, cost_weight_ms=cost_weight_ms)
