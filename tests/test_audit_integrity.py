"""Every chain link the writer makes is stored: resubmitted decisions, rolled-back partitions, poison rows.

* A decision submitted again gets a new link when it is chained; the link is kept in
  ``decision_duplicates`` (migration 0006) and walked by ``audit verify`` and checkpoints, while
  the auditors' reads still show the decision once.
* A partition created in a transaction that rolls back is not cached as existing.
* A record PostgreSQL cannot store (a NUL in a text field, a time past year 9999, a bigint out of
  range) is rejected before it is chained; a row PostgreSQL still refuses is isolated by writing
  its batch in halves, so the rest of the batch and of the spool gets in.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audit import checkpoint, database, events, migrate, partitions
from audit.events import DecisionEventV1, OutcomeEventV1
from audit.repository import AuditRepository, DecisionFilter
from audit.settings import AuditSettings
from audit.spool import MAGIC, Spool
from audit.verify import verify
from audit.writer import AuditWriter
from decision.domain import RequestContext
from decision.errors import InvalidArgument, Unavailable
from decision.fleet import Fleet
from tests.test_audit_store import ctx, make_engine

AT = 1_700_000_000.0  # 2023-11-14, a day the test database has no partition for yet


@pytest.fixture()
def db(fresh_pg_url: str) -> str:
    database.prepare(fresh_pg_url)
    return fresh_pg_url


def dev(i: int, *, at: float = AT, **kw: Any) -> dict[str, Any]:
    """A decision event as the engine hands it over."""
    e: dict[str, Any] = {"decision_id": f"d-{i}", "decided_at": at + i * 0.001, "status": "routed",
                         "request_id": f"r-{i}", "tenant": "acme", "model": "m",
                         "trace": {"request": {"request_id": f"r-{i}"}}}
    e.update(kw)
    return e


def oev(i: int, **kw: Any) -> dict[str, Any]:
    """An outcome event of decision ``d-i``."""
    o: dict[str, Any] = {"decision_id": f"d-{i}", "status": "ok", "ttft_ms": 10.0 + i, "latency_ms": 100.0,
                         "input_tokens": 5, "output_tokens": 7, "error": "", "reward": None,
                         "reported_at": AT + 60 + i * 0.001}
    o.update(kw)
    return o


def writer(db: str, tmp_path: Path, **kw: Any) -> AuditWriter:
    s = AuditSettings(spool_dir=tmp_path / "spool", flush_interval_s=0.05, retry_interval_s=0.1, **kw)
    return AuditWriter(db, s, chain_id="c1", start=False)


def stored_ids(db: str, table: str = "decision_events") -> list[str]:
    with psycopg.connect(db) as conn:
        return sorted(str(r[0]) for r in conn.execute(f"SELECT decision_id FROM {table}"))


def quarantined_rows(tmp_path: Path) -> list[dict[str, Any]]:
    """Every batch kept in ``quarantine/rows`` (one refused row each)."""
    rows_dir = tmp_path / "spool" / "quarantine" / "rows"
    if not rows_dir.exists():
        return []
    sp = Spool(rows_dir, exclusive=False)
    return [rec for seg in sorted(rows_dir.glob("*.spool")) for rec in sp.read_segment(seg)]


# -- 1. a decision submitted again -------------------------------------------------------------------
def test_a_resubmitted_decision_keeps_its_link_and_verify_passes(db: str, tmp_path: Path) -> None:
    w = writer(db, tmp_path)
    w.process([("d", dev(1))])
    w.process([("d", dev(1))])  # the same decision again: chained as seq 2, refused by decision_events
    w.process([("d", dev(2))])  # seq 3: its prev_hash is seq 2's hash
    w.close()
    assert (w.rows_written, w.decision_duplicates, w.duplicates_skipped, w.rejected_rows) == (2, 1, 0, 0)
    assert stored_ids(db) == ["d-1", "d-2"] and stored_ids(db, "decision_duplicates") == ["d-1"]
    report = verify(db)
    assert report.ok, str(report.broken)
    assert (report.rows, report.decision_duplicates, report.chains) == (2, 1, 1)


def test_duplicates_in_one_staged_batch_and_in_a_spool_replay_keep_their_links(db: str, tmp_path: Path) -> None:
    w = writer(db, tmp_path)
    w.process([("d", dev(1))])
    w.db_up, w._next_retry = False, time.monotonic() + 60  # PostgreSQL "down": batches go to the spool
    w.process([("d", dev(1)), ("d", dev(2)), ("d", dev(2)), ("d", dev(3))])
    assert w.spool.has_backlog and stored_ids(db) == ["d-1"]
    w._next_retry = 0.0
    w.process([])  # replayed staged: the second d-1 and the second d-2 are duplicates
    w.close()
    assert not w.spool.has_backlog
    assert stored_ids(db) == ["d-1", "d-2", "d-3"]
    assert stored_ids(db, "decision_duplicates") == ["d-1", "d-2"]
    report = verify(db)
    assert report.ok and (report.rows, report.decision_duplicates) == (3, 2), str(report.broken)


def test_a_replayed_link_is_skipped_not_kept_as_a_duplicate(db: str, tmp_path: Path) -> None:
    """A batch whose commit was in doubt is replayed with the same links: nothing new to keep."""
    w = writer(db, tmp_path)
    prepared = w.prepare([("d", dev(1)), ("d", dev(2)), ("o", oev(1))])
    assert prepared is not None
    w._write(prepared, staged=False)
    w._write(prepared, staged=True)
    w.close()
    assert (w.rows_written, w.decision_duplicates, w.duplicates_skipped) == (2, 0, 3)
    assert stored_ids(db, "decision_duplicates") == []
    assert verify(db).ok


def test_deleting_a_duplicate_is_detected(db: str, tmp_path: Path) -> None:
    """The duplicate is a link like any other: removing it breaks the chain (or its checkpoint)."""
    w = writer(db, tmp_path)
    w.process([("d", dev(1)), ("d", dev(2))])
    w.process([("d", dev(1))])  # seq 3, the chain's head, in decision_duplicates
    heads = checkpoint.chain_heads(db)
    w.process([("d", dev(3))])
    w.close()
    assert [(h.table, h.seq) for h in heads] == [("decision_events", 3)]
    assert checkpoint.check_heads(db, heads).ok
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DELETE FROM decision_duplicates")
    report = verify(db)
    assert report.broken is not None and report.broken.seq == 4 and "rows missing" in report.broken.problem
    cp = checkpoint.check_heads(db, heads)
    assert not cp.ok and "missing" in cp.problems[0].problem


def test_auditors_see_a_resubmitted_decision_once(db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    from decision.engine import decision_event

    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool"))
    engine = make_engine(demo_fleet, w)
    made = [engine.decide(ctx(i)) for i in range(3)]
    assert w.flush(10)
    w.submit_decision(decision_event(made[1], "routed", ()))
    assert w.flush(10)
    w.close()
    assert w.decision_duplicates == 1
    repo = AuditRepository(db)
    try:
        items, _ = repo.list_decisions(filters=DecisionFilter())
        assert sorted(i["decision_id"] for i in items) == sorted(d.decision_id for d in made)
        assert len(list(repo.iter_decisions(filters=DecisionFilter()))) == 3
        assert repo.stats(filters=DecisionFilter())["total"] == 3
        assert repo.counts()["rows"] == 3
        one = repo.get_decision(made[1].decision_id)
        assert one is not None and one["decision_id"] == made[1].decision_id
    finally:
        repo.close()
    assert verify(db).ok


def test_leftover_duplicates_of_a_retired_day_do_not_fail_verify(db: str, tmp_path: Path) -> None:
    w = writer(db, tmp_path)
    w.process([("d", dev(1)), ("d", dev(2))])
    w.process([("d", dev(1))])
    w.close()
    day = dt.datetime.fromtimestamp(AT, dt.UTC).date()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT * FROM decision_duplicates")
        partitions.apply_retention(conn, retention_days=1, today=day + dt.timedelta(days=1))
        # A retention run that left the day's duplicates behind (one that predates migration 0006).
        conn.execute("INSERT INTO decision_duplicates SELECT * FROM kept ON CONFLICT DO NOTHING")
    assert stored_ids(db) == [] and stored_ids(db, "decision_duplicates") == ["d-1"]
    report = verify(db)
    assert report.ok and report.decision_duplicates == 0, str(report.broken)


def test_retention_deletes_the_duplicates_of_the_days_it_drops(db: str, tmp_path: Path) -> None:
    w = writer(db, tmp_path)
    w.process([("d", dev(1))])
    w.process([("d", dev(1))])
    w.close()
    day = dt.datetime.fromtimestamp(AT, dt.UTC).date()
    with psycopg.connect(db, autocommit=True) as conn:
        partitions.apply_retention(conn, retention_days=1, today=day + dt.timedelta(days=1))
    assert stored_ids(db, "decision_duplicates") == []


def test_migration_0006_downgrades_and_upgrades(db: str) -> None:
    migrate.downgrade(db, "0005")
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('decision_duplicates')").fetchone() == (None,)
    migrate.upgrade(db)
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT to_regclass('decision_duplicates')::text").fetchone() == ("decision_duplicates",)


# -- 2. a partition created in a rolled-back transaction --------------------------------------------
def test_a_partition_made_in_a_rolled_back_write_is_made_again(db: str, tmp_path: Path) -> None:
    w = writer(db, tmp_path)
    day_a, day_b = AT, AT + 86_400  # no partition for either day yet
    w.process([("d", dev(1, at=day_a))])
    # One batch: a duplicate on day A (the direct COPY fails and rolls back) and a decision on day B,
    # whose partition that rolled-back transaction had created.
    w.process([("d", dev(1, at=day_a)), ("d", dev(2, at=day_b))])
    w.process([("d", dev(3, at=day_b))])
    w.close()
    assert stored_ids(db) == ["d-1", "d-2", "d-3"]
    assert (w.lost, w.rejected_rows, w.spool.has_backlog) == (0, 0, False)
    assert dt.datetime.fromtimestamp(day_b, dt.UTC).date() in w._days_ready
    assert verify(db).ok


def test_days_are_cached_only_after_the_commit(db: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    w = writer(db, tmp_path)
    prepared = w.prepare([("d", dev(1))])
    assert prepared is not None

    def fail(*_: Any, **__: Any) -> None:
        raise psycopg.errors.InternalError_("injected after the partition was created")

    monkeypatch.setattr(w, "_copy", fail)
    with pytest.raises(psycopg.errors.InternalError_):
        w._write(prepared, staged=False)
    assert w._days_ready == set()
    monkeypatch.undo()
    w._write(prepared, staged=False)
    w.close()
    assert stored_ids(db) == ["d-1"] and len(w._days_ready) == 1


def test_a_partition_dropped_behind_the_writers_back_is_made_again(db: str, tmp_path: Path) -> None:
    """A cached day whose partition was dropped (not by retention) fails every row with "no partition":
    not a poison row."""
    w = writer(db, tmp_path)
    w.process([("d", dev(1))])
    with psycopg.connect(db, autocommit=True) as conn:
        day = dt.datetime.fromtimestamp(AT, dt.UTC).date()
        conn.execute(f"DROP TABLE {partitions.partition_name(day)}")
    w.process([("d", dev(2)), ("d", dev(3))])  # a late replay of that day, say
    w.close()
    assert stored_ids(db) == ["d-2", "d-3"] and w.rejected_rows == 0


def test_a_day_retention_dropped_behind_the_writers_back_stays_dropped(db: str, tmp_path: Path) -> None:
    w = writer(db, tmp_path)
    w.process([("d", dev(1))])
    with psycopg.connect(db, autocommit=True) as conn:
        partitions.drop_before(conn, cutoff=dt.datetime.fromtimestamp(AT, dt.UTC).date() + dt.timedelta(days=1))
    w.process([("d", dev(2)), ("d", dev(3))])
    w.close()
    assert stored_ids(db) == [] and (w.rejected_rows, w.expired_rows) == (0, 2)


# -- 3. records PostgreSQL cannot store ---------------------------------------------------------------
DECISION_TEXT = ["decision_id", "request_id", "tenant", "user_tier", "model", "endpoint_id", "site_id", "region",
                 "tier", "gpu_type", "policy_revision", "learner", "reason"]


def test_decision_event_puts_every_field_of_the_mapping_in_its_own_attribute() -> None:
    """``from_mapping`` builds the event positionally (the writer's per-row cost): a field order
    that drifted from the dataclass's would swap values silently, and a round trip through
    ``from_mapping`` on both sides would not see it. Every field here has a value of its own."""
    texts = {name: f"{name}-value" for name in DECISION_TEXT}
    floats = {"propensity": 0.25, "expected_ttft_ms": 41.5, "expected_cost_per_1k_tokens": 0.0031,
              "decision_us": 812.0}
    m = {**texts, **floats, "decided_at_us": 1_700_000_000_123_456, "status": "quota_denied",
         "deny_rules": ["quota.tenant_rate", "residency.sites"], "trace": {"k": "v"}, "event_version": 1}
    e = DecisionEventV1.from_mapping(m)
    for name in (*texts, *floats, "decided_at_us", "status", "trace", "event_version"):
        assert getattr(e, name) == m[name], name
    assert e.deny_rules == ("quota.tenant_rate", "residency.sites")
    assert {f.name for f in dataclasses.fields(e)} == {*m}


@pytest.mark.parametrize("field", [*DECISION_TEXT, "deny_rules"])
def test_decision_event_refuses_nul_in_every_text_field(field: str) -> None:
    value: Any = ["ok", "bad\x00rule"] if field == "deny_rules" else "bad\x00value"
    with pytest.raises(ValueError, match=f"^{field}: contains a NUL character"):
        DecisionEventV1.from_mapping(dev(1, **{field: value}))


@pytest.mark.parametrize("field", ["decision_id", "error"])
def test_outcome_event_refuses_nul_in_every_text_field(field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: contains a NUL character"):
        OutcomeEventV1.from_mapping(oev(1, **{field: "bad\x00value"}))


@pytest.mark.parametrize(("changes", "needle"), [
    ({"input_tokens": 1 << 63}, "input_tokens: out of the bigint range"),
    ({"output_tokens": -(1 << 63) - 1}, "output_tokens: out of the bigint range"),
    ({"event_version": 1 << 40}, "unsupported outcome event version"),
])
def test_outcome_event_refuses_what_its_columns_cannot_hold(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        OutcomeEventV1.from_mapping(oev(1, **changes))


def test_a_nul_decision_is_rejected_before_it_is_chained(db: str, tmp_path: Path) -> None:
    """The other decisions of its batch and the batches after it reach the log, chained without a gap."""
    w = writer(db, tmp_path)
    w.process([("d", dev(1)), ("d", dev(2, request_id="abc\x00def")), ("d", dev(3)),
               ("o", oev(1)), ("o", oev(3, error="boom\x00")), ("o", oev(3))])
    w.process([("d", dev(4)), ("d", dev(5))])
    w.close()
    assert stored_ids(db) == ["d-1", "d-3", "d-4", "d-5"]
    assert stored_ids(db, "outcomes") == ["d-1", "d-3"]
    assert (w.invalid, w.lost, w.rejected_rows, w.spool.has_backlog, w.db_up) == (2, 0, 0, False, True)
    report = verify(db)
    assert report.ok and (report.rows, report.outcome_rows) == (4, 2), str(report.broken)


def test_a_time_past_year_9999_is_rejected_alone(db: str, tmp_path: Path) -> None:
    w = writer(db, tmp_path)
    w.process([("d", dev(1)), ("d", dev(2, decided_at=1e13)), ("d", dev(3))])
    w.close()
    assert stored_ids(db) == ["d-1", "d-3"] and w.invalid == 1
    assert verify(db).ok


def test_the_engine_refuses_a_nul_request_and_the_good_ones_are_stored(db: str, demo_fleet: Fleet,
                                                                       tmp_path: Path) -> None:
    w = AuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool", flush_interval_s=0.05))
    engine = make_engine(demo_fleet, w)
    good = [engine.decide(ctx(i)).decision_id for i in range(3)]
    with pytest.raises(InvalidArgument) as err:
        engine.decide(RequestContext(request_id="evil\x00", tenant="acme", model="llama-3.1-8b"))
    assert err.value.field == "request_id"
    good += [engine.decide(ctx(i)).decision_id for i in range(3, 5)]
    assert w.flush(10)
    w.close()
    assert stored_ids(db) == sorted(good) and w.invalid == 0
    assert verify(db).ok


def test_get_decision_answers_none_for_a_nul_id(db: str) -> None:
    repo = AuditRepository(db)
    try:
        assert repo.get_decision("0190\x00") is None
    finally:
        repo.close()


# -- 3c. a row PostgreSQL still refuses is isolated ------------------------------------------------------
def _refuse_tenant(db: str, tenant: str) -> None:
    """Make PostgreSQL refuse decisions of ``tenant`` (a CheckViolation, as any data error would)."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE decision_events ADD CONSTRAINT test_refused CHECK (tenant <> '{tenant}')")


