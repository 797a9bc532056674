"""Properties: over random fleets, telemetry, requests and learner states, the chosen route and
every fallback satisfy every deny rule, including under forced (uniformly random) exploration."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from functools import lru_cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decision.domain import Choice, Endpoint, RequestContext, ScoredCandidate, TelemetryReading
from decision.engine import DecisionEngine
from decision.errors import NoCandidate, QuotaExceeded
from decision.fleet import Fleet
from decision.fleetgen import synthetic_fleet
from decision.telemetry import TelemetryStore
from learners.registry import make_learner
from policies.bundle import DEFAULT_BUNDLE, CompiledBundle, compile_bundle
from policies.guard import PolicyGuard
from policies.inputs import ceil_age


class UniformExplorer:
    """Forced exploration: any offered arm, uniformly, propensity 1/n."""

    name = "uniform"
    version = "1"

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def choose(self, ctx: RequestContext, arms: Sequence[ScoredCandidate]) -> Choice:
        n = len(arms)
        return Choice(self._rng.randrange(n), 1.0 / n, tuple(self._rng.random() for _ in arms))

    def update(self, features: Sequence[float], reward: float) -> None:
        pass


@lru_cache(maxsize=1)
def _bundle() -> CompiledBundle:
    return compile_bundle(DEFAULT_BUNDLE)


@lru_cache(maxsize=4)
def _fleet(seed: int) -> Fleet:
    data = synthetic_fleet(256, per_model=32, seed=seed, regions=4)
    rng = random.Random(seed)
    # Mix in what the rules care about: device sites with owners, strict models.
    for site in data["sites"][::5]:
        site["tier"], site["owner_tenant"] = "device", rng.choice(["acme", "globex"])
    for model in data["models"][::2]:
        model["safety_tier"] = "strict"
    return Fleet.from_mapping(data)


def _violations(ep: Endpoint, tel: TelemetryReading, ctx: RequestContext) -> list[str]:
    """The deny rules of the default bundle, restated independently in Python."""
    p = _bundle().params
    out = []
    if ctx.allowed_jurisdictions and ep.jurisdiction not in ctx.allowed_jurisdictions:
        out.append("jurisdiction")
    if ctx.data_class in p["data_class_jurisdictions"] and \
            ep.jurisdiction not in p["data_class_jurisdictions"][ctx.data_class]:
        out.append("data class jurisdiction")
    if not set(p["data_class_certifications"].get(ctx.data_class, ())) <= ep.certifications:
        out.append("certification")
    if ctx.prompt_class in p["prompt_class_safety_tiers"] and \
            ep.safety_tier not in p["prompt_class_safety_tiers"][ctx.prompt_class]:
        out.append("safety tier")
    if ep.tier == "device" and ep.owner_tenant != ctx.tenant:
        out.append("device owner")
    if tel.values.get("gpu_temp_c", 0.0) > p["max_gpu_temp_c"]:
        out.append("temperature")
    if tel.values.get("xid_errors", 0.0) != 0.0:
        out.append("xid")
    for m in ("gpu_temp_c", "xid_errors", "queue_waiting"):
        age = ceil_age(tel.ages_s.get(m))
        if age is not None and age > p["max_telemetry_age_s"]:
            out.append("stale")
    return out


requests = st.builds(
    lambda tenant, tier, model, juris, data_class, prompt, tokens: RequestContext(
        "r", tenant, user_tier=tier, model=f"model-{model}", allowed_jurisdictions=juris, data_class=data_class,
        prompt_class=prompt, estimated_input_tokens=tokens, expected_output_tokens=tokens // 4),
    st.sampled_from(["acme", "globex", "initech"]), st.sampled_from(["free", "standard", "premium", "other"]),
    st.integers(0, 7), st.sampled_from([(), ("EU",), ("US",), ("EU", "US")]),
    st.sampled_from(["public", "personal", "phi"]), st.sampled_from(["general", "medical", "legal"]),
    st.integers(0, 4000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet_seed=st.integers(0, 3), tel_seed=st.integers(0, 10_000), learner_seed=st.integers(0, 10_000),
       learner_kind=st.sampled_from(["uniform", "epsilon-greedy"]), reqs=st.lists(requests, min_size=1, max_size=6))
def test_chosen_route_and_fallbacks_satisfy_every_deny_rule(fleet_seed: int, tel_seed: int, learner_seed: int,
                                                           learner_kind: str,
                                                           reqs: list[RequestContext]) -> None:
    fleet = _fleet(fleet_seed)
    now = time.time()
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints}, clock=lambda: now)
    rng = random.Random(tel_seed)
    for node in {e.node_id for e in fleet.endpoints}:
        if rng.random() < 0.8:
            store.update_node(node, {"gpu_temp_c": rng.uniform(40, 95), "xid_errors": rng.choice([0.0] * 9 + [79.0])},
                              now - rng.choice([0.5, 2.0, 29.5, 30.0, 31.0, 90.0]))
    for e in fleet.endpoints:
        if rng.random() < 0.8:
            store.update_endpoint(e.endpoint_id, {"queue_waiting": float(rng.randint(0, 5))},
                                  now - rng.choice([0.2, 10.0, 45.0]))
    guard = PolicyGuard(_bundle(), clock=lambda: now)
    engine = DecisionEngine(fleet, store, guard, UniformExplorer(learner_seed), max_fallbacks=8, clock=lambda: now)
    if learner_kind != "uniform":  # a real learner from learners/, forced to explore every time
        engine.learner = make_learner("epsilon-greedy", len(engine.features.names), epsilon=1.0, seed=learner_seed)
    for ctx in reqs:
        try:
            d = engine.decide(ctx)
        except (NoCandidate, QuotaExceeded) as exc:
            # Denied: then no located candidate may satisfy every rule (or the quota is spent).
            if isinstance(exc, NoCandidate):
                cands = engine.locate(fleet, ctx, now)
                assert all(_violations(c.endpoint, c.telemetry, ctx) for c in cands)
            continue
        for route in (d.route, *d.fallbacks):
            ep = fleet.by_id[route.endpoint_id]
            assert _violations(ep, store.reading(ep.endpoint_id, now), ctx) == [], route.endpoint_id
        # And the guard removed nothing that satisfies every rule (no over-blocking).
        allowed = set(d.trace["stages"]["guard"]["allowed"])
        for c in engine.locate(fleet, ctx, now):
            assert (c.endpoint.endpoint_id in allowed) == (not _violations(c.endpoint, c.telemetry, ctx))
