"""Audit storage: event round trip, masking, the writer's idempotency, retention, chain verify."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from audit import database, partitions
from audit.codec import DECISION_COLUMNS, OUTCOME_COLUMNS, decode_json, encode_json, load_trace
from audit.events import DecisionEventV1, OutcomeEventV1
from audit.masking import Masker
from audit.repository import AuditRepository, DecisionFilter
from audit.settings import AuditSettings
from audit.verify import verify
from audit.writer import AuditWriter
from decision.domain import Decision, Outcome, OutcomeStatus, RequestContext
from decision.engine import DecisionEngine, decision_event
from decision.fleet import Fleet
from decision.health_guard import BuiltinHealthGuard
from decision.telemetry import TelemetryStore
from learners.features import FEATURE_NAMES, RouteFeatures
from learners.least_ttft import LeastExpectedTtft
from learners.linucb import LinUCB


def make_engine(fleet: Fleet, sink: Any = None, reader: Any = None) -> DecisionEngine:
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints})
    return DecisionEngine(fleet, store, BuiltinHealthGuard(), LeastExpectedTtft(), audit=sink, traces=reader)


def ctx(i: int, tenant: str = "acme", **kw: Any) -> RequestContext:
    return RequestContext(request_id=f"req-{i}", tenant=tenant, model="llama-3.1-8b", estimated_input_tokens=300,
                          expected_output_tokens=100, labels={"user": f"user-{i}", "team": "blue",
                                                              "prompt": "secret prompt"}, **kw)


def decided_and_reported(db: str, fleet: Fleet, spool: Path, n: int, *,
                         batch_size: int) -> tuple[AuditWriter, list[Decision]]:
    """``n`` decisions, each with an OK outcome (TTFT 40 + i ms), flushed to the log; the writer stays open."""
    w = AuditWriter(db, AuditSettings(spool_dir=spool, batch_size=batch_size))
    engine = make_engine(fleet, w)
    made = []
    for i in range(n):
        d = engine.decide(ctx(i))
        made.append(d)
        engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=40.0 + i, latency_ms=300,
                                      output_tokens=50))
    assert w.flush(20)
    return w, made


@pytest.fixture()
def db(fresh_pg_url: str) -> str:
    database.prepare(fresh_pg_url)
    return fresh_pg_url


def test_decision_event_v1_round_trips_through_postgres(db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    engine = make_engine(demo_fleet)
    ev = decision_event(engine.decide(ctx(1)), "routed", ())
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path))
    w.submit_decision(ev)
    assert w.flush(10)
    w.close()
    repo = AuditRepository(db)
    stored = repo.get_decision(ev["decision_id"])
    repo.close()
    assert stored is not None
    original = DecisionEventV1.from_mapping(ev)
    back = DecisionEventV1.from_mapping(stored)
    assert back == original
    assert stored["trace"]["stages"]["choose"]["chosen"] == ev["endpoint_id"]
    assert DecisionEventV1.from_mapping(original.to_dict()) == original
    o = OutcomeEventV1.from_mapping({"decision_id": "x", "status": "ok", "reported_at": 2.5, "ttft_ms": 3})
    assert OutcomeEventV1.from_mapping(o.to_dict()) == o
    with pytest.raises(ValueError):
        DecisionEventV1.from_mapping({**ev, "event_version": 2})


def test_masking_hashes_or_removes_fields_and_never_stores_prompts(db: str, demo_fleet: Fleet,
                                                                   tmp_path: Path) -> None:
    settings = AuditSettings(spool_dir=tmp_path, mask_fields=["request_id", "labels.user"], mask_key="k")
    w = AuditWriter(db, settings)
    engine = make_engine(demo_fleet, w)
    d = engine.decide(ctx(7))
    assert w.flush(10)
    w.close()
    with psycopg.connect(db) as conn:
        raw = conn.execute("SELECT request_id, trace_z FROM decision_events").fetchone()
    assert raw is not None
    assert raw[0] == Masker([], key="k").token("req-7")
    repo = AuditRepository(db)
    stored = repo.get_decision(d.decision_id)
    repo.close()
    assert stored is not None
    labels = stored["trace"]["request"]["labels"]
    assert labels["team"] == "blue" and labels["user"].startswith("h:") and "prompt" not in labels
    assert "user-7" not in str(stored) and "secret prompt" not in str(stored) and "req-7" not in str(stored)
    removed = Masker(["labels.*", "session_id"], mode="remove").mask_request(
        {"session_id": "s", "labels": {"a": "1"}, "tenant": "t"})
    assert removed == {"labels": {}, "tenant": "t"}


def test_writer_is_idempotent_and_chain_detects_an_altered_row(db: str, demo_fleet: Fleet,
                                                              tmp_path: Path) -> None:
    w, made = decided_and_reported(db, demo_fleet, tmp_path, 40, batch_size=7)
    events = [decision_event(d, "routed", ()) for d in made]
    for ev in events[:10]:  # submitted again (a resend after a commit in doubt): chained anew
        w.submit_decision(ev)
    assert w.flush(20)
    w.close()
    assert w.decision_duplicates == 10 and w.duplicates_skipped == 0 and w.invalid == 0
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT decision_id) FROM decision_events").fetchone() == (40, 40)
        assert conn.execute("SELECT count(*) FROM decision_duplicates").fetchone() == (10,)
        assert conn.execute("SELECT count(*) FROM outcomes").fetchone() == (40,)
        report = verify(db)
        assert report.ok and report.rows == 40 and report.decision_duplicates == 10
        victim = events[17]["decision_id"]
        conn.execute("UPDATE decision_events SET endpoint_id = 'elsewhere' WHERE decision_id = %s", (victim,))
    report = verify(db)
    assert not report.ok and report.broken is not None
    assert report.broken.decision_id == victim and "altered" in report.broken.problem


def _replicas_sharing_a_log(db: str, fleet: Fleet, spool: Path) -> tuple[
        AuditWriter, AuditRepository, list[float], Callable[[], tuple[DecisionEngine, LinUCB]]]:
    """One audit writer and reader shared by replicas, a clock they share, and how to start one (LinUCB,
    outcome timeout 10 s)."""
    clock = [time.time()]
    w = AuditWriter(db, AuditSettings(spool_dir=spool))
    repo = AuditRepository(db)

    def replica() -> tuple[DecisionEngine, LinUCB]:
        learner = LinUCB(len(FEATURE_NAMES), seed=1)
        store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints}, clock=lambda: clock[0])
        return DecisionEngine(fleet, store, BuiltinHealthGuard(), learner, features=RouteFeatures(), audit=w,
                              traces=repo, outcome_timeout_s=10.0, clock=lambda: clock[0]), learner

    return w, repo, clock, replica


def test_a_timeout_is_logged_so_a_restore_replays_it_and_a_late_outcome_elsewhere_is_not_learnt_again(
        db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    from learners.store import LearnerStore
    from learners.sync import LearnerSync

    w, repo, clock, replica = _replicas_sharing_a_log(db, demo_fleet, tmp_path)

    a, learner_a = replica()
    d = a.decide(ctx(1))
    clock[0] += 11.0
    assert a.expire_outcomes() == 1 and learner_a.n_updates == 1
    assert w.flush(10)
    # A restarted single instance replays the timeout from the log, as it does a reported outcome.
    restored = LinUCB(len(FEATURE_NAMES), seed=1)
    assert LearnerSync(restored, LearnerStore(db), FEATURE_NAMES).restore().replayed == 1
    np.testing.assert_allclose(restored.stats.A, learner_a.stats.A)
    # The real outcome, late, reaches another replica: kept in the log after the timeout, not learnt there.
    b, learner_b = replica()
    late = b.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0))
    assert (late.accepted, late.duplicate, late.reward) == (True, False, None) and learner_b.n_updates == 0
    assert w.flush(10)
    stored = repo.get_decision(d.decision_id)
    assert stored is not None and stored["outcome"]["status"] == "timeout"
    assert [o["status"] for o in stored["conflicting_outcomes"]] == ["ok"]
    assert b.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0)).duplicate
    c, learner_c = replica()  # the client's retry reaches a third replica: recorded once already
    assert c.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0)).duplicate
    assert w.flush(10)
    stored = repo.get_decision(d.decision_id)
    assert stored is not None and len(stored["conflicting_outcomes"]) == 1 and learner_c.n_updates == 0
    assert verify(db).ok
    w.close()
    repo.close()


def test_verify_detects_a_deleted_row(db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path))
    engine = make_engine(demo_fleet, w)
    ids = [engine.decide(ctx(i)).decision_id for i in range(5)]
    assert w.flush(10)
    w.close()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM decision_events WHERE decision_id = %s", (ids[2],))
    report = verify(db)
    assert report.broken is not None and "missing" in report.broken.problem


def test_outcomes_are_chained_and_verify_detects_an_altered_or_deleted_outcome(db: str, demo_fleet: Fleet,
                                                                               tmp_path: Path) -> None:
    w, made = decided_and_reported(db, demo_fleet, tmp_path, 12, batch_size=4)
    w.close()
    ids = [d.decision_id for d in made]
    report = verify(db)
    assert report.ok and report.outcome_rows == 12 and report.outcome_chains == 1, str(report.broken)
    with psycopg.connect(db, autocommit=True) as conn:
        # An outcome stored before outcomes were chained is counted, not failed.
        conn.execute("INSERT INTO outcomes (decision_id, status, ttft_ms, latency_ms, input_tokens, output_tokens, "
                     "reported_at, event_version) VALUES ('legacy', 'ok', 1, 2, 3, 4, now() - interval '2 years', 1)")
        assert verify(db).ok and verify(db).unchained_outcomes == 1
        # A faster TTFT written over the evidence...
        conn.execute("UPDATE outcomes SET ttft_ms = 1 WHERE decision_id = %s", (ids[5],))
        report = verify(db)
        assert report.broken is not None and report.broken.table == "outcomes"
        assert report.broken.decision_id == ids[5] and "altered" in report.broken.problem
        assert report.rows == 12  # the decisions verified first
        conn.execute("UPDATE outcomes SET ttft_ms = 45 WHERE decision_id = %s", (ids[5],))  # as written
        assert verify(db).ok
        # ...or an error outcome removed.
        conn.execute("DELETE FROM outcomes WHERE decision_id = %s", (ids[8],))
    report = verify(db)
    assert report.broken is not None and report.broken.table == "outcomes" and "missing" in report.broken.problem
    assert "outcome of decision" in str(report.broken)


@pytest.mark.parametrize(("table", "into", "columns"), [("decision_events", "decision_duplicates", DECISION_COLUMNS),
                                                       ("outcomes", "outcome_conflicts", OUTCOME_COLUMNS)])
def test_verify_detects_a_row_moved_into_the_table_of_repeats(db: str, demo_fleet: Fleet, tmp_path: Path,
                                                               table: str, into: str, columns: Sequence[str]) -> None:
    # A repeat keeps its place in its chain; moved there, a decision (or its outcome) would vanish
    # from every auditor's read while every hash and link still checks out.
    w, made = decided_and_reported(db, demo_fleet, tmp_path, 6, batch_size=6)
    w.close()
    victim = made[2].decision_id
    cols = ", ".join(columns)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {into} ({cols}) SELECT {cols} FROM {table} WHERE decision_id = %s", (victim,))
        conn.execute(f"DELETE FROM {table} WHERE decision_id = %s", (victim,))
    report = verify(db)
    assert report.broken is not None and report.broken.decision_id == victim, str(report.broken)
    assert report.broken.table == table and "moved here" in report.broken.problem


def test_an_outcome_reported_again_after_a_restart_is_a_duplicate_and_keeps_the_chain_whole(
        db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "a"))
    before = make_engine(demo_fleet, w)
    done, open_ = before.decide(ctx(1)), before.decide(ctx(2))
    first = before.report_outcome(Outcome(done.decision_id, OutcomeStatus.OK, ttft_ms=80, latency_ms=500))
    assert w.flush(10)
    w.close()
    # The service restarts: a new engine (nothing pending) and a new writer chain, same log.
    repo = AuditRepository(db)
    w2 = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "b"))
    after = make_engine(demo_fleet, w2, repo)
    again = after.report_outcome(Outcome(done.decision_id, OutcomeStatus.ERROR, ttft_ms=1, latency_ms=2))
    late = after.report_outcome(Outcome(open_.decision_id, OutcomeStatus.OK, ttft_ms=70, latency_ms=400))
    assert w2.flush(10)
    w2.close()
    repo.close()
    assert again.duplicate and again.reward == first.reward and not late.duplicate
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT decision_id, status, ttft_ms FROM outcomes ORDER BY ttft_ms").fetchall()
    assert rows == [(open_.decision_id, "ok", 70.0), (done.decision_id, "ok", 80.0)]
    report = verify(db)
    assert report.ok and report.outcome_rows == 2 and report.outcome_chains == 2, str(report.broken)


def test_a_second_different_outcome_is_kept_in_its_chain_not_dropped(db: str, demo_fleet: Fleet,
                                                                     tmp_path: Path) -> None:
    from audit.why import render_text
    from decision.engine import outcome_event

    w, made = decided_and_reported(db, demo_fleet, tmp_path / "a", 2, batch_size=4)
    w.close()
    # Another replica accepted different outcomes for the same decisions (it had them neither
    # pending nor, yet, in the log), and its writer replays that batch after a reconnect.
    other = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "b"), start=False)
    late = [outcome_event(Outcome(d.decision_id, OutcomeStatus.ERROR, ttft_ms=0, latency_ms=9000, error="reset"),
                          None, d.decided_at + 5) for d in made]
    prepared = other._prepare([("o", ev) for ev in late])
    other._write(prepared, staged=False)
    other._write(prepared, staged=True)  # the same links again, as a replayed spool segment carries them
    other.close()
    first = made[0].decision_id
    with psycopg.connect(db) as conn:
        kept = conn.execute("SELECT status FROM outcomes WHERE decision_id = %s", (first,)).fetchall()
        extra = conn.execute("SELECT status, error FROM outcome_conflicts WHERE decision_id = %s", (first,)).fetchall()
    assert kept == [("ok",)] and extra == [("error", "reset")]
    assert other.outcome_conflicts == 2
    report = verify(db)
    assert report.ok and report.outcome_rows == 4 and report.outcome_conflicts == 2, str(report.broken)
    repo = AuditRepository(db)
    stored = repo.get_decision(first)
    repo.close()
    assert stored is not None and stored["outcome"]["status"] == "ok"
    assert [o["error"] for o in stored["conflicting_outcomes"]] == ["reset"]
    assert "also reported (kept, not used): error" in render_text(stored)
    # Lists, exports and stats count them too.
    repo = AuditRepository(db)
    listed, _ = repo.list_decisions(filters=DecisionFilter())
    exported = list(repo.iter_decisions(filters=DecisionFilter()))
    stats = repo.stats(filters=DecisionFilter())
    repo.close()
    assert {r["decision_id"]: r["conflicting_outcomes"] for r in listed} == {d.decision_id: 1 for d in made}
    assert [r["conflicting_outcomes"] for r in exported] == [1, 1]
    assert stats["decisions_with_conflicting_outcomes"] == 2
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM outcome_conflicts WHERE decision_id = %s", (first,))
    report = verify(db)
    assert report.broken is not None and "missing" in report.broken.problem


def test_spooled_outcome_rows_of_the_old_shape_are_stored_unchained(db: str, tmp_path: Path) -> None:
    from audit.codec import LEGACY_OUTCOME_WIDTH

    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path))
    old = ["d-old", "ok", 10.0, 20.0, 1, 2, "", None, 1_700_000_000_000_000, 1]
    assert len(old) == LEGACY_OUTCOME_WIDTH
    w._write({"d": [], "o": [old]}, staged=False)  # as a replay of a spool segment written before 0004
    w.close()
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT ttft_ms, chain_id, hash FROM outcomes WHERE decision_id = 'd-old'").fetchone()
    assert row == (10.0, None, None)
    assert verify(db).ok and verify(db).unchained_outcomes == 1


def test_verify_fails_an_outcome_whose_link_was_stripped_after_chaining_began(db: str, demo_fleet: Fleet,
                                                                              tmp_path: Path) -> None:
    """Stripping an outcome's chain columns must not turn an altered row into an 'older outcome'."""
    w, _ = decided_and_reported(db, demo_fleet, tmp_path, 3, batch_size=4)
    w.close()
    assert verify(db).ok and verify(db).unchained_outcomes == 0
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute("SELECT decision_id FROM outcomes ORDER BY reported_at DESC, seq DESC LIMIT 1").fetchone()
        assert row is not None
        conn.execute("UPDATE outcomes SET status = 'error', ttft_ms = 99999, hash = NULL, prev_hash = NULL, "
                     "chain_id = NULL, seq = NULL WHERE decision_id = %s", (row[0],))
    report = verify(db)
    assert not report.ok and report.broken is not None
    assert report.broken.table == "outcomes" and report.broken.decision_id == row[0]
    assert "carries no chain link, yet outcomes were chained before it was reported" in str(report.broken)


