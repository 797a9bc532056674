"""``infermesh bench learner-store``: a sync's page read against the number of replica ids ever used.

With one replica id per pod, ids pile up across deploys. A reader that is caught up still reads a
page on every sync, and one far behind (a new process starting from an older snapshot) reads
page after page. This measures both, for growing numbers of ids, in one run on one scratch
database: each size has its own learner key, with ``--deltas`` deltas per id.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import psycopg

from learners.store import LearnerStore

_LEARNER = "bench-linucb"


def add_bench_learner_store(bench_sub: Any) -> None:
    """Register ``bench learner-store`` under the lead's ``bench`` subcommand group."""
    p = bench_sub.add_parser("learner-store", help="a sync's page read against the replica ids ever used")
    p.add_argument("--ids", type=int, action="append",
                   help="replica ids ever used (repeatable); default 10, 100, 1000 and 5000")
    p.add_argument("--deltas", type=int, default=3, help="deltas per replica id")
    p.add_argument("--repeat", type=int, default=7, help="reads per timing (the median is shown)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_learner_store)


def _fill(url: str, version: str, ids: int, deltas: int) -> dict[str, int]:
    """``ids`` replica ids with ``deltas`` deltas each (8 features) under (bench learner, ``version``);
    the marks of a reader that has merged them all."""
    a, b = np.eye(8).tobytes(), np.ones(8).tobytes()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO learner_deltas (learner, version, replica, seq, n_features, dn, da, db)"
            " SELECT %s, %s, 'pod-' || lpad(r::text, 6, '0'), s, 8, 1, %s, %s"
            " FROM generate_series(1, %s) r, generate_series(1, %s) s", (_LEARNER, version, a, b, ids, deltas))
        conn.execute("ANALYZE learner_deltas")
        conn.execute("ANALYZE learner_replica_heads")
    return {f"pod-{r:06d}": deltas for r in range(1, ids + 1)}


def _median_ms(read: Any, repeat: int) -> float:
    read()  # warm: plans, caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        read()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _cold_start(store: LearnerStore, version: str) -> tuple[float, int, int]:
    """A reader with no marks reads every delta page by page: (ms, pages, deltas)."""
    marks: dict[str, int] = {}
    pages = deltas = 0
    t0 = time.perf_counter()
    while page := store.read_deltas(learner=_LEARNER, version=version, after=marks):
        pages += 1
        deltas += len(page)
        for d in page:
            marks[d.replica] = max(marks.get(d.replica, 0), d.seq)
    return 1e3 * (time.perf_counter() - t0), pages, deltas


def measure(url: str, sizes: list[int], deltas: int, repeat: int) -> list[dict[str, float]]:
    """For each number of ids: a caught-up page, a page with one id's news, and a cold start."""
    rows = []
    store = LearnerStore(url)
    try:
        for ids in sizes:
            version = f"ids-{ids}"
            marks = _fill(url, version, ids, deltas)
            news = dict(marks)
            news[next(iter(marks))] = deltas - 1  # one id has one delta the reader has not merged

            def caught_up(m: dict[str, int] = marks, v: str = version) -> None:
                assert store.read_deltas(learner=_LEARNER, version=v, after=m) == []

            def one_new(m: dict[str, int] = news, v: str = version) -> None:
                assert len(store.read_deltas(learner=_LEARNER, version=v, after=m)) == 1

            cold_ms, pages, read = _cold_start(store, version)
            rows.append({"ids": ids, "caught_up_ms": round(_median_ms(caught_up, repeat), 2),
                         "one_new_ms": round(_median_ms(one_new, repeat), 2), "cold_start_ms": round(cold_ms, 1),
                         "cold_start_pages": pages, "cold_start_deltas": read})
    finally:
        store.close()
    return rows


def cmd_bench_learner_store(args: argparse.Namespace) -> int:
    from audit import database

    sizes = sorted(set(args.ids or [10, 100, 1000, 5000]))
    if sizes[0] < 1 or args.deltas < 1 or args.repeat < 1:
        print("infermesh bench learner-store: --ids, --deltas and --repeat must be at least 1")
        return 2
    server_url, _server = database.resolve_url()
    with database.scratch_database(server_url, "infermesh_bench") as url:
        database.prepare(url)
        rows = measure(url, sizes, args.deltas, args.repeat)
    print(f"learner store: a sync's page read, {args.deltas} deltas per replica id (median of {args.repeat} reads)")
    print(f"  {'replica ids':>12} {'caught up ms':>13} {'one new ms':>11} {'cold start ms':>14} {'pages':>6}")
    for r in rows:
        print(f"  {r['ids']:>12,} {r['caught_up_ms']:>13.2f} {r['one_new_ms']:>11.2f} {r['cold_start_ms']:>14.1f} "
              f"{r['cold_start_pages']:>6}")
    growth = rows[-1]["caught_up_ms"] / rows[0]["caught_up_ms"] if rows[0]["caught_up_ms"] else float("nan")
    print(f"  a caught-up page at {rows[-1]['ids']:,} ids costs x{growth:.1f} what it costs at {rows[0]['ids']:,}")
    if args.json:
        print(json.dumps({"rows": rows, "caught_up_growth": round(growth, 2)}))
    return 0
