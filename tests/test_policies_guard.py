"""PolicyGuard in the engine on the demo fleet: each rule kind, quota, warn severity, memo, Redis."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from decision.domain import Outcome, OutcomeStatus, RequestContext, Severity
from decision.engine import DecisionEngine
from decision.errors import NoCandidate, QuotaExceeded, Unavailable
from decision.fleet import Fleet
from decision.telemetry import TelemetryStore
from learners.least_ttft import LeastExpectedTtft
from policies.bundle import DEFAULT_BUNDLE, compile_bundle
from policies.errors import BundleError
from policies.guard import PolicyGuard
from policies.quota import InMemoryQuotaCounters, QuotaUsage, RedisQuotaCounters
from tests.policy_support import bundle_with_rule_field


class _Audit:
    def __init__(self) -> None:
        self.decisions: list[Mapping[str, Any]] = []

    def submit_decision(self, event: Mapping[str, Any]) -> None:
        self.decisions.append(event)

    def submit_outcome(self, event: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _engine(fleet: Fleet, guard: PolicyGuard, audit: _Audit | None = None) -> DecisionEngine:
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints})
    return DecisionEngine(fleet, store, guard, LeastExpectedTtft(), audit=audit)


def _allowed_ids(engine: DecisionEngine, ctx: RequestContext) -> set[str]:
    d = engine.decide(ctx)
    return set(d.trace["stages"]["guard"]["allowed"])


def test_residency_rules(demo_fleet: Fleet) -> None:
    engine = _engine(demo_fleet, PolicyGuard(compile_bundle(DEFAULT_BUNDLE)))
    sites = demo_fleet.sites
    eu = _allowed_ids(engine, RequestContext("r1", "globex", model_family="llama", allowed_jurisdictions=("EU",)))
    assert eu and all(demo_fleet.by_id[e].jurisdiction == "EU" for e in eu)
    personal = _allowed_ids(engine, RequestContext("r2", "globex", model_family="llama", data_class="personal"))
    assert personal == eu
    phi = _allowed_ids(engine, RequestContext("r3", "globex", model_family="llama", data_class="phi"))
    assert phi and all("hipaa" in sites[demo_fleet.by_id[e].site_id].certifications for e in phi)
    assert {demo_fleet.by_id[e].jurisdiction for e in phi} == {"EU", "US"}


def test_safety_rules(demo_fleet: Fleet) -> None:
    guard = PolicyGuard(compile_bundle(DEFAULT_BUNDLE))
    engine = _engine(demo_fleet, guard)
    medical = _allowed_ids(engine, RequestContext("r1", "globex", model_family="llama", prompt_class="medical"))
    assert medical and all(demo_fleet.by_id[e].safety_tier == "strict" for e in medical)
    other = _allowed_ids(engine, RequestContext("r2", "globex", model="llama-3.2-3b"))
    mine = _allowed_ids(engine, RequestContext("r3", "acme", model="llama-3.2-3b"))
    devices = {e.endpoint_id for e in demo_fleet.endpoints if e.tier == "device"}
    assert devices <= mine and not devices & other
    # Telemetry: a hot GPU, an XID error and stale telemetry each exclude their endpoint.
    hot, xid, stale = sorted(e.endpoint_id for e in demo_fleet.by_model["llama-3.1-8b"])[:3]
    now = time.time()
    engine.telemetry.update_node(demo_fleet.by_id[hot].node_id, {"gpu_temp_c": 91.0, "xid_errors": 0.0}, now)
    engine.telemetry.update_node(demo_fleet.by_id[xid].node_id, {"gpu_temp_c": 50.0, "xid_errors": 79.0}, now)
    engine.telemetry.update_endpoint(stale, {"queue_waiting": 1.0}, now - 120)
    d = engine.decide(RequestContext("r4", "globex", model="llama-3.1-8b"))
    removed = d.trace["stages"]["guard"]["removed"]
    assert removed[hot] == ["safety.gpu_temperature"]
    assert removed[xid] == ["safety.xid_errors"]
    assert removed[stale] == ["safety.telemetry_fresh"]
    assert d.route.endpoint_id not in (hot, xid, stale)
    assert not {hot, xid, stale} & {f.endpoint_id for f in d.fallbacks}
    verdicts = d.trace["stages"]["guard"]["verdicts"]
    assert {v["engine"] for v in verdicts} == {"cel", "rego"}
    assert all(v["revision"] == guard.revision == d.policy_revision for v in verdicts)


def test_all_removed_names_the_rules_and_is_audited(demo_fleet: Fleet) -> None:
    audit = _Audit()
    engine = _engine(demo_fleet, PolicyGuard(compile_bundle(DEFAULT_BUNDLE)), audit)
    with pytest.raises(NoCandidate) as exc:
        engine.decide(RequestContext("r1", "globex", model_family="llava", prompt_class="medical"))
    assert "safety.prompt_class" in str(exc.value)
    assert audit.decisions[-1]["status"] == "denied"
    assert audit.decisions[-1]["deny_rules"] == ["safety.prompt_class"]


def test_quota_denial_is_resource_exhausted(demo_fleet: Fleet) -> None:
    audit = _Audit()
    engine = _engine(demo_fleet, PolicyGuard(compile_bundle(DEFAULT_BUNDLE)), audit)
    limit = compile_bundle(DEFAULT_BUNDLE).params["quota"]["free"]["requests_per_min"]
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    _wait_for_a_fresh_window(5)
    for i in range(limit):
        engine.decide(RequestContext(f"q{i}", tenant, user_tier="free", model="llama-3.1-8b"))
    with pytest.raises(QuotaExceeded) as exc:
        engine.decide(RequestContext("over", tenant, user_tier="free", model="llama-3.1-8b"))
    assert "quota.tenant_rate" in str(exc.value)
    assert audit.decisions[-1]["status"] == "quota_denied"
    # Another tenant is unaffected.
    engine.decide(RequestContext("other", f"{tenant}-2", user_tier="free", model="llama-3.1-8b"))


def test_warn_severity_records_but_does_not_remove(demo_fleet: Fleet, tmp_path: Path) -> None:
    bundle, _ = bundle_with_rule_field(tmp_path, "prompt_class.rego", "severity: warn")
    guard = PolicyGuard(compile_bundle(bundle))
    engine = _engine(demo_fleet, guard)
    d = engine.decide(RequestContext("r1", "globex", model_family="llava", prompt_class="medical"))
    warns = [v for v in d.trace["stages"]["guard"]["verdicts"] if v["rule_id"] == "safety.prompt_class"]
    assert warns and all(not v["allow"] and v["severity"] == str(Severity.WARN) for v in warns)
    # "Why this route" calls it a warning, never a denial, the chosen endpoint included.
    from audit.why import candidate_rows, render_text

    rows = {r["endpoint_id"]: r for r in candidate_rows({"trace": d.trace})}
    chosen = rows[d.route.endpoint_id]
    assert chosen["role"] == "CHOSEN" and not chosen["denials"]
    assert [rule for rule, _ in chosen["warnings"]] == ["safety.prompt_class"]
    assert ":DENY" not in chosen["verdicts"] and "safety.prompt_class:WARN" in chosen["verdicts"]
    text = render_text({"decision_id": d.decision_id, "decided_at": "-", "status": "routed",
                        "endpoint_id": d.route.endpoint_id, "trace": d.trace})
    line = next(t for t in text.splitlines() if t.strip().startswith(d.route.endpoint_id))
    assert "WARN safety.prompt_class" in line and "DENY" not in line
    assert "denials:" not in text and "warnings (recorded, nothing removed):" in text


def test_memoised_verdicts_equal_fresh_ones(demo_fleet: Fleet) -> None:
    warm = PolicyGuard(compile_bundle(DEFAULT_BUNDLE))
    engine = _engine(demo_fleet, warm)
    now = time.time()
    reqs = [RequestContext(f"r{i}", ("acme", "globex")[i % 2], model_family="llama",
                           allowed_jurisdictions=(("EU",), (), ("US",))[i % 3],
                           data_class=("public", "personal", "phi")[i % 3 if i % 4 else 0],
                           prompt_class=("general", "medical")[i % 2]) for i in range(12)]
    for ctx in reqs * 2:
        cands = engine.locate(demo_fleet, ctx, now)
        state = {**warm.peek(ctx), "inventory_revision": demo_fleet.revision, "now": now}
        fresh = PolicyGuard(compile_bundle(DEFAULT_BUNDLE))
        a, b = warm.evaluate(ctx, cands, state), fresh.evaluate(ctx, cands, state)
        assert [c.endpoint.endpoint_id for c in a.allowed] == [c.endpoint.endpoint_id for c in b.allowed]
        assert a.verdicts == b.verdicts


def test_memos_at_their_bounds_evict_the_oldest_and_still_answer_as_fresh(demo_fleet: Fleet) -> None:
    # Tiny bounds, so that every memo table is full and evicting for most of the run.
    small = PolicyGuard(compile_bundle(DEFAULT_BUNDLE), memo_limit=8, set_memo_limit=2)
    engine = _engine(demo_fleet, small)
    now = time.time()
    reqs = [RequestContext(f"r{i}", f"tenant-{i % 5}", model_family="llama",
                           allowed_jurisdictions=(("EU",), (), ("US",))[i % 3],
                           data_class=("public", "personal", "phi")[i % 3 if i % 4 else 0],
                           prompt_class=("general", "medical")[i % 2], client_region=("eu-west", "us-east")[i % 2])
            for i in range(60)]
    for ctx in reqs * 2:
        cands = engine.locate(demo_fleet, ctx, now)
        state = {**small.peek(ctx), "inventory_revision": demo_fleet.revision, "now": now}
        a = small.evaluate(ctx, cands, state)
        b = PolicyGuard(compile_bundle(DEFAULT_BUNDLE)).evaluate(ctx, cands, state)
        assert [c.endpoint.endpoint_id for c in a.allowed] == [c.endpoint.endpoint_id for c in b.allowed]
        assert a.verdicts == b.verdicts
    memo = next(iter(small._memos.values()))
    assert 0 < len(memo.sets) <= 2 and 0 < len(memo.static_sets) <= 32
    assert len(memo.static) <= 8  # tables of request values; each may pass its bound by one decision's misses
    assert all(len(t) <= 8 + len(demo_fleet.endpoints) for t in memo.static.values())


def _wait_for_a_fresh_window(margin_s: float) -> None:
    if time.time() % 60 > 60 - margin_s:  # keep the whole burst inside one quota window
        time.sleep(60 - time.time() % 60 + 0.1)


def _replicas_sharing_redis(fleet: Fleet, redis_url: str) -> tuple[RedisQuotaCounters, list[DecisionEngine], int]:
    """Two engines whose quota counters are one fresh Redis namespace; and the free tier's limit."""
    prefix = f"infermesh-test:{uuid.uuid4().hex[:8]}"
    try:
        RedisQuotaCounters(redis_url, prefix=prefix).read("x", time.time())
    except Exception as exc:  # pragma: no cover - the machine runs Redis
        pytest.skip(f"no Redis at {redis_url}: {exc}")
    bundle = compile_bundle(DEFAULT_BUNDLE)
    engines = [_engine(fleet, PolicyGuard(bundle, counters=RedisQuotaCounters(redis_url, prefix=prefix)))
               for _ in range(2)]
    return RedisQuotaCounters(redis_url, prefix=prefix), engines, bundle.params["quota"]["free"]["requests_per_min"]