def test_the_service_applies_its_retention_setting_one_replica_at_a_time(db: str) -> None:
    """``audit.retention_days`` is the service's to apply (audit.upkeep), not only the CLI's."""
    from audit.upkeep import UPKEEP_LOCK, Upkeep, run_upkeep

    today = dt.datetime.now(dt.UTC).date()
    old = [today - dt.timedelta(days=n) for n in (200, 95)]
    with psycopg.connect(db, autocommit=True) as conn:
        for day in old:
            partitions.ensure_partition(conn, day=day)
        # Another replica doing its round holds the lock: this one skips, changing nothing.
        conn.execute("SELECT pg_advisory_lock(%s)", (UPKEEP_LOCK,))
        assert run_upkeep(db, retention_days=90, days_ahead=3) is None
        conn.execute("SELECT pg_advisory_unlock(%s)", (UPKEEP_LOCK,))
        assert set(old) <= set(partitions.list_partitions(conn))
    assert run_upkeep(db, retention_days=0, days_ahead=3) == []  # 0 keeps everything
    upkeep = Upkeep(db, retention_days=90, days_ahead=5, interval_s=3600).start()
    deadline = time.monotonic() + 10
    while upkeep.rounds == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    upkeep.stop()
    assert upkeep.rounds == 1 and upkeep.failures == 0
    with psycopg.connect(db) as conn:
        days = partitions.list_partitions(conn)
        assert partitions.retired_before(conn) == today - dt.timedelta(days=89)
    assert not set(old) & set(days) and today + dt.timedelta(days=5) in days


