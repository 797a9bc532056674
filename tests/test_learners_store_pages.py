"""Pages of replica deltas: found by seeks whatever the history, the take-back paged too, the bounds in the config."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from learners.features import FEATURE_NAMES
from learners.linucb import LinUCB
from learners.store import Delta, LearnerStore, ReplicaRetaken, _Bounded
from learners.sync import LearnerSync
from tests.conftest import ROOT
from tests.test_learners_support import migrate

D = len(FEATURE_NAMES)


def _history(url: str, counts: dict[str, int], *, learner: str = "linucb", version: str = "v") -> None:
    """``counts[replica]`` deltas (seqs 1..n) of each replica, written at once, arrays of 2 floats."""
    with psycopg.connect(url, autocommit=True) as conn:
        for replica, n in counts.items():
            conn.execute(
                "INSERT INTO learner_deltas (learner, version, replica, seq, n_features, dn, da, db)"
                " SELECT %s, %s, %s, g, 1, 1, %s, %s FROM generate_series(1, %s) g",
                (learner, version, replica, np.ones(1).tobytes(), np.ones(1).tobytes(), n))
        conn.execute("ANALYZE learner_deltas")  # the planner knows the table is large, as in production


@contextlib.contextmanager
def _statements() -> Iterator[list[tuple[str, Any]]]:
    """Every statement a store sends in the block, with its parameters."""
    sent: list[tuple[str, Any]] = []
    real = _Bounded.execute

    def recording(self: _Bounded, query: str, params: Any = None) -> psycopg.Cursor[dict[str, Any]]:
        sent.append((query, params))
        return real(self, query, params)

    _Bounded.execute = recording  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        _Bounded.execute = real  # type: ignore[method-assign]


def _rows_visited(url: str, query: str, params: Any) -> tuple[int, set[str]]:
    """Table and index rows ``query`` reads (returned or filtered out, over every loop) and its scan kinds."""
    with psycopg.connect(url) as conn:
        row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params).fetchone()
    assert row is not None
    visited, kinds = 0, set()

    def walk(node: dict[str, Any]) -> None:
        nonlocal visited
        if node.get("Relation Name") == "learner_deltas":
            kinds.add(node["Node Type"])
            per_loop = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            visited += int(per_loop * node["Actual Loops"])  # EXPLAIN shows per-loop averages
        for child in node.get("Plans", []):
            walk(child)

    walk(row[0][0]["Plan"])
    return visited, kinds


def test_a_page_of_deltas_costs_the_same_however_long_the_history_behind_the_marks(fresh_pg_url: str) -> None:
    """Deltas are never deleted: a page filtered from each replica's whole history by its mark read
    every delta ever written (60,000 rows here) to return 5."""
    migrate(fresh_pg_url)
    _history(fresh_pg_url, {"a": 20_000, "b": 20_000, "c": 20_005})
    store = LearnerStore(fresh_pg_url)
    marks = {"a": 20_000, "b": 20_000, "c": 20_000}
    with _statements() as sent:
        page = store.read_deltas(learner="linucb", version="v", after=marks, exclude_replica="a")
        assert [(d.replica, d.seq) for d in page] == [("c", s) for s in range(20_001, 20_006)]
        assert store.read_deltas(learner="linucb", version="v", after={**marks, "c": 20_005}) == []
    for query, params in sent:
        visited, kinds = _rows_visited(fresh_pg_url, query, params)
        # A few seeks per replica plus the page itself (twice: counted, then read), nothing behind the marks.
        assert visited <= 3 * 3 + 2 * 5, (visited, kinds)
        assert "Seq Scan" not in kinds
    store.close()


def _reference(rows: list[tuple[str, int, int]], after: dict[str, int], exclude: str | None,
               page_rows: int, page_bytes: int) -> list[tuple[str, int]]:
    """What a page holds, from every stored (replica, seq, size): the definition read_deltas keeps."""
    unread = sorted((r, s, size) for r, s, size in rows if r != exclude and s > after.get(r, 0))[:page_rows]
    page: list[tuple[str, int]] = []
    before = 0
    for r, s, size in unread:
        if page and before >= page_bytes:
            break
        page.append((r, s))
        before += size
    return page


def test_pages_are_those_of_the_reference_for_any_marks_exclusion_and_bounds(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    rng = random.Random(5)
    store = LearnerStore(fresh_pg_url)
    rows: list[tuple[str, int, int]] = []
    for replica in ("", "a", "ab", "b", "host-w0", "host-w1", "z"):
        for seq in range(1, rng.randint(1, 12) + 1):
            d = rng.choice((1, 2, 3))  # arrays of 1, 2 or 3 features: sizes differ
            store.write_delta(learner="linucb", version="v", replica=replica, seq=seq, dA=np.ones((d, d)),
                              db=np.ones(d), dn=1)
            rows.append((replica, seq, 8 * (d * d + d)))
        store.release_replica(learner="linucb", version="v", replica=replica)
    replicas = [*sorted({r for r, _, _ in rows}), "unknown"]
    for _ in range(150):
        after = {r: rng.randint(0, 14) for r in rng.sample(replicas, rng.randint(0, len(replicas)))}
        exclude = rng.choice([None, *replicas])
        store.delta_page_rows = rng.choice((1, 2, 3, 5, 8, 40, 1000))
        store.delta_page_bytes = rng.choice((1, 16, 48, 100, 500, 8 << 20))
        page = store.read_deltas(learner="linucb", version="v", after=after, exclude_replica=exclude)
        expected = _reference(rows, after, exclude, store.delta_page_rows, store.delta_page_bytes)
        assert [(d.replica, d.seq) for d in page] == expected, (after, exclude, store.delta_page_rows,
                                                                store.delta_page_bytes)
    assert store.read_deltas(learner="linucb", version="other", after={}) == []
    store.close()


def test_take_back_reads_the_rows_under_the_id_in_bounded_pages(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    _history(fresh_pg_url, {"pod-a": 10, "pod-b": 4})
    store = LearnerStore(fresh_pg_url, delta_page_rows=4)
    key = {"learner": "linucb", "version": "v", "replica": "pod-a"}
    assert [d.seq for d in store.take_back(**key, after=3)] == [4, 5, 6, 7]
    assert [d.seq for d in store.take_back(**key, after=7)] == [8, 9, 10]
    assert store.take_back(**key, after=10) == []
    store.delta_page_bytes = 16  # one delta's arrays: the first always comes, a second only under the bound
    assert [d.seq for d in store.take_back(**key, after=0)] == [1]
    store.delta_page_bytes = 17
    assert [d.seq for d in store.take_back(**key, after=0)] == [1, 2]
    store.close()


def _lose_session(sync: LearnerSync) -> None:
    with psycopg.connect(sync.store.url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (sync.store._conn.info.backend_pid,))


def test_an_id_taken_back_merges_another_process_s_many_deltas_page_by_page(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    store = LearnerStore(fresh_pg_url, delta_page_rows=3)
    sa = LearnerSync(a, store, FEATURE_NAMES, replica="pod-a")
    sa.restore()
    _lose_session(sa)
    b_store = LearnerStore(fresh_pg_url)
    b = LinUCB(D, seed=2)
    sb = LearnerSync(b, b_store, FEATURE_NAMES, replica="pod-a")
    sb.restore(replay=False)
    for i in range(10):  # ten deltas under A's id, seqs 1..10
        b.update(tuple(np.full(D, 0.1 * (i + 1))), 1.0)
        assert sb.sync().pushed == 1
    b_store.close()
    pages: list[list[int]] = []
    real = store.take_back

    def recorded(**kw: Any) -> list[Delta]:
        page = real(**kw)
        pages.append([d.seq for d in page])
        if len(pages) == 1:  # between pages the id is not settled: nothing may be written under it yet
            with pytest.raises(ReplicaRetaken):
                store.write_delta(learner=sa.key[0], version=sa.key[1], replica="pod-a", seq=99, dA=np.eye(D),
                                  db=np.ones(D), dn=1)
        return page

    store.take_back = recorded  # type: ignore[method-assign]
    a.update(tuple(np.full(D, 0.5)), 1.0)
    with pytest.raises(psycopg.OperationalError):
        sa.sync()  # finds its session gone
    report = sa.sync()  # takes the id back: B's ten deltas in pages of 3, then its own as seq 11
    assert pages == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10], []]
    assert (report.pushed, report.merged, a.n_updates) == (1, 10, 11)
    sa.stop(final_snapshot=True)
    with psycopg.connect(fresh_pg_url) as conn:
        seqs = conn.execute("SELECT max(seq), count(*) FROM learner_deltas WHERE replica = 'pod-a'").fetchone()
    assert seqs == (11, 11)


def test_the_page_bounds_are_learner_settings_with_the_store_s_defaults(tmp_path: Path) -> None:
    from decision.config import ConfigError, LearnerSection, load_config
    from learners import store

    assert LearnerSection().delta_page_rows == store.DELTA_PAGE_ROWS == 1000
    assert LearnerSection().delta_page_bytes == store.DELTA_PAGE_BYTES == 8 << 20
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\nlearner:\n  delta_page_rows: 50\n"
                   "  delta_page_bytes: 65536\n")
    learner = load_config(cfg).learner
    assert (learner.delta_page_rows, learner.delta_page_bytes) == (50, 65536)
    for setting, value, problem in (("delta_page_rows", "0", "greater than or equal to 1"),
                                    ("delta_page_bytes", "2147483648", "less than or equal to 1073741824"),
                                    ("delta_page_rows", '"1000"', "a valid integer")):
        cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\nlearner:\n  {setting}: {value}\n")
        with pytest.raises(ConfigError, match=rf"c\.yaml:3: learner\.{setting}: Input should be {problem}"):
            load_config(cfg)
    with pytest.raises(ValueError, match="delta_page_bytes must be an integer of at least 1, not 0"):
        LearnerStore("postgresql://unused", delta_page_bytes=0)


def test_the_service_s_store_takes_the_page_bounds_of_the_config(fresh_pg_url: str) -> None:
    from decision.config import LearnerSection, ServiceConfig, Settings
    from decision.service import AuditParts, _build_learner_sync

    migrate(fresh_pg_url)
    config = ServiceConfig(fleet=Path("f.yaml"), learner=LearnerSection(delta_page_rows=7, delta_page_bytes=4096))

    class Features:
        names = FEATURE_NAMES

    sync = _build_learner_sync(config, Settings(replica="pod-a"), AuditParts(database_url=fresh_pg_url), LinUCB(D),
                               Features(), barrier=contextlib.nullcontext())  # type: ignore[arg-type]
    try:
        assert (sync.store.delta_page_rows, sync.store.delta_page_bytes) == (7, 4096)
    finally:
        sync.store.close()



def test_ids_that_are_caught_up_cost_no_seek_into_the_deltas(fresh_pg_url: str) -> None:
    """One id per pod piles up across deploys: a page sought into every id ever used (2,000 here)
    to find the one with news. It now reads their heads only (migration 0009)."""
    migrate(fresh_pg_url)
    old = {f"pod-{i:04d}": 3 for i in range(2_000)}
    _history(fresh_pg_url, {**old, "pod-new": 5})
    store = LearnerStore(fresh_pg_url)
    marks = {**old, "pod-new": 2}
    with _statements() as sent:
        page = store.read_deltas(learner="linucb", version="v", after=marks, exclude_replica="pod-0000")
        assert [(d.replica, d.seq) for d in page] == [("pod-new", 3), ("pod-new", 4), ("pod-new", 5)]
        assert store.read_deltas(learner="linucb", version="v", after={**marks, "pod-new": 5}) == []
    for query, params in sent:
        visited, kinds = _rows_visited(fresh_pg_url, query, params)
        assert visited <= 2 * 3, (visited, kinds)  # the page itself (counted, then read); no id behind it
    store.close()


def test_migration_0009_fills_each_id_s_head_and_its_trigger_keeps_it(fresh_pg_url: str) -> None:
    """Deltas written before 0009 get their heads from the backfill; those written after (by any
    release: a plain INSERT, as an older one sends) from the trigger, in the same transaction."""
    from audit import migrate as schema

    schema.upgrade(fresh_pg_url, "0008")
    _history(fresh_pg_url, {"a": 4, "b": 2})
    schema.upgrade(fresh_pg_url)

    def heads() -> dict[str, int]:
        with psycopg.connect(fresh_pg_url) as conn:
            return {r: int(s) for r, s in conn.execute(
                "SELECT replica, last_seq FROM learner_replica_heads WHERE learner = 'linucb' AND version = 'v'")}

    assert heads() == {"a": 4, "b": 2}
    with psycopg.connect(fresh_pg_url) as conn:  # not committed: nobody sees the head before its delta
        conn.execute("INSERT INTO learner_deltas (learner, version, replica, seq, n_features, dn, da, db)"
                     " VALUES ('linucb', 'v', 'b', 3, 1, 1, '', '')")
        assert heads() == {"a": 4, "b": 2}
        conn.commit()
    _history(fresh_pg_url, {"c": 1})
    assert heads() == {"a": 4, "b": 3, "c": 1}
    store = LearnerStore(fresh_pg_url)
    page = store.read_deltas(learner="linucb", version="v", after={"a": 4, "b": 2})
    assert [(d.replica, d.seq) for d in page] == [("b", 3), ("c", 1)]
    store.close()
    schema.downgrade(fresh_pg_url, "0008")  # and back: the table and its trigger go
    _history(fresh_pg_url, {"d": 1})
    with psycopg.connect(fresh_pg_url) as conn:
        assert conn.execute("SELECT to_regclass('learner_replica_heads')").fetchone() == (None,)
