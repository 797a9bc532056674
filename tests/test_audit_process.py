"""The audit writer in its own process: what crosses the pipe, exactly-once storage, crashes, bounds."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audit import database
from audit.codec import encode_json
from audit.masking import Masker
from audit.settings import AuditSettings
from audit.shipping import Packer, Unpacker, decode, decode_lazy, encode
from audit.trace_store import encode_parts, read_trace, stored_from_packed
from audit.verify import verify
from audit.writer_process import ProcessAuditWriter
from decision.domain import Outcome, OutcomeStatus, RequestContext
from decision.engine import DecisionEngine, LazyTrace, decision_event
from decision.errors import DecisionError, Unavailable
from decision.fleet import Fleet
from decision.trace_format import assemble_trace, expand_trace
from learners.least_ttft import LeastExpectedTtft
from policies.bundle import DEFAULT_BUNDLE, compile_bundle
from policies.guard import PolicyGuard
from tests.test_audit_store import ctx, make_engine
from tests.test_hot_path import _world


@pytest.fixture()
def db(fresh_pg_url: str) -> str:
    database.prepare(fresh_pg_url)
    return fresh_pg_url


def _policy_decisions(seed: int, n: int) -> list[tuple[str, dict[str, Any]]]:
    """Decision and denial events of the example bundle over fresh, stale and missing telemetry."""
    fleet, store, now = _world(seed)
    events: list[tuple[str, dict[str, Any]]] = []

    class Collect:
        def submit_decision(self, event: Mapping[str, Any]) -> None:
            events.append(("d", dict(event)))

        def submit_outcome(self, event: Mapping[str, Any]) -> None:
            events.append(("o", dict(event)))

        def close(self) -> None:
            pass

    engine = DecisionEngine(fleet, store, PolicyGuard(compile_bundle(DEFAULT_BUNDLE)), LeastExpectedTtft(),
                            audit=Collect(), clock=lambda: now)
    rng = random.Random(seed)
    models = sorted(fleet.models)
    regions = sorted({s.region for s in fleet.sites.values()})
    for i in range(n):
        c = RequestContext(f"r{i}", f"tenant-{i % 3}", model=models[rng.randrange(len(models))],
                           client_region=regions[i % len(regions)], estimated_input_tokens=rng.randint(1, 5000),
                           expected_output_tokens=rng.randint(1, 900), session_id=f"s{i}",
                           allowed_jurisdictions=rng.choice([(), ("EU",), ("XX",)]),
                           data_class=rng.choice(["public", "personal", "phi"]))
        try:
            d = engine.decide(c)
            if i % 3 == 0:
                engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=40.0, latency_ms=90.0))
        except DecisionError:
            pass  # a denial: its event is collected all the same
    return events


@pytest.mark.parametrize(("seed", "limit"), [(1, 50_000), (2, 7)])
def test_a_shipped_trace_is_the_trace_the_service_would_have_stored(seed: int, limit: int) -> None:
    events = _policy_decisions(seed, 120)
    kinds = {e["status"] for k, e in events if k == "d"}
    assert "routed" in kinds and kinds & {"denied", "quota_denied"}, kinds  # both shapes are exercised
    packer, unpacker = Packer(limit=limit), Unpacker()
    wire: list[Any] = []
    expected = []
    for kind, event in events:
        trace = event.get("trace")
        parts = trace.parts() if isinstance(trace, LazyTrace) else None
        if kind == "d":
            assert parts is not None
            expected.append(encode_json(assemble_trace(parts)))
        wire += packer.message(kind, {k: v for k, v in event.items() if k != "trace"}, parts)
    if limit < 50_000:
        assert any(m[0] == "forget" for m in wire)  # small limit: handle generations rotate mid-stream
    got = []
    for start in range(0, len(wire), 17):  # batches, as the shipper sends them
        for msg in decode(encode(wire[start:start + 17])):
            rec = unpacker.feed(msg)
            if rec is not None and rec[0] == "d":
                assert rec[2] is not None
                got.append(encode_json(assemble_trace(rec[2])))
    assert got == expected


@pytest.mark.parametrize(("seed", "limit"), [(3, 50_000), (4, 7)])
def test_the_writer_process_stores_the_bytes_the_service_would_have_stored(seed: int, limit: int) -> None:
    """The writer process stores each trace as it came, handles swapped for the objects (encoded
    once): byte for byte what an in-process writer stores, and it reads back as the trace."""
    masker = Masker(["labels.*", "session_id"])
    packer, unpacker = Packer(limit=limit), Unpacker()
    wire: list[Any] = []
    expected: list[bytes] = []
    views: list[dict[str, Any]] = []
    for kind, event in _policy_decisions(seed, 120):
        trace = event.get("trace")
        parts = trace.parts() if isinstance(trace, LazyTrace) else None
        if kind == "d":
            assert parts is not None
            expected.append(encode_parts(parts, masker))
            views.append(json.loads(encode_json(expand_trace(assemble_trace(parts)))))
        wire += packer.message(kind, {k: v for k, v in event.items() if k != "trace"}, parts)
    got = []
    for start in range(0, len(wire), 17):
        for msg in decode_lazy(encode(wire[start:start + 17])):
            if msg[0] != "r":
                unpacker.feed(msg)
            elif msg[1] == "d":
                got.append(stored_from_packed(unpacker.stored_parts(msg[3]), masker))
    assert got == expected
    for stored, view in zip(got, views, strict=True):
        read = json.loads(encode_json(read_trace(stored)))
        assert {k: v for k, v in read.items() if k != "request"} == {k: v for k, v in view.items() if k != "request"}
        assert read["request"] == json.loads(encode_json(masker.mask_request(view["request"])))


def test_a_trace_the_writer_process_cannot_store_keeps_its_decision_and_the_writer(
        db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    """A shared object that pickles (so it crosses) but has no stored form: the decision is kept
    with an error for a trace, the writer process stays up, the records around it are whole."""
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path, flush_interval_s=0.05))
    engine = make_engine(demo_fleet, None)
    made = [engine.decide(ctx(i)) for i in range(3)]
    stored_trace = made[1].stored_trace
    assert isinstance(stored_trace, LazyTrace)
    bad_parts = stored_trace.parts()
    assert bad_parts is not None
    bad_parts = bad_parts._replace(endpoints=[[complex(1, 2)] for _ in bad_parts.endpoints])
    pid = w._proc.pid
    for i, d in enumerate(made):
        event = decision_event(d, "routed", ())
        if i == 1:
            event["trace"] = LazyTrace(gather=lambda: bad_parts)
        w.submit_decision(event)
    assert w.flush(30)
    assert w._proc.pid == pid and w.restarts == 0
    w.close()
    with psycopg.connect(db) as conn:
        rows: dict[str, bytes] = {r[0]: bytes(r[1]) for r in conn.execute("SELECT decision_id, trace_z "
                                                                          "FROM decision_events")}
    from audit.codec import load_trace
    assert set(rows) == {d.decision_id for d in made}
    assert "could not be stored" in load_trace(rows[made[1].decision_id])["error"]
    good = load_trace(rows[made[2].decision_id])
    assert good["stages"]["choose"]["chosen"] == made[2].route.endpoint_id
    assert verify(db).ok


def test_process_writer_stores_each_decision_and_outcome_once_and_the_chain_verifies(
        db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path, flush_interval_s=0.05))
    engine = make_engine(demo_fleet, w)
    made = [engine.decide(ctx(i)) for i in range(600)]
    for d in made[:200]:
        engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=40.0, latency_ms=90.0,
                                      input_tokens=300, output_tokens=80))
    assert w.flush(60)
    assert w.metrics()["rows_written"] == 600 and w.metrics()["outcomes_written"] == 200
    w.close()
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT decision_id) FROM decision_events").fetchone() == (600,
                                                                                                           600)
        assert conn.execute("SELECT count(*) FROM outcomes").fetchone() == (200,)
        raw = conn.execute("SELECT trace_z FROM decision_events WHERE decision_id = %s",
                           (made[7].decision_id,)).fetchone()
    from audit.codec import load_trace
    assert raw is not None
    stored, own = load_trace(bytes(raw[0])), dict(made[7].trace)
    assert stored["request"]["labels"] == {"user": "user-7", "team": "blue"}  # the prompt label is never stored
    assert {k: v for k, v in stored.items() if k != "request"} == {k: v for k, v in own.items() if k != "request"}
    report = verify(db)
    assert report.ok and report.rows == 600, str(report.broken)


def test_a_killed_writer_process_is_replaced_and_nothing_is_lost_or_stored_twice(
        db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path, flush_interval_s=0.02, batch_size=50))
    engine = make_engine(demo_fleet, w)
    made: list[str] = []
    for i in range(1500):
        d = engine.decide(ctx(i))
        made.append(d.decision_id)
        if i % 2 == 0:
            engine.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=40.0, latency_ms=90.0))
        if i in (400, 1100):
            deadline = time.monotonic() + 30
            while (w._status.get("pid") != w._proc.pid or w._status["metrics"]["rows_written"] == 0) and \
                    time.monotonic() < deadline:
                time.sleep(0.01)  # this child has written batches...
            for j in range(60):  # ...and has these in flight when it dies
                made.append(engine.decide(ctx(10_000 * i + j)).decision_id)
            os.kill(w._proc.pid, signal.SIGKILL)
        if i % 100 == 0:
            time.sleep(0.05)
    assert w.flush(60)
    assert w.restarts == 2
    w.close()
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT decision_id) FROM decision_events").fetchone() == (
            len(made), len(made))
        assert conn.execute("SELECT count(*), count(DISTINCT decision_id) FROM outcomes").fetchone() == (750, 750)
        chains = conn.execute("SELECT count(DISTINCT chain_id) FROM decision_events").fetchone()
        assert {r[0] for r in conn.execute("SELECT decision_id FROM decision_events")} == set(made)
    report = verify(db)
    assert report.ok and report.rows == len(made), str(report.broken)
    assert chains == (3,) and report.chains == 3  # each replacement writes a chain of its own


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
def test_at_the_bound_the_request_path_refuses_or_counts_never_silently(
        db: str, demo_fleet: Fleet, tmp_path: Path, mode: str) -> None:
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path, queue_max=40, on_spool_full=mode,  # type: ignore[arg-type]
                                             flush_interval_s=0.02))
    engine = make_engine(demo_fleet, w)
    assert w.flush(30)
    os.kill(w._proc.pid, signal.SIGSTOP)  # the writer cannot keep up at all
    try:
        accepted = 0
        for i in range(100):
            try:
                engine.decide(ctx(i))
                accepted += 1
            except Unavailable:
                assert mode == "fail_closed"
        if mode == "fail_closed":
            assert accepted == 40 and w.refused == 60
        else:
            assert accepted == 100 and w.dropped == 60
    finally:
        os.kill(w._proc.pid, signal.SIGCONT)
    assert w.flush(30)
    w.close()
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM decision_events").fetchone() == (40,)
    assert w.metrics()["refused" if mode == "fail_closed" else "dropped"] == 60


def test_decision_events_cross_with_their_top_level_fields_masked(db: str, demo_fleet: Fleet,
                                                                  tmp_path: Path) -> None:
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path, mask_fields=["request_id", "labels.user"]))
    sent: list[Any] = []
    original = w._packer.message

    def spy(kind: str, event: Mapping[str, Any], parts: Any) -> Any:
        sent.append(event)
        return original(kind, event, parts)

    w._packer.message = spy  # type: ignore[method-assign]
    engine = make_engine(demo_fleet, w)
    d = engine.decide(ctx(3))
    assert sent[0]["request_id"].startswith("h:") and "trace" not in sent[0]
    assert w.flush(30)
    w.close()
    from audit.repository import AuditRepository
    repo = AuditRepository(db)
    stored = repo.get_decision(d.decision_id)
    repo.close()
    assert stored is not None
    request = stored["trace"]["request"]
    assert request["request_id"].startswith("h:") and request["labels"]["user"].startswith("h:")
    assert "prompt" not in request["labels"]  # prompts are never stored
    assert decision_event(d, "routed", ())["request_id"] == "req-3"  # the service's own copy is untouched


def test_a_writer_that_keeps_dying_at_start_is_retried_with_growing_pauses_not_in_a_loop(
        db: str, demo_fleet: Fleet, tmp_path: Path) -> None:
    w = ProcessAuditWriter(db, AuditSettings(spool_dir=tmp_path))
    killed: set[int] = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:  # every child dies before it can report anything
        p = w._proc
        if p.pid not in killed and p.is_alive():
            killed.add(p.pid)
            os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.005)
    assert 2 <= w.restarts <= 5  # pauses of 0.25, 0.5, 1, 2 s... (a loop would restart hundreds of times)
    engine = make_engine(demo_fleet, w)
    d = engine.decide(ctx(1))
    assert w.flush(60)
    w.close()
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM decision_events WHERE decision_id = %s",
                            (d.decision_id,)).fetchone() == (1,)


def test_objects_built_fresh_per_decision_cross_inline_and_shared_ones_once(demo_fleet: Fleet) -> None:
    events: list[Any] = []

    class Collect:
        def submit_decision(self, event: Mapping[str, Any]) -> None:
            events.append(dict(event))

        def submit_outcome(self, event: Mapping[str, Any]) -> None:
            pass

        def close(self) -> None:
            pass

    engine = make_engine(demo_fleet, Collect())  # the built-in guard judges afresh every time
    for i in range(200):
        engine.decide(ctx(i))
    packer, unpacker = Packer(), Unpacker()
    defined = 0
    for ev in events:
        parts = ev["trace"].parts()
        for msg in decode(encode(packer.message("d", {"decision_id": ev["decision_id"]}, parts))):
            if msg[0] == "def":
                defined += 1
            rec = unpacker.feed(msg)
            if rec is not None:
                assert rec[2] is not None
                assert encode_json(assemble_trace(rec[2])) == encode_json(assemble_trace(parts))
    # Per placement: ids, rows, rules, feature names, readings: a handful of definitions, not one per decision.
    assert defined <= 12, defined