def test_quota_shared_across_two_engines_in_redis(demo_fleet: Fleet, redis_url: str) -> None:
    counters, (a, b), limit = _replicas_sharing_redis(demo_fleet, redis_url)
    _wait_for_a_fresh_window(10)
    for i in range(limit):
        (a if i % 2 else b).decide(RequestContext(f"q{i}", "shared", user_tier="free", model="llama-3.1-8b",
                                                  estimated_input_tokens=10, expected_output_tokens=5))
    for engine in (a, b):
        with pytest.raises(QuotaExceeded):
            engine.decide(RequestContext("over", "shared", user_tier="free", model="llama-3.1-8b"))
    usage = counters.read("shared", time.time())
    assert (usage.requests, usage.tokens) == (limit, limit * 15)


def test_a_give_back_after_its_window_expired_leaves_no_key_behind(redis_url: str) -> None:
    import redis

    prefix = f"infermesh-test:{uuid.uuid4().hex[:8]}"
    counters = RedisQuotaCounters(redis_url, prefix=prefix)
    now = time.time()
    counters.reserve("t", now, 1, 50, hold="h1")
    client = redis.Redis.from_url(redis_url)
    client.delete(counters._key("t", now))  # the window's key expired before the share came back
    counters.give_back("t", now, 1, 50, hold="h1")
    assert client.exists(counters._key("t", now)) == 0  # not recreated without a TTL, at -1 / -50
    client.delete(counters._hold_key("t", "h1"))