@pytest.mark.parametrize(("field", "value"), [("flush_interval_s", float("inf")), ("retry_interval_s", float("nan")),
                                              ("partitions_ahead_days", 10_000_000), ("retention_days", 10**7),
                                              ("drain_timeout_s", float("inf"))])
def test_audit_settings_a_service_cannot_use_are_refused_at_load(field: str, value: float) -> None:
    """An infinite flush interval passed, then killed the writer thread after "serving" was printed."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        AuditSettings.model_validate({field: value})


def test_retention_drops_old_day_partitions_only(db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    engine = make_engine(demo_fleet)
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path))
    now = dt.datetime.now(dt.UTC)
    for age_days in (0, 1, 10, 40):
        ev = decision_event(engine.decide(ctx(age_days)), "routed", ())
        ev["decided_at"] = (now - dt.timedelta(days=age_days)).timestamp()
        w.submit_decision(ev)
    assert w.flush(10)
    w.close()
    with psycopg.connect(db, autocommit=True) as conn:
        dropped = partitions.apply_retention(conn, retention_days=7, today=now.date())
        left = conn.execute("SELECT count(*) FROM decision_events").fetchone()
        days = partitions.list_partitions(conn)
    assert sorted(dropped) == sorted({(now - dt.timedelta(days=a)).date() for a in (10, 40)})
    assert left == (2,)
    assert min(days) >= now.date() - dt.timedelta(days=6)
    assert verify(db).ok


def test_a_spool_replayed_after_retention_does_not_recreate_the_days_it_dropped(
        db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    # Decisions spooled while PostgreSQL was away, replayed after retention dropped their day: writing
    # them would recreate the day with half a chain (verify fails) and undo the retention.
    engine = make_engine(demo_fleet)
    now = dt.datetime.now(dt.UTC)
    old_day = (now - dt.timedelta(days=10)).date()
    down = AuditWriter("postgresql://postgres@127.0.0.1:1/none", AuditSettings(spool_dir=tmp_path / "spool"))
    for i, age_days in enumerate((10, 10, 0)):
        ev = decision_event(engine.decide(ctx(i)), "routed", ())
        ev["decided_at"] = (now - dt.timedelta(days=age_days)).timestamp()
        down.submit_decision(ev)
    down.close()
    assert down.spool_bytes > 0 and down.rows_written == 0
    up = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "other"))
    up.submit_decision({**decision_event(engine.decide(ctx(9)), "routed", ()),
                        "decided_at": (now - dt.timedelta(days=10)).timestamp()})
    assert up.flush(10)  # the old day exists and holds a row: retention has something to drop
    up.close()
    with psycopg.connect(db, autocommit=True) as conn:
        assert partitions.apply_retention(conn, retention_days=7, today=now.date()) == [old_day]
    late = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool"))
    assert late.flush(20)
    late.close()
    assert (late.rows_written, late.expired_rows, late.metrics()["expired_rows"]) == (1, 2, 2.0)
    with psycopg.connect(db) as conn:
        assert old_day not in partitions.list_partitions(conn)
        assert conn.execute("SELECT count(*) FROM decision_events").fetchone() == (1,)
        assert partitions.retired_before(conn) == now.date() - dt.timedelta(days=6)
    assert verify(db).ok


def test_retention_of_less_than_a_day_is_refused_before_anything_is_dropped(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(demo_fleet)
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path))
    w.submit_decision(decision_event(engine.decide(ctx(0)), "routed", ()))
    assert w.flush(10)
    w.close()
    for days in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exit_:
            _cli(monkeypatch, capsys, db, "retention", "--days", days)
        assert exit_.value.code == 2 and "--days" in capsys.readouterr().err
    with psycopg.connect(db, autocommit=True) as conn:
        with pytest.raises(ValueError, match="retention_days must be >= 1"):
            partitions.apply_retention(conn, retention_days=0)
        assert conn.execute("SELECT count(*) FROM decision_events").fetchone() == (1,)


def test_why_text_shows_every_denial_whole() -> None:
    """The table's columns are cut at 60 characters: a DENY after three allows, or a long reason, was lost."""
    from audit.why import render_text

    allows = [{"endpoint_id": "ep-hot", "rule_id": f"rule.{n}", "allow": True} for n in ("a", "b", "c")]
    long_reason = "GPU at 96 C, over the 85 C limit for this tier (the rule's params.max_c)"
    trace = {"stages": {"locate": {"candidates": ["ep-hot", "ep-ok"]},
                        "guard": {"verdicts": [*allows, {"endpoint_id": "ep-hot", "rule_id": "safety.gpu_temperature",
                                                         "allow": False, "reason": long_reason},
                                               {"endpoint_id": "ep-ok", "rule_id": "rule.a", "allow": True}]},
                        "choose": {"chosen": "ep-ok", "fallbacks": []}}}
    text = render_text({"decision_id": "d1", "decided_at": "2026-11-28T00:00:00+00:00", "status": "routed",
                        "endpoint_id": "ep-ok", "trace": trace})
    hot = next(line for line in text.splitlines() if line.strip().startswith("ep-hot"))
    assert "DENY safety.gpu_temperature" in hot
    assert f"ep-hot: safety.gpu_temperature: {long_reason}" in text
    assert "allow (1 rule)" in next(line for line in text.splitlines() if line.strip().startswith("ep-ok"))


