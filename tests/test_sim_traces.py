"""Trace parsing: the Mooncake JSONL release and the generic CSV format."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from sim.traces import TraceError, TraceWorkload, read_csv, read_mooncake, read_trace
from sim.workload import Tenant
from tests.conftest import SHARED

MOONCAKE = SHARED / "traces" / "mooncake" / "conversation_trace.jsonl"


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mooncake_fields_and_tick_spreading(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 100, "output_length": 10, "hash_ids": [0, 1]},
        {"timestamp": 0, "input_length": 200, "output_length": 20, "hash_ids": [0, 2]},
        {"timestamp": 3000, "input_length": 300, "output_length": 30, "hash_ids": [5]},
    ])
    rows = read_mooncake(p, seed=3)
    assert len(rows) == 3
    # Two arrivals share the first tick: spread uniformly inside [0, 3) s, in time order.
    assert 0.0 <= rows[0].t <= rows[1].t < 3.0
    assert {r.in_tokens for r in rows[:2]} == {100, 200}
    assert rows[2].t == pytest.approx(3.0) and rows[2].hashes == (5,) and rows[2].out_tokens == 30


def test_mooncake_bad_line_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"timestamp": 1}\n', encoding="utf-8")
    with pytest.raises(TraceError, match=r"bad.jsonl:2"):
        read_mooncake(p)


@pytest.mark.skipif(not MOONCAKE.exists(), reason="shared Mooncake trace not present")
def test_real_mooncake_trace_matches_its_readme() -> None:
    rows = read_trace(MOONCAKE)
    assert len(rows) == 12031
    assert all(a.t <= b.t for a, b in itertools.pairwise(rows))
    assert rows[-1].t == pytest.approx(3537, rel=0.01)
    assert all(r.hashes and r.hashes[0] == 0 for r in rows[:50])  # every request starts with block 0


def test_csv_with_and_without_optional_columns(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("timestamp_s,input_tokens,output_tokens,tenant,session,region\n"
                 "1.5,10,20,acme,s1,eu-west\n0.5,30,40,,,\n", encoding="utf-8")
    rows = read_csv(p)
    assert [r.t for r in rows] == [0.5, 1.5]
    assert rows[1].tenant == "acme" and rows[1].session == "s1" and rows[1].region == "eu-west"
    assert rows[0].tenant == "" and rows[0].in_tokens == 30
    q = tmp_path / "min.csv"
    q.write_text("timestamp_s,input_tokens,output_tokens\n0,1,2\n", encoding="utf-8")
    assert read_csv(q)[0].out_tokens == 2


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("timestamp_s,input_tokens,output_tokens\n0,1,2\nx,1,2\n", encoding="utf-8")
    with pytest.raises(TraceError, match=r"t.csv:3"):
        read_csv(p)
    q = tmp_path / "h.csv"
    q.write_text("time,in,out\n", encoding="utf-8")
    with pytest.raises(TraceError, match="header"):
        read_csv(q)


def test_rate_scale_and_tenant_mapping(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("timestamp_s,input_tokens,output_tokens,tenant\n0,1,2,b\n2,1,2,zzz\n4,1,2,a\n", encoding="utf-8")
    rows = read_csv(p)
    tenants = [Tenant("a", regions=("r1",)), Tenant("b", regions=("r2",))]
    specs = list(TraceWorkload(rows, tenants, ("r1", "r2"), duration=10.0, rate_scale=2.0, seed=0))
    # Twice the rate: gaps halve; the trace repeats (span 5 s -> 2.5 s) to fill 10 s.
    assert [s.t for s in specs[:3]] == [0.0, 1.0, 2.0]
    assert specs[3].t == pytest.approx(2.5)
    assert specs[0].tenant == 1 and specs[0].region == "r2"
    assert specs[2].tenant == 0 and specs[2].region == "r1"
    assert all(s.t < 10.0 for s in specs)