def test_reservations_survive_a_redis_that_forgot_its_scripts_or_closed_a_connection(redis_url: str) -> None:
    # Reservations run on each thread's own connection (policies.quota._Script): what redis-py's pool
    # did for them (load a script Redis no longer has, reconnect a connection it closed) must hold.
    import redis

    admin = redis.Redis.from_url(redis_url)
    name = f"infermesh-quota-{os.getpid()}"

    def ours() -> set[str]:
        return {c["id"] for c in admin.client_list() if c["name"] == name}

    before = ours()  # another test's counters in this process, if any
    counters = RedisQuotaCounters(redis_url, prefix=f"infermesh-test:{uuid.uuid4().hex[:8]}")
    now = time.time()
    try:
        assert counters.reserve("t", now, 1, 10, hold="h1") == QuotaUsage(0, 0)
        counters.give_back("t", now, 0, 0, hold="h0")  # the other script, on the same connection
        assert len(ours() - before) == 1
        admin.script_flush()  # a restarted Redis holds no scripts
        assert counters.reserve("t", now, 1, 10, hold="h2") == QuotaUsage(1, 10)
        counters.give_back("t", now, 1, 10, hold="h2")
        assert counters.read("t", now) == QuotaUsage(1, 10)
        killed = sum(admin.client_kill_filter(_id=i) for i in ours() - before)
        assert killed >= 2  # the reservation script's connection, and the pool's (it loaded the script)
        time.sleep(0.05)
        # In steady use, well under a second after the last call: reconnected, not refused.
        assert counters.reserve("t", now, 1, 10, hold="h3") == QuotaUsage(1, 10)
        for _ in range(3):  # again and again, on the connection it reopened
            killed = sum(admin.client_kill_filter(_id=i) for i in ours() - before)
            assert killed >= 1
            time.sleep(0.02)
            assert counters.reserve("t", now, 0, 0, hold="h3") == QuotaUsage(2, 20)
        seen: list[QuotaUsage] = []
        other = threading.Thread(target=lambda: seen.append(counters.reserve("t", now, 1, 10, hold="h4")))
        other.start()
        other.join(10)
        assert seen == [QuotaUsage(2, 20)]  # another thread, its own connection
        counters.close()
        with pytest.raises(redis.ConnectionError, match="closed"):  # no connection opened after close
            counters.reserve("t", now, 1, 10, hold="h5")
    finally:
        counters.close()
        for hold in ("h1", "h3", "h4"):
            admin.delete(counters._hold_key("t", hold))
        admin.delete(counters._key("t", now))
    assert not ours() - before
    admin.close()