def test_audit_cli_bad_arguments_are_messages_not_tracebacks(db: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for limit in ("-5", "0"):  # PostgreSQL refused LIMIT -5 with a traceback
        with pytest.raises(SystemExit) as exit_:
            _cli(monkeypatch, capsys, db, "query", "--limit", limit)
        assert exit_.value.code == 2 and "--limit" in capsys.readouterr().err
    code, _, err = _cli(monkeypatch, capsys, db, "query", "--cursor", "garbage")
    assert code == 2 and "--cursor 'garbage'" in err
    nowhere = tmp_path / "no" / "such" / "dir" / "x"
    for args in (("checkpoint", "-o", str(nowhere)), ("export", "--output", str(nowhere))):
        code, _, err = _cli(monkeypatch, capsys, db, *args)
        assert code == 2 and f"{nowhere}: No such file or directory" in err
    # An empty range verified nothing and said "ok": an auditor would read that as a clean bill.
    code, out, err = _cli(monkeypatch, capsys, db, "verify", "--from", "2030-01-01", "--to", "2020-01-01")
    assert code == 2 and "after --to" in err and "ok" not in out
    code, _, err = _cli(monkeypatch, capsys, db, "why", "f0000000-0000-7000-8000-000000000000")
    assert code == 1 and "no decision" in err  # an id stamped past datetime's range: OverflowError before
    for folder in (".", "/", ""):  # with_name raised ValueError on a path with no name
        code, _, err = _cli(monkeypatch, capsys, db, "export", "--output", folder)
        assert code == 2 and "is a directory; name the file to write" in err, (folder, err)
    with pytest.raises(SystemExit) as exit_:  # a cutoff before year 1 overflowed a date
        _cli(monkeypatch, capsys, db, "retention", "--days", "1000000")
    assert exit_.value.code == 2 and "must be <= 36500" in capsys.readouterr().err


def test_spool_full_fail_closed_refuses_and_fail_open_counts(demo_fleet: Fleet, tmp_path: Path) -> None:
    from decision.errors import Unavailable

    dead = "postgresql://nobody@127.0.0.1:1/none"
    closed = AuditWriter(dead, AuditSettings(spool_dir=tmp_path / "a", spool_max_bytes=1024, flush_interval_s=0.01))
    engine = make_engine(demo_fleet, closed)
    with pytest.raises(Unavailable):
        for i in range(200):
            engine.decide(ctx(i))
            closed.flush(0.05)
    assert closed.refused >= 1 and closed.spool_bytes >= 1024
    closed.close()
    opened = AuditWriter(dead, AuditSettings(spool_dir=tmp_path / "b", spool_max_bytes=1024, flush_interval_s=0.01,
                                             on_spool_full="fail_open"))
    engine = make_engine(demo_fleet, opened)
    for i in range(100):
        engine.decide(ctx(i))
        opened.flush(0.05)
    assert opened.dropped >= 1 and opened.refused == 0
    assert opened.metrics()["dropped"] == opened.dropped
    opened.close()


def test_filters_and_cursor_pagination(db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path))
    engine = make_engine(demo_fleet, w)
    for i in range(23):
        engine.decide(ctx(i, tenant="acme" if i % 2 else "globex"))
    assert w.flush(10)
    w.close()
    repo = AuditRepository(db)
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = repo.list_decisions(filters=DecisionFilter(tenant="acme"), cursor=cursor, limit=5)
        seen += [r["decision_id"] for r in page]
        assert all(r["tenant"] == "acme" for r in page)
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 11
    assert repo.stats(filters=DecisionFilter())["total"] == 23
    repo.close()