def _nul_passes_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a NUL through ``from_mapping``, as a value the validation does not foresee would be."""
    monkeypatch.setattr(events, "check_text", lambda *_: None)


def test_a_refused_row_is_isolated_and_the_rest_of_its_batch_is_stored(db: str, tmp_path: Path) -> None:
    _refuse_tenant(db, "evil")
    w = writer(db, tmp_path)
    w.process([("d", dev(i, tenant="evil" if i == 4 else "acme")) for i in range(1, 8)] + [("o", oev(1))])
    w.process([("d", dev(8))])
    w.close()
    assert stored_ids(db) == [f"d-{i}" for i in (1, 2, 3, 5, 6, 7, 8)]
    assert stored_ids(db, "outcomes") == ["d-1"]
    assert (w.rejected_rows, w.lost, w.spool.has_backlog, w.db_up) == (1, 0, False, True)
    kept = quarantined_rows(tmp_path)
    assert len(kept) == 1 and [r[0] for r in kept[0]["d"]] == ["d-4"] and kept[0]["o"] == []
    # The refused row's link is missing from the log, and verify says exactly where.
    report = verify(db)
    assert report.broken is not None and report.broken.seq == 5 and "rows missing" in report.broken.problem


def test_a_refused_row_in_the_spool_does_not_quarantine_its_segment(db: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The poison-batch scenario with a NUL the validation missed: PostgreSQL's DataError on replay."""
    _nul_passes_validation(monkeypatch)
    w = writer(db, tmp_path)
    w.db_up, w._next_retry = False, time.monotonic() + 60  # the batches reach the spool first
    w.process([("d", dev(1)), ("d", dev(2, request_id="abc\x00def")), ("d", dev(3))])
    w.process([("d", dev(4)), ("d", dev(5))])
    assert w.spool.has_backlog
    w._next_retry = 0.0
    w.process([])
    w.finish()
    w.close()
    assert stored_ids(db) == ["d-1", "d-3", "d-4", "d-5"]
    assert (w.rejected_rows, w.lost, w.spool.has_backlog) == (1, 0, False)
    assert not list((tmp_path / "spool" / "quarantine").glob("*.spool"))  # no whole segment set aside
    assert [r[0] for r in quarantined_rows(tmp_path)[0]["d"]] == ["d-2"]