def test_quota_is_never_overshot_by_concurrent_decisions(demo_fleet: Fleet, redis_url: str) -> None:
    # Two replicas, eight threads, one tenant: a read-then-add would let several decisions see the
    # last free unit at once. Holding the share first lets exactly `limit` through.
    counters, engines, limit = _replicas_sharing_redis(demo_fleet, redis_url)
    routed: list[int] = []
    denied: list[int] = []
    _wait_for_a_fresh_window(40)

    def burst(k: int) -> None:
        for i in range(limit // 4):
            ctx = RequestContext(f"c{k}-{i}", "racing", user_tier="free", model="llama-3.1-8b",
                                 estimated_input_tokens=10, expected_output_tokens=5)
            try:
                engines[(k + i) % 2].decide(ctx)
                routed.append(1)
            except QuotaExceeded:
                denied.append(1)

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(routed) + len(denied) == 2 * limit
    assert len(routed) == limit
    usage = counters.read("racing", time.time())
    assert (usage.requests, usage.tokens) == (limit, limit * 15)  # the denied gave their shares back


class _FailingLearner(LeastExpectedTtft):
    def choose(self, ctx: RequestContext, arms: Any) -> Any:
        raise RuntimeError("learner down")


def test_a_request_that_is_not_routed_gives_its_quota_share_back(demo_fleet: Fleet) -> None:
    guard = PolicyGuard(compile_bundle(DEFAULT_BUNDLE))
    engine = _engine(demo_fleet, guard)
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    _wait_for_a_fresh_window(5)
    with pytest.raises(NoCandidate):  # no site in that jurisdiction
        engine.decide(RequestContext("r1", tenant, model="llama-3.1-8b", allowed_jurisdictions=("XX",),
                                     estimated_input_tokens=100))
    store = TelemetryStore({e.endpoint_id: e.node_id for e in demo_fleet.endpoints})
    failing = DecisionEngine(demo_fleet, store, guard, _FailingLearner())
    with pytest.raises(RuntimeError, match="learner down"):
        failing.decide(RequestContext("r2", tenant, model="llama-3.1-8b", estimated_input_tokens=100))
    with pytest.raises(Unavailable, match="caller went away"):  # a gRPC call cancelled meanwhile
        engine.decide(RequestContext("r2b", tenant, model="llama-3.1-8b", estimated_input_tokens=100),
                      alive=lambda: False)
    assert guard.counters.read(tenant, time.time()) == QuotaUsage(0, 0)
    dry = RequestContext("r-dry", tenant, model="llama-3.1-8b", estimated_input_tokens=100)
    assert guard.peek(dry)["quota"]["requests"] == guard.peek(dry)["quota"]["requests"] == 0  # holds nothing
    engine.decide(RequestContext("r3", tenant, model="llama-3.1-8b", estimated_input_tokens=100,
                                 expected_output_tokens=20))
    assert guard.counters.read(tenant, time.time()) == QuotaUsage(1, 120)


def test_a_reservation_whose_reply_was_lost_is_given_back_once(demo_fleet: Fleet, redis_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis ran the reservation but the reply came too late: the request is UNAVAILABLE and its share
    # is undone (exactly once, even if a give-back is tried again), not left spent.
    import redis

    counters, _, _ = _replicas_sharing_redis(demo_fleet, redis_url)
    real = counters._reserve

    def applied_then_timed_out(**kw: Any) -> Any:
        real(**kw)
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(counters, "_reserve", applied_then_timed_out)
    guard = PolicyGuard(compile_bundle(DEFAULT_BUNDLE), counters=counters)
    engine = _engine(demo_fleet, guard)
    _wait_for_a_fresh_window(5)
    for i in range(3):
        with pytest.raises(Unavailable, match="quota counters unavailable"):
            engine.decide(RequestContext(f"r{i}", "slow-redis", model="llama-3.1-8b", estimated_input_tokens=10))
    assert counters.read("slow-redis", time.time()) == QuotaUsage(0, 0)
    assert guard.prefetch_errors == 3 and guard.release_errors == 0
    monkeypatch.undo()
    state = guard.prefetch(RequestContext("r9", "slow-redis", model="llama-3.1-8b", estimated_input_tokens=10))
    ctx = RequestContext("r9", "slow-redis", model="llama-3.1-8b", estimated_input_tokens=10)
    guard.release(ctx, state)
    guard.release(ctx, state)  # a second give-back of the same hold does nothing
    assert counters.read("slow-redis", time.time()) == QuotaUsage(0, 0)


def test_unreachable_quota_counters_make_the_service_unavailable_not_the_tenant_over_quota(
        demo_fleet: Fleet) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    guard = PolicyGuard(compile_bundle(DEFAULT_BUNDLE), counters=RedisQuotaCounters(f"redis://127.0.0.1:{port}/0"))
    with pytest.raises(Unavailable) as err:
        _engine(demo_fleet, guard).decide(RequestContext("r1", "acme", model="llama-3.1-8b"))
    assert not isinstance(err.value, QuotaExceeded) and guard.prefetch_errors == 1
    # ...and the health check says so, so a balancer stops sending it requests it cannot decide.
    from decision.health_guard import BuiltinHealthGuard
    from decision.service import _quota_store_problem

    problem = _quota_store_problem(guard)
    assert problem is not None and problem.startswith("unreachable: ")
    assert _quota_store_problem(PolicyGuard(compile_bundle(DEFAULT_BUNDLE))) is None  # in-process counters
    assert _quota_store_problem(BuiltinHealthGuard()) is None


def test_in_memory_counters_drop_ended_windows_once_per_window_not_per_request() -> None:
    counters = InMemoryQuotaCounters()
    for t in range(20_000):
        counters.reserve(f"tenant-{t}", 30.0, 1, 1)
    started = time.perf_counter()
    for i in range(2_000):  # 20,000 live entries: a scan per request would take seconds here
        counters.reserve(f"tenant-{i}", 45.0, 1, 1)
    assert time.perf_counter() - started < 0.5
    counters.reserve("late", 125.0, 1, 1)  # two windows on: the old ones are gone
    assert counters.read("tenant-0", 30.0) == QuotaUsage(0, 0) and len(counters._counts) == 1


_QUORUM_RULE = """  - id: other.quorum
    kind: other
    engine: rego
    file: quorum.rego
    description: route only when at least four candidates remain (a rule that compares candidates)
    endpoint_fields: [tier]
    memoise: {memoise}
    tests: [quorum_test.rego]

"""


@pytest.mark.parametrize("memoise", [True, False])
def test_a_rule_that_compares_candidates_sees_them_all_only_when_not_memoised(
        demo_fleet: Fleet, tmp_path: Path, memoise: bool) -> None:
    # A memoised rule is given only the distinct inputs that missed its memo (here: one per tier), so
    # counting candidates undercounts; memoise: false gives it every candidate of the request.
    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    (bundle / "quorum.rego").write_text("package infermesh.quorum\nimport rego.v1\n"
                                        "allow contains c.id if { count(input.candidates) >= 4; "
                                        "some c in input.candidates }\n")
    (bundle / "quorum_test.rego").write_text(
        "package infermesh.quorum_test\nimport rego.v1\nimport data.infermesh.quorum\n"
        'test_three_are_too_few if { count(quorum.allow) == 0 with input as {"candidates": '
        '[{"id": "a"}, {"id": "b"}, {"id": "c"}]} }\n')
    manifest = bundle / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("rules:\n", "rules:\n" + _QUORUM_RULE.format(
        memoise=str(memoise).lower()), 1))
    guard = PolicyGuard(compile_bundle(bundle))
    engine = _engine(demo_fleet, guard)
    ctx = RequestContext("r1", "globex", model_family="llama")
    now = time.time()
    cands = engine.locate(demo_fleet, ctx, now)
    assert len(cands) >= 4 and len({c.endpoint.tier for c in cands}) < 4
    result = guard.evaluate(ctx, cands, {**guard.peek(ctx), "inventory_revision": demo_fleet.revision, "now": now})
    quorum = [v for v in result.verdicts if v.rule_id == "other.quorum"]
    assert len(quorum) == len(cands)
    assert all(v.allow for v in quorum) is (not memoise)


def test_only_candidate_rego_rules_may_opt_out_of_the_memo(tmp_path: Path) -> None:
    bundle, text = bundle_with_rule_field(tmp_path, "gpu_temperature.cel", "memoise: false")
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle)
    (issue,) = exc.value.issues
    assert issue.line == text.splitlines().index("    file: gpu_temperature.cel") + 2
    assert ".memoise: only candidate-scope Rego" in issue.message


