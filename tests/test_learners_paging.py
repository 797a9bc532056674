"""Replica deltas read in bounded pages: a backlog is caught up page by page, across syncs that fail."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import psycopg
import pytest

from learners.features import FEATURE_NAMES
from learners.linucb import LinUCB
from learners.store import Delta, LearnerStore
from learners.sync import LearnerSync
from tests.test_learners_support import migrate

D = len(FEATURE_NAMES)


def _backlog(store: LearnerStore, key: tuple[str, str], counts: Mapping[str, int], seed: int = 3) -> list[Delta]:
    """Write ``counts[replica]`` deltas (seqs 1..n) of each replica; returns them in (replica, seq) order."""
    rng = np.random.default_rng(seed)
    out = []
    for replica in sorted(counts):
        for seq in range(1, counts[replica] + 1):
            x = rng.random((2, D))
            dA, db = x.T @ x, x.T @ rng.random(2)
            store.write_delta(learner=key[0], version=key[1], replica=replica, seq=seq, dA=dA, db=db, dn=2)
            out.append(Delta(replica, seq, dA, db, 2))
    return out


def _reference(deltas: list[Delta], seed: int) -> LinUCB:
    """A learner that merged every delta at once, in order."""
    ref = LinUCB(D, seed=seed)
    for d in deltas:
        ref.merge(d.dA, d.db, d.dn)
    return ref


class _Recorder:
    """Wraps a store's read_deltas: records each call's marks and page size, fails the calls in ``fail_on``."""

    def __init__(self, store: LearnerStore, fail_on: set[int]) -> None:
        self.read = store.read_deltas
        self.fail_on = fail_on
        self.calls: list[tuple[dict[str, int], int]] = []
        store.read_deltas = self  # type: ignore[method-assign]

    def __call__(self, **kw: Any) -> list[Delta]:
        if len(self.calls) + 1 in self.fail_on:
            self.calls.append((dict(kw["after"]), -1))
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        page = self.read(**kw)
        self.calls.append((dict(kw["after"]), len(page)))
        return page


def test_a_backlog_is_caught_up_page_by_page_and_kept_across_failed_syncs(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    a = LinUCB(D, seed=1)
    store = LearnerStore(fresh_pg_url)
    store.delta_page_rows = 7
    sync = LearnerSync(a, store, FEATURE_NAMES, replica="a")
    deltas = _backlog(LearnerStore(fresh_pg_url), sync.key, {"b": 60, "c": 25})
    rec = _Recorder(store, fail_on={3, 9})  # two pages time out, each in its own sync
    marks_after_each_sync = []
    for _ in range(5):
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            sync.sync()
        marks_after_each_sync.append(dict(sync._marks))
        if sync._marks.get("b") == 60 and sync._marks.get("c") == 25:
            break
    # The failed syncs kept the pages merged before the failure: the first got 2 pages (14 deltas) in.
    assert marks_after_each_sync[0] == {"b": 14}
    assert len(marks_after_each_sync) == 3 and marks_after_each_sync[-1] == {"b": 60, "c": 25}
    # Every page is bounded, and the marks a read starts from never go back.
    assert all(n <= 7 for _, n in rec.calls) and sum(n for _, n in rec.calls if n > 0) == 85
    for (before, _), (later, _) in zip(rec.calls, rec.calls[1:], strict=False):
        assert all(later.get(r, 0) >= seq for r, seq in before.items()), (before, later)
    # Nothing merged twice or skipped: the state is that of a learner that merged the whole backlog at once.
    ref = _reference(deltas, seed=1)
    assert a.n_updates == ref.n_updates == 170
    np.testing.assert_allclose(a.stats.A, ref.stats.A, rtol=1e-12)
    np.testing.assert_allclose(a.stats.b, ref.stats.b, rtol=1e-12)
    assert sync.sync().merged == 0


def test_a_page_is_bounded_in_bytes_but_always_holds_one_delta(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    store = LearnerStore(fresh_pg_url)
    key = ("linucb", "v")
    _backlog(store, key, {"b": 9})
    size = 8 * (D * D + D)  # one delta's arrays
    for bound, rows in ((1, 1), (size, 1), (size + 1, 2), (3 * size, 3), (3 * size + 1, 4), (10**9, 9)):
        store.delta_page_bytes = bound
        page = store.read_deltas(learner=key[0], version=key[1], after={"b": 0})
        assert [d.seq for d in page] == list(range(1, rows + 1)), bound
    store.delta_page_rows = 5
    assert [d.seq for d in store.read_deltas(learner=key[0], version=key[1], after={"b": 2})] == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("replica", ["a", ""])
def test_restore_reads_a_paged_backlog_whole(fresh_pg_url: str, replica: str) -> None:
    migrate(fresh_pg_url)
    probe = LearnerSync(LinUCB(D), LearnerStore(fresh_pg_url), FEATURE_NAMES)
    deltas = _backlog(LearnerStore(fresh_pg_url), probe.key, {replica: 10, "b": 20})
    store = LearnerStore(fresh_pg_url)
    store.delta_page_rows = 3
    restored = LinUCB(D, seed=4)
    sync = LearnerSync(restored, store, FEATURE_NAMES, replica=replica)
    rec = _Recorder(store, fail_on=set())
    # Another replica's deltas exist, so even the single instance merges its own instead of replaying.
    assert sync.restore().deltas == 30
    assert len(rec.calls) > 10 and all(n <= 3 for _, n in rec.calls)
    assert sync._seq == 10 and sync._marks == {replica: 10, "b": 20}
    ref = _reference(deltas, seed=4)
    assert restored.n_updates == ref.n_updates == 60
    np.testing.assert_allclose(restored.stats.A, ref.stats.A, rtol=1e-12)


def test_a_single_instance_that_replays_passes_its_own_paged_deltas(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    probe = LearnerSync(LinUCB(D), LearnerStore(fresh_pg_url), FEATURE_NAMES)
    _backlog(LearnerStore(fresh_pg_url), probe.key, {"": 10})
    store = LearnerStore(fresh_pg_url)
    store.delta_page_rows = 3
    restored = LinUCB(D, seed=4)
    sync = LearnerSync(restored, store, FEATURE_NAMES)
    report = sync.restore()  # its own history: the (empty) log is replayed, its deltas passed
    assert report.deltas == 0 and restored.n_updates == 0
    assert sync._seq == 10 and sync._marks == {"": 10}



def test_the_answer_deadline_is_per_statement_not_per_operation(fresh_pg_url: str) -> None:
    # Statements each well within the statement timeout (1 s; answer deadline 3 s) that together
    # take longer than the deadline: a healthy session must not be cut.
    store = LearnerStore(fresh_pg_url, statement_timeout_s=1.0)
    t0 = time.monotonic()
    with store._using() as conn:
        for _ in range(4):
            conn.execute("SELECT pg_sleep(0.85)")
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    assert time.monotonic() - t0 > 3.0