def test_a_direct_data_error_is_not_taken_for_an_outage(db: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _nul_passes_validation(monkeypatch)
    w = writer(db, tmp_path)
    w.process([("o", oev(1)), ("o", oev(2, error="x\x00")), ("o", oev(3))])
    w.close()
    assert stored_ids(db, "outcomes") == ["d-1", "d-3"]
    assert (w.rejected_rows, w.spool.appended_records, w.db_up) == (1, 0, True)


def test_an_outage_while_isolating_spools_the_batch_and_its_replay_stores_each_row_once(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_tenant(db, "evil")
    w = writer(db, tmp_path)
    real: Callable[..., None] = w._write
    calls = 0

    def flaky(prepared: dict[str, Any], *, staged: bool) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # the direct write, the first half, then the connection drops
            raise psycopg.OperationalError("injected outage")
        real(prepared, staged=staged)

    monkeypatch.setattr(w, "_write", flaky)
    w.process([("d", dev(1)), ("d", dev(2)), ("d", dev(3, tenant="evil")), ("d", dev(4))])
    assert stored_ids(db) == ["d-1", "d-2"] and w.spool.has_backlog and not w.db_up
    time.sleep(0.15)  # retry_interval_s
    w.process([])
    w.close()
    assert stored_ids(db) == ["d-1", "d-2", "d-4"]
    assert stored_ids(db, "decision_duplicates") == []  # the replayed links are the stored ones
    assert (w.rejected_rows, w.spool.has_backlog) == (1, False)
    report = verify(db)
    assert report.broken is not None and report.broken.seq == 4  # d-3's link (seq 3) is the one missing


def test_second_outcomes_on_different_days_at_the_same_seq_are_both_kept(db: str, tmp_path: Path) -> None:
    # Outcome chains restart at seq 1 every UTC day, so one writer's second outcomes on two days
    # can share (chain_id, seq): the second must not be dropped as if it were a replay.
    day = 86_400.0
    w = writer(db, tmp_path)
    w.process([("d", dev(1)), ("o", oev(1)), ("o", oev(1, status="error", ttft_ms=0.0))])
    w.process([("d", dev(2, at=AT + day)), ("o", oev(2, reported_at=AT + day + 60)),
               ("o", oev(2, status="error", ttft_ms=0.0, reported_at=AT + day + 61))])
    w.close()
    assert stored_ids(db, "outcome_conflicts") == ["d-1", "d-2"]
    report = verify(db)
    assert report.ok and report.outcome_conflicts == 2, str(report.broken)


def test_a_failed_spool_append_is_cut_off_and_later_batches_are_not_lost(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk fails one append after part of its record was written: left there, the reader would
    # stop at it and the fsynced batches appended after it would never reach PostgreSQL.
    w = writer(db, tmp_path)
    w.db_up, w._next_retry = False, time.monotonic() + 60  # PostgreSQL away: batches go to the spool
    w.process([("d", dev(1))])
    real_fsync, failures = os.fsync, [1]

    def full_disk_once(fd: int) -> None:
        if failures:
            failures.pop()
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_once)
    with pytest.raises(OSError):
        w.spool.append({"d": [], "o": [], "partial": "x" * 1000})  # as _deliver would, on a full disk
    monkeypatch.setattr(os, "fsync", real_fsync)
    w.process([("d", dev(2))])
    w.process([("d", dev(3))])
    segments = w.spool.segments()
    assert len(segments) == 2 and all(w.spool.read_segment_checked(s)[1] == 0 for s in segments)
    w._next_retry = 0.0
    w.process([])
    w.finish()
    w.close()
    assert stored_ids(db) == ["d-1", "d-2", "d-3"] and not w.spool.has_backlog
    assert verify(db).ok


def test_a_spool_whose_disk_refuses_holds_the_batch_and_bounds_what_follows(
        db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL away and the spool's disk full: the batch used to be counted as malformed, then
    lost; it is held in memory (tests/test_audit_held.py has the rest)."""
    w = writer(db, tmp_path)
    w.db_up, w._next_retry = False, time.monotonic() + 60

    def full_disk(payload: Any) -> None:  # a simulated disk fault
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w.spool, "append", full_disk)
    w.process([("d", dev(1)), ("d", dev(2))])
    assert (w.lost, w.invalid, w.held_records, w.metrics()["lost"]) == (0, 0, 2, 0.0)
    with pytest.raises(Unavailable):  # fail-closed: nothing more is taken while nothing durable keeps it
        w.submit_decision(dev(3))
    monkeypatch.undo()
    w._next_retry = w._held_retry_at = 0.0
    w.process([("d", dev(4))])  # the database is back: the held batch is written, then this one; the bound lifts
    w.submit_decision(dev(5))
    w.process(w._take())
    w.close()
    assert stored_ids(db) == ["d-1", "d-2", "d-4", "d-5"] and w.lost == 0


def test_a_database_that_takes_no_writes_keeps_the_spool_for_later(db: str, tmp_path: Path) -> None:
    """Read-only after a failover is not a record's fault: the segment used to be set aside for good."""
    w = writer(db, tmp_path)
    w.db_up, w._next_retry = False, time.monotonic() + 60
    w.process([("d", dev(1)), ("d", dev(2))])
    name = db.rsplit("/", 1)[1]
    with psycopg.connect(database.database_url(db, "postgres"), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        w._next_retry = 0.0
        w.process([])  # the replay meets a read-only database
        assert w.spool.has_backlog and not w.db_up and not (tmp_path / "spool" / "quarantine").exists()
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
    if w._conn is not None:
        w._conn.close()  # its session began read-only
    w._next_retry = 0.0
    w.process([])
    w.close()
    assert stored_ids(db) == ["d-1", "d-2"] and not w.spool.has_backlog
    assert verify(db).ok


def test_a_quarantined_segment_is_never_overwritten(tmp_path: Path) -> None:
    """Numbering starts again once the spool empties: the second set-aside segment took the first's name."""
    kept = []
    for round_ in range(2):
        sp = Spool(tmp_path / "spool")
        sp.append({"round": round_})
        sp.close()
        sp = Spool(tmp_path / "spool")
        (seg,) = sp.segments()
        kept.append(sp.quarantine_segment(seg))
        sp.close()
    assert kept[0] != kept[1] and all(p.exists() for p in kept)
    assert [Spool(tmp_path / "x", exclusive=False).read_segment(p) for p in kept] == [[{"round": 0}], [{"round": 1}]]


def test_a_damaged_spool_record_costs_only_itself_and_its_segment_is_kept(db: str, tmp_path: Path) -> None:
    w = writer(db, tmp_path)
    w.db_up, w._next_retry = False, time.monotonic() + 60
    for i in (1, 2, 3):
        w.process([("d", dev(i))])
    (seg,) = w.spool.segments()
    data = bytearray(seg.read_bytes())
    second = data.find(MAGIC, 1)
    data[second + 20] ^= 0xFF  # a flipped bit in the second batch's body
    seg.write_bytes(bytes(data))
    records, unreadable = w.spool.read_segment_checked(seg)
    assert len(records) == 2 and unreadable == data.find(MAGIC, second + 1) - second
    w._next_retry = 0.0
    w.process([])
    w.finish()
    w.close()
    assert stored_ids(db) == ["d-1", "d-3"] and not w.spool.has_backlog
    assert w.metrics()["spool_damaged_bytes"] == unreadable
    assert [p.name for p in (tmp_path / "spool" / "quarantine").glob("*.spool")] == [seg.name]  # kept as evidence


def test_a_spool_has_one_writer_and_workers_get_folders_of_their_own(db: str, tmp_path: Path) -> None:
    # Two writers on one spool would append to, replay and delete each other's segments.
    from audit.integration import build_audit_parts
    from audit.spool import SpoolInUse
    from audit.writer_process import ProcessAuditWriter
    from decision.config import Settings

    first = writer(db, tmp_path)
    with pytest.raises(SpoolInUse, match=rf"audit spool {tmp_path / 'spool'} is in use by another writer \(pid "
                                         rf"{os.getpid()}\)"):
        writer(db, tmp_path)
    with pytest.raises(SpoolInUse):  # the process writer refuses at start-up, not in a restarting child
        ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path / "spool"))
    first.close()
    writer(db, tmp_path).close()  # free again once the first one closed

    shared = {"writer": "thread", "spool_dir": str(tmp_path / "shared")}
    parts = [build_audit_parts(shared, settings=Settings(database_url=db, data_dir=tmp_path / f"w{i}", worker=i))
             for i in (0, 1)]
    try:
        sinks = [p.sink for p in parts]
        assert all(isinstance(s, AuditWriter) for s in sinks)
        assert [s.spool.directory for s in sinks if isinstance(s, AuditWriter)] == [
            tmp_path / "shared" / "worker-0", tmp_path / "shared" / "worker-1"]
    finally:
        for p in parts:
            if p.close is not None:
                p.close()


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
def test_a_submit_racing_another_for_the_last_queue_place_is_counted_or_bounded(
        db: str, tmp_path: Path, mode: str) -> None:
    import threading

    from decision.errors import Unavailable

    w = writer(db, tmp_path, queue_max=1, on_spool_full=mode)
    w.submit_decision(dev(1))
    # The room check said there was a place; another thread took it before this put (the race).
    w._full = lambda tenant: False  # type: ignore[method-assign]
    taker = threading.Timer(0.2, w._q.get_nowait)  # ...and the writer frees it a moment later
    taker.start()
    w._put("d", dev(2))
    taker.join()
    assert w._enqueued == 2  # counted, so flush() waits for it
    if mode == "fail_open":  # nobody frees it this time: the bound's policy, not a raw queue.Full
        w._put("d", dev(3))
        assert (w._enqueued, w.at_bound.dropped) == (2, 1)
    else:
        with pytest.raises(Unavailable):
            w._put("d", dev(3))
    w.close()