def test_the_token_quota_is_trued_up_by_a_late_outcome_and_by_another_replica(demo_fleet: Fleet) -> None:
    # A long generation outlives the outcome timeout, or its outcome reaches another replica (or this
    # one after a restart): its tokens still count against the shared counters.
    from tests.test_engine_outcomes import _Log

    now = [600.0 * 60 + 5]
    counters = InMemoryQuotaCounters()
    log = _Log({})

    def replica() -> DecisionEngine:
        guard = PolicyGuard(compile_bundle(DEFAULT_BUNDLE), counters=counters, clock=lambda: now[0])
        engine = DecisionEngine(demo_fleet, TelemetryStore({e.endpoint_id: e.node_id for e in demo_fleet.endpoints}),
                                guard, LeastExpectedTtft(), clock=lambda: now[0], outcome_timeout_s=10.0, traces=log)
        return engine

    a, b = replica(), replica()
    tenant = f"t-{uuid.uuid4().hex[:6]}"

    def used(decision_id: str) -> Outcome:
        return Outcome(decision_id, OutcomeStatus.OK, ttft_ms=50, latency_ms=9000, input_tokens=100,
                       output_tokens=2000)

    late = a.decide(RequestContext("late", tenant, model="llama-3.1-8b", estimated_input_tokens=100))
    assert a.expire_outcomes(now[0] + 11.0) == 1
    a.report_outcome(used(late.decision_id))
    assert counters.read(tenant, now[0]) == QuotaUsage(1, 2100)
    moved = a.decide(RequestContext("moved", tenant, model="llama-3.1-8b", estimated_input_tokens=100))
    log.records[moved.decision_id] = {"decision_id": moved.decision_id, "status": "routed", "learner": moved.learner,
                                      "request_id": "moved", "tenant": tenant, "user_tier": "standard",
                                      "decided_at_us": int(now[0] * 1e6), "trace": dict(moved.trace), "outcome": None}
    b.report_outcome(used(moved.decision_id))
    assert counters.read(tenant, now[0]) == QuotaUsage(2, 4200)
    masked = a.decide(RequestContext("masked", tenant, model="llama-3.1-8b", estimated_input_tokens=100))
    log.records[masked.decision_id] = {**log.records[moved.decision_id], "decision_id": masked.decision_id,
                                       "tenant": "h:0123456789abcdef01234567"}
    b.report_outcome(used(masked.decision_id))  # the log cannot say whose tokens: the estimate stays charged
    assert counters.read(tenant, now[0]) == QuotaUsage(3, 4300)