def test_concurrent_migrations_serialise_on_an_advisory_lock(fresh_pg_url: str) -> None:
    """Replicas starting together on a fresh database must not race each other's DDL."""
    import threading

    from audit.migrate import upgrade

    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(fresh_pg_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    import psycopg
    from alembic.script import ScriptDirectory

    from audit.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(fresh_pg_url)).get_current_head()
    with psycopg.connect(fresh_pg_url) as conn:
        row = conn.execute("select version_num from alembic_version").fetchone()
    assert row is not None and row[0] == head


@pytest.mark.parametrize(("codec", "prefix"), [("lz4", b"\x04\x22\x4d\x18"), ("json", b"\x93\xafinfermesh-trace"),
                                               ("zlib", b"x")])
def test_traces_are_stored_in_the_configured_codec_and_every_form_reads_back(
        db: str, demo_fleet: Fleet, tmp_path: Path, codec: str, prefix: bytes) -> None:
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path, trace_codec=codec,  # type: ignore[arg-type]
                                      mask_fields=["labels.user"]))
    engine = make_engine(demo_fleet, w)
    d = engine.decide(ctx(11))
    assert w.flush(10)
    w.close()
    with psycopg.connect(db) as conn:
        raw = conn.execute("SELECT trace_z FROM decision_events WHERE decision_id = %s", (d.decision_id,)).fetchone()
        compression = conn.execute("SELECT attcompression FROM pg_attribute WHERE attrelid = "
                                   "'decision_events'::regclass AND attname = 'trace_z'").fetchone()
    assert raw is not None and bytes(raw[0]).startswith(prefix)
    assert compression is not None and compression[0] == "l"  # lz4 for uncompressed traces, set by migration 0003
    repo = AuditRepository(db)
    stored = repo.get_decision(d.decision_id)
    repo.close()
    assert stored is not None and stored["trace"]["stages"]["choose"]["chosen"] == d.route.endpoint_id
    # Stored as parts and assembled on read: the trace the service showed, its request masked.
    shown = decode_json(encode_json(dict(d.trace)))
    read = stored["trace"]
    assert {k: v for k, v in read.items() if k != "request"} == {k: v for k, v in shown.items() if k != "request"}
    assert read["request"]["labels"] == {"user": Masker(["labels.user"]).token("user-11"), "team": "blue"}


