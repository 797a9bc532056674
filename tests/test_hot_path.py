"""The columnar request path must decide exactly as the one-candidate-at-a-time definitions.

The engine hands the guard and the score stage a :class:`CandidateSet` (arrays); any other
sequence of :class:`Candidate` objects goes through the plain per-candidate code. Both must give
the same verdicts, survivors, estimates and features for the same telemetry, including stale,
missing and never-reported values.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from decision.candidates import CandidateSet
from decision.domain import Candidate, RequestContext
from decision.engine import DecisionEngine
from decision.fleet import Fleet
from decision.fleetgen import synthetic_fleet
from decision.ledger import EndpointLedger
from decision.scoring import score_candidates
from decision.telemetry import CANONICAL, TelemetryStore
from learners.features import RouteFeatures
from learners.least_ttft import LeastExpectedTtft
from policies.bundle import DEFAULT_BUNDLE, compile_bundle
from policies.guard import PolicyGuard
from policies.inputs import dense_telemetry_key, telemetry_key


def _world(seed: int) -> tuple[Fleet, TelemetryStore, float]:
    fleet = Fleet.from_mapping(synthetic_fleet(256, per_model=32, seed=seed))
    now = 10_000.0
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints}, stale_after_s=30.0)
    rng = random.Random(seed)
    for e in fleet.endpoints:
        if rng.random() < 0.15:
            continue  # never reported
        age = rng.choice([0.2, 3.7, 29.9, 31.0, 120.0])  # fresh, fresh, just fresh, just stale, stale
        store.update_endpoint(e.endpoint_id, {"queue_running": rng.randint(0, 8), "queue_waiting": rng.randint(0, 9),
                                              "kv_cache_usage": rng.random()}, ts=now - age)
    for node in {e.node_id for e in fleet.endpoints}:
        if rng.random() < 0.1:
            continue
        vals = {"gpu_temp_c": float(rng.choice([50, 70, 84, 86, 95])), "gpu_util": rng.uniform(0, 100),
                "power_w": rng.uniform(50, 700), "xid_errors": float(rng.choice([0, 0, 0, 79])),
                "fb_used_mib": rng.uniform(0, 8e4), "fb_free_mib": rng.uniform(0, 8e4)}
        if rng.random() < 0.3:
            vals.pop("gpu_temp_c")
        store.update_node(node, vals, ts=now - rng.choice([0.5, 2.0, 45.0]))
    return fleet, store, now


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batch_rows_match_each_endpoint_reading(seed: int) -> None:
    fleet, store, now = _world(seed)
    ids = [e.endpoint_id for e in fleet.endpoints]
    for batch in (store.batch(ids, now), store.batch(ids, now, store.rows_of(ids))):
        for i, eid in enumerate(ids):
            r = store.reading(eid, now)
            row = {name: v for name, v in zip(CANONICAL, batch.values[i].tolist(), strict=True) if not math.isnan(v)}
            assert row == dict(r.values)
            assert batch.reading(i) == r
        assert batch.max_age_s().tolist() == [store.reading(e, now).max_age_s for e in ids]


def test_rows_follow_later_writes_and_a_batch_is_one_instant() -> None:
    store = TelemetryStore({"a": "n1", "b": "n1"})
    rows = store.rows_of(["a", "b", "never-seen"])
    store.update_node("n1", {"gpu_temp_c": 60.0}, ts=100.0)
    before = store.batch(["a", "b", "never-seen"], 101.0, rows)
    store.update_node("n1", {"gpu_temp_c": 90.0}, ts=102.0)
    after = store.batch(["a", "b", "never-seen"], 103.0, rows)
    col = CANONICAL.index("gpu_temp_c")
    assert before.values[:2, col].tolist() == [60.0, 60.0] and math.isnan(before.values[2, col])
    assert after.values[:2, col].tolist() == [90.0, 90.0]
    assert before.reading(0).values["gpu_temp_c"] == 60.0  # the objects belong to the batch's instant


def test_nan_samples_are_no_value() -> None:
    store = TelemetryStore({"a": "n1"})
    store.update_node("n1", {"gpu_temp_c": 60.0}, ts=100.0)
    store.update_node("n1", {"gpu_temp_c": float("nan")}, ts=101.0)
    assert store.reading("a", 101.0).values["gpu_temp_c"] == 60.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dense_keys_are_equal_exactly_when_tuple_keys_are(seed: int) -> None:
    fleet, store, now = _world(seed)
    ids = [e.endpoint_id for e in fleet.endpoints]
    metrics, ages = ("gpu_temp_c", "xid_errors"), ("gpu_temp_c", "xid_errors", "queue_waiting")
    dense = dense_telemetry_key(metrics, ages)
    assert dense is not None
    for t in (now, now + 0.5, now + 1.0):
        batch = store.batch(ids, t)
        dkeys = dense(batch)
        tkeys = [telemetry_key(store.reading(e, t), metrics, ages) for e in ids]
        pairs = list(zip(dkeys, tkeys, strict=True))
        for a in range(0, len(pairs), 7):
            for b in range(len(pairs)):
                assert (pairs[a][0] == pairs[b][0]) == (pairs[a][1] == pairs[b][1])
    assert dense_telemetry_key(("not_a_canonical_metric",), ()) is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_guard_and_score_agree_between_columns_and_candidate_objects(seed: int) -> None:
    fleet, store, now = _world(seed)
    bundle = compile_bundle(DEFAULT_BUNDLE)
    features = RouteFeatures()
    engine = DecisionEngine(fleet, store, PolicyGuard(bundle), LeastExpectedTtft(), features=features,
                            clock=lambda: now)
    rng = random.Random(seed)
    regions = sorted({s.region for s in fleet.sites.values()})
    for i, model in enumerate(sorted(fleet.models)):
        ctx = RequestContext(f"r{i}", f"tenant-{i % 3}", model=model, client_region=regions[i % len(regions)],
                             estimated_input_tokens=rng.randint(1, 5000), expected_output_tokens=rng.randint(1, 900),
                             session_id=f"s{i}", ttft_target_ms=rng.choice([0.0, 300.0]),
                             max_cost_per_1k_tokens=rng.choice([0.0, 0.002]))
        located = engine.locate(fleet, ctx, now)
        assert isinstance(located, CandidateSet)
        objects = tuple(Candidate(c.endpoint, store.reading(c.endpoint.endpoint_id, now), c.rtt_ms) for c in located)
        state = {"inventory_revision": fleet.revision, "now": now}
        # Separate guards, so neither answer comes from the other's memo.
        by_cols = PolicyGuard(bundle).evaluate(ctx, located, state)
        by_objs = PolicyGuard(bundle).evaluate(ctx, objects, state)
        assert by_cols.verdicts == by_objs.verdicts
        assert [c.endpoint.endpoint_id for c in by_cols.allowed] == [c.endpoint.endpoint_id for c in by_objs.allowed]
        if not by_objs.allowed:
            continue
        egress = {c.endpoint.site_id: fleet.topology.path(ctx.client_region, c.endpoint.site_id)[1]
                  for c in by_objs.allowed}
        ledger = EndpointLedger()
        for k, eid in enumerate(located.endpoint_ids[:3]):
            ledger.sent(eid, now=50.0 - k, prefill_s=0.4)
            ledger.observed(eid, expected_ms=100.0, observed_ms=100.0 + 90.0 * k, slowness=1.0)
        a = score_candidates(ctx, by_cols.allowed, features, {}, ledger=ledger, now=50.0)
        b = score_candidates(ctx, tuple(by_objs.allowed), features, egress, ledger=ledger, now=50.0)
        np.testing.assert_allclose(a.matrix, b.matrix, rtol=1e-12)
        np.testing.assert_allclose(a.ttft_ms, b.ttft_ms, rtol=1e-12)
        np.testing.assert_allclose(a.cost_per_1k, b.cost_per_1k, rtol=1e-12)
        assert a[0] == b[0]  # a ScoredCandidate built on demand equals the one from objects


def test_candidate_set_builds_candidates_once_and_take_keeps_them() -> None:
    fleet, store, now = _world(4)
    engine = DecisionEngine(fleet, store, PolicyGuard(compile_bundle(DEFAULT_BUNDLE)), LeastExpectedTtft())
    model = sorted(fleet.models)[0]
    located = engine.locate(fleet, RequestContext("r", "t", model=model), now)
    first = located[3]
    assert located[3] is first and located[-1] is located[len(located) - 1]
    sub = located.take([3, 0])
    assert sub[0] is first and sub[1].endpoint.endpoint_id == located.endpoint_ids[0]
    assert list(sub.endpoint_ids) == [located.endpoint_ids[3], located.endpoint_ids[0]]
    with pytest.raises(IndexError):
        located[len(located)]


def test_located_features_match_built_candidates_and_follow_a_new_reading() -> None:
    fleet, store, now = _world(5)
    features = RouteFeatures()
    engine = DecisionEngine(fleet, store, PolicyGuard(compile_bundle(DEFAULT_BUNDLE)), LeastExpectedTtft(),
                            features=features, clock=lambda: now)
    model = sorted(fleet.models)[0]
    region = sorted({s.region for s in fleet.sites.values()})[0]
    ctx = RequestContext("r", "t", model=model, estimated_input_tokens=500, expected_output_tokens=100,
                         client_region=region)

    def both() -> tuple[np.ndarray, np.ndarray]:
        located = engine.locate(fleet, ctx, now)
        objects = tuple(Candidate(c.endpoint, store.reading(c.endpoint.endpoint_id, now), c.rtt_ms) for c in located)
        a = score_candidates(ctx, located, features, {})
        egress = {e.site_id: float(g) for e, g in zip(located.endpoints, located.placement.egress_per_gb,
                                                      strict=True)}
        b = score_candidates(ctx, objects, RouteFeatures(), egress)  # a fresh builder: nothing kept
        return a.matrix, b.matrix

    first, fresh = both()
    np.testing.assert_allclose(first, fresh, rtol=1e-12)
    same_region = features.names.index("same_region")
    assert 0 < first[:, same_region].sum() < len(first)  # the cached region column is the client's
    again, _ = both()
    np.testing.assert_array_equal(again, first)
    eid = engine.locate(fleet, ctx, now).endpoint_ids[0]
    store.update_endpoint(eid, {"kv_cache_usage": 0.97}, ts=now)
    store.update_node(fleet.by_id[eid].node_id, {"gpu_temp_c": 61.0, "gpu_util": 12.0}, ts=now)
    changed, fresh = both()
    np.testing.assert_allclose(changed, fresh, rtol=1e-12)
    assert changed[0, 4] == 0.97 and not np.array_equal(changed[0], first[0])