def test_the_token_quota_is_trued_up_to_what_the_outcome_says_was_used(demo_fleet: Fleet) -> None:
    # A request that leaves max_tokens out is estimated at its prompt only; charging only the estimate
    # would let it generate without limit against its tenant's token quota.
    now = [600.0 * 60 + 5]  # 5 s into a minute
    counters = InMemoryQuotaCounters()
    guard = PolicyGuard(compile_bundle(DEFAULT_BUNDLE), counters=counters, clock=lambda: now[0])
    engine = _engine(demo_fleet, guard)
    engine.clock = lambda: now[0]
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    no_max = engine.decide(RequestContext("a", tenant, model="llama-3.1-8b", estimated_input_tokens=100))
    assert counters.read(tenant, now[0]) == QuotaUsage(1, 100)  # the estimate, held at decision time
    now[0] += 20
    engine.report_outcome(Outcome(no_max.decision_id, OutcomeStatus.OK, ttft_ms=50, latency_ms=900,
                                  input_tokens=100, output_tokens=3000))
    assert counters.read(tenant, now[0]) == QuotaUsage(1, 3100)
    capped = engine.decide(RequestContext("b", tenant, model="llama-3.1-8b", estimated_input_tokens=100,
                                          expected_output_tokens=4000))
    assert counters.read(tenant, now[0]) == QuotaUsage(2, 7200)
    engine.report_outcome(Outcome(capped.decision_id, OutcomeStatus.OK, ttft_ms=50, latency_ms=400,
                                  input_tokens=100, output_tokens=500))  # max_tokens was an upper bound
    assert counters.read(tenant, now[0]) == QuotaUsage(2, 3700)
    failed = engine.decide(RequestContext("c", tenant, model="llama-3.1-8b", estimated_input_tokens=100))
    engine.report_outcome(Outcome(failed.decision_id, OutcomeStatus.ERROR, error="HTTP 500"))  # usage unknown
    assert counters.read(tenant, now[0]) == QuotaUsage(3, 3800)  # the estimate stays charged