def test_a_trace_that_arrives_built_is_stored_as_masked_json_and_reads_back(db: str, tmp_path: Path) -> None:
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path, trace_codec="json", mask_fields=["session_id"]))
    w.submit_decision({"decision_id": "built-1", "decided_at": 1.7e9, "status": "denied", "request_id": "r",
                       "tenant": "t", "deny_rules": ["residency"],
                       "trace": {"version": 1, "request": {"session_id": "s1", "prompt": "secret"}, "stages": {}}})
    assert w.flush(10)
    w.close()
    with psycopg.connect(db) as conn:
        raw = conn.execute("SELECT trace_z FROM decision_events WHERE decision_id = 'built-1'").fetchone()
    assert raw is not None and bytes(raw[0]).startswith(b"{")
    trace = load_trace(bytes(raw[0]))
    assert trace["request"] == {"session_id": Masker(["session_id"]).token("s1")}
    assert verify(db).ok


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], db: str,
         *args: str) -> tuple[int, str, str]:
    from decision.cli import main

    monkeypatch.setenv("INFERMESH_DATABASE_URL", db)
    code = main(["audit", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _checkpointed(db: str, fleet: Fleet, tmp_path: Path, n: int, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> tuple[list[Decision], Path]:
    """``n`` decisions with outcomes in the log, and a checkpoint of their chains taken by the CLI."""
    w, made = decided_and_reported(db, fleet, tmp_path / "a", n, batch_size=4)
    w.close()
    cp = tmp_path / "heads.jsonl"
    code, _, err = _cli(monkeypatch, capsys, db, "checkpoint", "-o", str(cp))
    assert code == 0 and "2 chain heads written" in err, err
    return made, cp


def test_a_checkpoint_catches_a_deleted_tail_and_a_rewritten_chain_that_verify_alone_passes(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from audit.codec import OUTCOME_COLUMNS, OUTCOME_HASHED_COLUMNS, link_hash, values_from_row

    made, cp = _checkpointed(db, demo_fleet, tmp_path, 12, monkeypatch, capsys)
    heads = [json.loads(line) for line in cp.read_text().splitlines() if not line.startswith("#")]
    assert sorted((h["table"], h["seq"]) for h in heads) == [("decision_events", 12), ("outcomes", 12)]
    # A head on a day retention has since dropped is retired, not failed.
    old = {**heads[0], "day": "2001-01-01"}
    cp.write_text(cp.read_text() + json.dumps(old) + "\n")
    with psycopg.connect(db, autocommit=True) as conn:
        partitions.drop_before(conn, cutoff=dt.date(2001, 1, 2))  # a retention run, recorded

    # The log grows after the checkpoint (a new writer, a new chain): still whole.
    w2, _ = decided_and_reported(db, demo_fleet, tmp_path / "b", 3, batch_size=4)
    w2.close()
    code, out, _ = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
    assert code == 0, out
    assert "2 of the checkpoint's chain heads found as recorded; 1 on days retention has dropped" in out

    with psycopg.connect(db, autocommit=True) as conn:
        # Rewritten from the altered row on, every hash recomputed: the chain itself verifies...
        chain = heads[1]["chain_id"]
        rows = conn.execute(f"SELECT {', '.join(OUTCOME_COLUMNS)} FROM outcomes WHERE chain_id = %s ORDER BY seq",
                            (chain,)).fetchall()
        prev = rows[4][OUTCOME_COLUMNS.index("prev_hash")]
        for row in rows[4:]:
            values = dict(zip(OUTCOME_COLUMNS, row, strict=True))
            if values["seq"] == 5:
                values["ttft_ms"] = 1.0  # a faster TTFT than the route delivered
            digest = link_hash(prev, values_from_row(values, OUTCOME_HASHED_COLUMNS))
            conn.execute("UPDATE outcomes SET ttft_ms = %s, prev_hash = %s, hash = %s WHERE chain_id = %s AND seq = %s",
                         (values["ttft_ms"], prev, digest, chain, values["seq"]))
            prev = digest
        assert verify(db).ok
        code, out, _ = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
        assert code == 1 and "seq 12: hash differs from the checkpoint's (the chain was rewritten)" in out
        # ...and so does a chain whose newest decisions were deleted.
        conn.execute("DELETE FROM decision_events WHERE chain_id = %s AND seq > 9", (heads[0]["chain_id"],))
        conn.execute("DELETE FROM outcomes WHERE chain_id = %s", (chain,))
    assert verify(db).ok
    code, out, _ = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
    assert code == 1 and "decision_events" in out and "seq 12: missing" in out
    assert "FAILED: 0 of the checkpoint's chain heads found as recorded" in out
    assert made  # the decisions were real


def test_a_bad_checkpoint_file_is_named_with_its_line_and_field(db: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cp = tmp_path / "heads.jsonl"
    good = {"table": "decision_events", "day": "2026-11-27", "chain_id": "c", "seq": 3, "hash": "a" * 64}
    cp.write_text("# a comment\n" + json.dumps(good) + "\n" + json.dumps({**good, "seq": 0}) + "\n")
    code, _, err = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
    assert code == 2 and err.strip() == f"{cp}:3: seq: must be a positive integer below 2^63, not 0"
    cp.write_text("{not json\n")
    code, _, err = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
    assert code == 2 and err.startswith(f"{cp}:1: not JSON")
    # What the database would refuse is named here, before any query (not "the audit database failed").
    for bad, field in (({"seq": 2**64}, "seq"), ({"chain_id": "c\u0000x"}, "chain_id"), ({"hash": "Z" * 64}, "hash")):
        cp.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        code, out, err = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
        assert code == 2 and err.startswith(f"{cp}:2: {field}: ") and not out, err
    cp.write_bytes(json.dumps(good).encode() + b"\n# caf\xe9\n")
    code, _, err = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
    assert code == 2 and err.strip() == f"{cp}:2: not UTF-8 text"
    code, _, err = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "No such file" in err


def test_an_outcome_reported_to_another_replica_is_learnt_there_once(db: str, demo_fleet: Fleet,
                                                                     tmp_path: Path) -> None:
    # Two replicas sharing one audit log, a client whose outcome reaches the one that did not decide.
    w, repo, clock, replica = _replicas_sharing_a_log(db, demo_fleet, tmp_path)

    (a, learner_a), (b, learner_b) = replica(), replica()
    d = a.decide(ctx(1))
    assert w.flush(10)
    got = b.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=120.0))
    assert got.reward is not None and not got.duplicate and learner_b.n_updates == 1
    assert w.flush(10)
    assert repo.reported_among([d.decision_id, "no-such-decision"]) == {d.decision_id}
    stored = repo.get_decision(d.decision_id)
    assert stored is not None and stored["outcome"]["reward"] == pytest.approx(got.reward)  # a restore replays it
    clock[0] += 11.0
    assert a.expire_outcomes() == 1 and learner_a.n_updates == 0  # not also learnt as a timeout where it was made
    w.close()
    repo.close()


@pytest.mark.parametrize("by_retention", [True, False])
def test_checkpoint_heads_on_days_gone_are_retired_only_when_a_retention_run_dropped_them(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], by_retention: bool) -> None:
    _, cp = _checkpointed(db, demo_fleet, tmp_path, 3, monkeypatch, capsys)
    with psycopg.connect(db, autocommit=True) as conn:
        if by_retention:  # a year on, with 7 days kept: nothing is left
            later = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=365)
            assert partitions.apply_retention(conn, retention_days=7, today=later)
        else:  # the day and its outcomes deleted by hand
            for day in partitions.list_partitions(conn):
                conn.execute(f"DROP TABLE {partitions.partition_name(day)}")
            conn.execute("DELETE FROM outcomes")
        assert not partitions.list_partitions(conn)
    code, out, _ = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
    if by_retention:
        assert code == 0, out
        assert "0 of the checkpoint's chain heads found as recorded; 2 on days retention has dropped" in out
    else:
        assert code != 0 and "no retention run is recorded" in out, out


def test_a_retention_record_cannot_retire_the_heads_of_a_day_still_held(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Whoever can delete a chain's tail can also insert a retention row with a cutoff of tomorrow."""
    _, cp = _checkpointed(db, demo_fleet, tmp_path, 3, monkeypatch, capsys)
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM decision_events WHERE seq = (SELECT max(seq) FROM decision_events)")
        conn.execute("INSERT INTO audit_retention (cutoff, dropped_days) VALUES (%s, %s)", (tomorrow, []))
        assert partitions.list_partitions(conn)  # today's partition is still there
    code, out, _ = _cli(monkeypatch, capsys, db, "verify", "--checkpoint", str(cp))
    assert code != 0 and "rows at or after it were deleted after the checkpoint" in out, out


def test_cli_day_bounds_take_whole_days_like_verify_and_bad_outputs_are_one_line(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    w, made = decided_and_reported(db, demo_fleet, tmp_path / "a", 3, batch_size=3)
    w.close()
    with psycopg.connect(db) as conn:
        (day,) = conn.execute("SELECT DISTINCT decided_at::date FROM decision_events").fetchone()  # type: ignore[misc]
    d = day.isoformat()
    code, out, _ = _cli(monkeypatch, capsys, db, "export", "--from", d, "--to", d)
    assert code == 0 and len(out.splitlines()) == 3  # the whole of day d, as `verify --from d --to d` checks
    code, out, _ = _cli(monkeypatch, capsys, db, "query", "--to", d)
    assert code == 0 and all(m.decision_id in out for m in made)
    before = (day - dt.timedelta(days=1)).isoformat()
    code, out, _ = _cli(monkeypatch, capsys, db, "export", "--to", before)
    assert code == 0 and out == ""
    code, out, err = _cli(monkeypatch, capsys, db, "verify", "--to", "9999-12-31")
    assert code == 0 and "Traceback" not in err, err
    code, out, _ = _cli(monkeypatch, capsys, db, "export", "--to", "9999-12-31")
    assert code == 0 and len(out.splitlines()) == 3
    code, _, err = _cli(monkeypatch, capsys, db, "export", "-o", str(tmp_path))
    assert code == 2 and err == f"{tmp_path}: is a directory; name the file to write\n"
    assert not (tmp_path.parent / f"{tmp_path.name}.partial").exists()


class _CutShort:
    """A connection on which the first statement starting with ``at`` fails as a lost connection does
    (a retention run killed there): what ran before it stays done."""

    def __init__(self, conn: psycopg.Connection[Any], at: str) -> None:
        self._conn = conn
        self._at = at

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        text = query if isinstance(query, str) else query.as_string(self._conn).replace('"', "")
        if text.startswith(self._at):
            raise psycopg.OperationalError(f"server closed the connection unexpectedly (at {self._at})")
        return self._conn.execute(query, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.parametrize("cut_at", ["DROP TABLE", "DELETE FROM outcome_conflicts"])
def test_a_retention_run_cut_short_keeps_its_cutoff_so_a_replay_stays_out_and_the_log_stays_whole(
        db: str, demo_fleet: Fleet, tmp_path: Path, cut_at: str) -> None:
    """The cutoff was recorded last: a run killed after dropping a day left none, and a spool replayed
    later recreated the day with half its chain (``audit verify`` still passed); killed between its
    deletes, it left second outcomes whose chains had lost their first links."""
    from audit.checkpoint import chain_heads, check_heads
    from decision.engine import outcome_event

    engine = make_engine(demo_fleet)
    now = dt.datetime.now(dt.UTC)
    at = (now - dt.timedelta(days=10)).timestamp()
    old_day, cutoff = dt.datetime.fromtimestamp(at, dt.UTC).date(), now.date() - dt.timedelta(days=6)
    down = AuditWriter("postgresql://postgres@127.0.0.1:1/none", AuditSettings(spool_dir=tmp_path / "spool"))
    for i in range(2):
        down.submit_decision({**decision_event(engine.decide(ctx(i)), "routed", ()), "decided_at": at})
    down.close()
    up = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "other"))
    d = engine.decide(ctx(9))
    up.submit_decision({**decision_event(d, "routed", ()), "decided_at": at})
    for status in (OutcomeStatus.OK, OutcomeStatus.ERROR):  # an outcome, and a second one (outcome_conflicts)
        up.submit_outcome(outcome_event(Outcome(d.decision_id, status, ttft_ms=50, latency_ms=300), None, at + 5))
        assert up.flush(10)
    up.close()
    heads = chain_heads(db)

    def old_rows(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
        since = dt.datetime.combine(cutoff, dt.time(), tzinfo=dt.UTC)
        counts = [conn.execute(f"SELECT count(*) FROM {table} WHERE {column} < %s", (since,)).fetchone()
                  for table, column in (("decision_events", "decided_at"), ("outcomes", "reported_at"),
                                        ("outcome_conflicts", "reported_at"))]
        decisions, outcomes, conflicts = (int(c[0]) if c else -1 for c in counts)
        return decisions, outcomes, conflicts

    with psycopg.connect(db, autocommit=True) as conn:
        assert old_rows(conn) == (1, 1, 1)
        with pytest.raises(psycopg.OperationalError):
            partitions.apply_retention(_CutShort(conn, cut_at), retention_days=7, today=now.date())  # type: ignore[arg-type]
        assert partitions.retired_before(conn) == cutoff  # recorded before anything was dropped
        assert (old_day in partitions.list_partitions(conn)) == (cut_at == "DROP TABLE")
        # the outcomes' deletes are one transaction: none happened, and the old day's chain is whole
        assert old_rows(conn) == ((1, 1, 1) if cut_at == "DROP TABLE" else (0, 1, 1))
    assert verify(db).ok, str(verify(db).broken)
    assert check_heads(db, heads).ok

    late = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool"))
    assert late.flush(20)
    late.close()
    assert (late.rows_written, late.expired_rows) == (0, 2)  # the day being retired is not written to
    with psycopg.connect(db, autocommit=True) as conn:
        assert old_rows(conn)[0] == (1 if cut_at == "DROP TABLE" else 0)
        assert (old_day in partitions.list_partitions(conn)) == (cut_at == "DROP TABLE")
        assert verify(db).ok and check_heads(db, heads).ok
        # The next run (the service's next round) finishes the work.
        assert partitions.apply_retention(conn, retention_days=7, today=now.date()) == (
            [old_day] if cut_at == "DROP TABLE" else [])
        assert old_day not in partitions.list_partitions(conn) and old_rows(conn) == (0, 0, 0)
        assert conn.execute("SELECT cutoff FROM audit_retention").fetchall() == [(cutoff,), (cutoff,)]
    report = check_heads(db, heads)
    assert verify(db).ok and report.ok and report.retired == 2


def test_retention_waits_for_a_writer_creating_a_day_it_retires_and_then_drops_it(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer read the cutoff (none yet), then a retention run recorded one and listed the
    partitions before the writer's new day partition was committed: the day came back, half a chain,
    until the next hourly round."""
    import threading

    engine = make_engine(demo_fleet)
    now = dt.datetime.now(dt.UTC)
    at = (now - dt.timedelta(days=10)).timestamp()
    old_day, cutoff = dt.datetime.fromtimestamp(at, dt.UTC).date(), now.date() - dt.timedelta(days=6)
    retention_errors: list[BaseException] = []

    def retention() -> None:
        try:
            with psycopg.connect(db, autocommit=True) as conn:
                partitions.drop_before(conn, cutoff=cutoff)
        except BaseException as exc:  # reported by the test, not lost in the thread
            retention_errors.append(exc)

    ensure = partitions.ensure_partition
    waited: list[bool] = []

    def ensure_while_retention_runs(conn: psycopg.Connection[Any], *, day: dt.date) -> None:
        ensure(conn, day=day)
        if day == old_day and not waited:  # the writer has read the cutoff; retention starts now
            runner = threading.Thread(target=retention)
            runner.start()
            runner.join(1.0)
            waited.append(runner.is_alive())  # it waits for this writer's transaction
            threads.append(runner)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(partitions, "ensure_partition", ensure_while_retention_runs)
    writer = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool"))
    writer.submit_decision({**decision_event(engine.decide(ctx(1)), "routed", ()), "decided_at": at})
    assert writer.flush(20)
    writer.close()
    for t in threads:
        t.join(20)
    assert not retention_errors and waited == [True]
    with psycopg.connect(db) as conn:
        assert old_day not in partitions.list_partitions(conn)  # dropped with the day retention retired
        assert partitions.retired_before(conn) == cutoff
    assert verify(db).ok


def test_a_checkpoint_of_a_day_range_lists_only_those_days_heads(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A daily checkpoint (``--from``/``--to``, whole UTC days as ``verify`` takes them) lists the
    heads of those days only, and they check out; a reversed or malformed range is refused."""
    from audit.checkpoint import chain_heads, check_heads, parse_heads
    from decision.engine import outcome_event

    engine = make_engine(demo_fleet)
    today = dt.datetime.now(dt.UTC).date()
    days = [today - dt.timedelta(days=k) for k in (3, 2, 1)]
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool"))
    for k, day in enumerate(days):
        at = dt.datetime.combine(day, dt.time(12), dt.UTC).timestamp()
        for i in range(k + 2):  # a different length per day: each day's head seq tells the days apart
            d = engine.decide(ctx(10 * k + i))
            w.submit_decision({**decision_event(d, "routed", ()), "decided_at": at + i})
            w.submit_outcome(outcome_event(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=50, latency_ms=300),
                                           None, at + i + 1))
    assert w.flush(20)
    w.close()
    every = chain_heads(db)
    assert {(h.table, h.day, h.seq) for h in every} == {(t, day, k + 2) for k, day in enumerate(days)
                                                       for t in ("decision_events", "outcomes")}
    assert chain_heads(db, start=days[1], end=days[1]) == [h for h in every if h.day == days[1]]
    assert chain_heads(db, start=days[1]) == [h for h in every if h.day >= days[1]]
    assert chain_heads(db, end=days[0]) == [h for h in every if h.day == days[0]]

    cp = tmp_path / "heads.jsonl"
    code, _, err = _cli(monkeypatch, capsys, db, "checkpoint", "--from", str(days[1]), "--to", f"{days[2]}T00:00Z",
                        "-o", str(cp))
    assert code == 0 and "2 chain heads written" in err, err
    assert f"checkpoint takes whole UTC days (a chain's head is its day's last link): the day {days[1]}" in err
    heads = parse_heads(cp.read_text().splitlines(), str(cp))
    assert heads == [h for h in every if h.day == days[1]] and check_heads(db, heads).ok

    code, _, err = _cli(monkeypatch, capsys, db, "checkpoint", "--from", str(days[2]), "--to", str(days[0]))
    assert code == 2 and f"--from {days[2]} is after --to {days[0]}" in err, err
    code, _, err = _cli(monkeypatch, capsys, db, "checkpoint", "--from", "yesterday")
    assert code == 2 and "--from" in err and "yesterday" in err, err
