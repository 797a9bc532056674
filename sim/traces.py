"""Trace replay: the Mooncake JSONL release and a generic CSV format.

Mooncake lines are ``{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}``.
Its timestamps come in ~3 s ticks, so arrivals sharing a tick are spread uniformly over it.
The CSV has the header ``timestamp_s,input_tokens,output_tokens[,tenant,session,region]``.
``rate_scale`` multiplies the arrival rate (divides the gaps); the trace repeats to fill the run.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from sim.workload import RequestSpec, Tenant


class TraceRow(NamedTuple):
    t: float
    in_tokens: int
    out_tokens: int
    tenant: str
    session: str
    region: str
    hashes: tuple[int, ...]


class TraceError(ValueError):
    """A trace line that cannot be parsed; names the file and line."""


def read_mooncake(path: str | Path, *, tick_s: float = 3.0, seed: int = 0) -> list[TraceRow]:
    """Parse a Mooncake JSONL trace, spreading same-tick arrivals uniformly over the tick."""
    rng = random.Random(seed)
    raw: list[tuple[float, int, int, tuple[int, ...]]] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
                raw.append((float(o["timestamp"]) / 1000.0, int(o["input_length"]), int(o["output_length"]),
                            tuple(int(h) for h in o.get("hash_ids", ()))))
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{path}:{n}: {exc!r}") from None
    raw.sort(key=lambda r: r[0])
    rows: list[TraceRow] = []
    i = 0
    while i < len(raw):
        j = i
        while j < len(raw) and raw[j][0] == raw[i][0]:
            j += 1
        spread = tick_s if j - i > 1 else 0.0
        offs = sorted(rng.uniform(0.0, spread) for _ in range(j - i))
        for k in range(i, j):
            t, a, b, h = raw[k]
            rows.append(TraceRow(t + offs[k - i], a, b, "", "", "", h))
        i = j
    rows.sort(key=lambda r: r.t)
    return rows


def read_csv(path: str | Path) -> list[TraceRow]:
    """Parse the generic CSV trace; errors name the file and line."""
    rows: list[TraceRow] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"timestamp_s", "input_tokens", "output_tokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise TraceError(f"{path}:1: header must start with timestamp_s,input_tokens,output_tokens")
        for rec in reader:
            try:
                rows.append(TraceRow(float(rec["timestamp_s"]), int(rec["input_tokens"]),
                                     int(rec["output_tokens"]), rec.get("tenant") or "",
                                     rec.get("session") or "", rec.get("region") or "", ()))
            except (TypeError, ValueError) as exc:
                raise TraceError(f"{path}:{reader.line_num}: {exc}") from None
    rows.sort(key=lambda r: r.t)
    return rows


def read_trace(path: str | Path, seed: int = 0) -> list[TraceRow]:
    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        return read_mooncake(p, seed=seed)
    if p.suffix == ".csv":
        return read_csv(p)
    raise TraceError(f"{path}: unknown trace format (expected .jsonl or .csv)")


class TraceWorkload:
    """Replays trace rows, scaled in rate and repeated, mapped onto the scenario's tenants and regions."""

    def __init__(self, rows: Sequence[TraceRow], tenants: Sequence[Tenant], regions: Sequence[str],
                 duration: float, rate_scale: float, seed: int) -> None:
        if not rows:
            raise TraceError("empty trace")
        self.rows = rows
        self.tenants = tuple(tenants)
        self.regions = tuple(regions)
        self.duration = duration
        self.rate_scale = rate_scale
        self.seed = seed

    def __iter__(self) -> Iterator[RequestSpec]:
        rng = random.Random(self.seed)
        by_name = {t.name: i for i, t in enumerate(self.tenants)}
        weights = [t.weight for t in self.tenants]
        t0 = self.rows[0].t
        span = (self.rows[-1].t - t0) + 1.0
        loop = 0
        while True:
            for r in self.rows:
                t = (loop * span + r.t - t0) / self.rate_scale
                if t >= self.duration:
                    return
                ti = by_name.get(r.tenant)
                if ti is None:
                    ti = rng.choices(range(len(self.tenants)), weights)[0]
                ten = self.tenants[ti]
                region = r.region if r.region in self.regions else rng.choice(ten.regions or self.regions)
                yield RequestSpec(t, max(1, r.in_tokens), max(1, r.out_tokens), ti, region, r.session, r.hashes)
            loop += 1