def _counters(kind: str, redis_url: str) -> InMemoryQuotaCounters | RedisQuotaCounters:
    if kind == "memory":
        return InMemoryQuotaCounters()
    counters = RedisQuotaCounters(redis_url, prefix=f"test:{uuid.uuid4().hex[:8]}")
    try:
        counters.read("x", time.time())
    except Exception as exc:
        pytest.skip(f"no Redis at {redis_url}: {exc}")
    return counters


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_outcomes_of_decisions_that_held_no_share_true_nothing_up_after_a_reload(
        demo_fleet: Fleet, tmp_path: Path, redis_url: str, kind: str) -> None:
    # Decided under a policy without a quota rule, settled after a reload added one: trueing up
    # "used - estimate" for shares never taken drove the tenant's counter to -299,940 and let it
    # route 500,000 tokens in a minute under a 300,000 limit.
    counters = _counters(kind, redis_url)
    no_quota = tmp_path / "no-quota"
    shutil.copytree(DEFAULT_BUNDLE, no_quota)
    manifest = no_quota / "manifest.yaml"
    text = manifest.read_text()
    start = text.index("  - id: quota.tenant_rate")
    end = text.index("    tests: [quota_cases.yaml]\n", start) + len("    tests: [quota_cases.yaml]\n")
    manifest.write_text(text[:start] + text[end:])
    _wait_for_a_fresh_window(5)
    engine = _engine(demo_fleet, PolicyGuard(compile_bundle(no_quota), counters=counters))
    # (estimated tokens, used tokens): shares never taken are neither given back nor topped up.
    plan = [(100_000, 20), (100_000, 20), (20, 10_000)]
    decisions = [engine.decide(RequestContext(f"r{i}", "reloaded", user_tier="free", model="llama-3.1-8b",
                                              estimated_input_tokens=est // 2, expected_output_tokens=est // 2))
                 for i, (est, _) in enumerate(plan)]
    engine.set_guard(PolicyGuard(compile_bundle(DEFAULT_BUNDLE), counters=counters))
    for d, (_, used) in zip(decisions, plan, strict=True):
        engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=100, latency_ms=500,
                                      input_tokens=used // 2, output_tokens=used // 2))
    assert counters.read("reloaded", time.time()) == QuotaUsage(0, 0)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_counter_never_goes_below_zero(redis_url: str, kind: str) -> None:
    # Whatever gives back more than was taken (a share held by another policy, a lost update), the
    # tenant gains no credit beyond its limit.
    counters = _counters(kind, redis_url)
    now = time.time()
    counters.add("t", now, 1, 100)
    counters.add("t", now, -3, -500)
    assert counters.read("t", now) == QuotaUsage(0, 0)
    counters.reserve("t", now, 1, 40, "h1")
    counters.give_back("t", now, 1, 40, "h1")
    counters.add("t", now, 0, -1)
    assert counters.read("t", now) == QuotaUsage(0, 0)
