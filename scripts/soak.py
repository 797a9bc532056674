#!/usr/bin/env python3
"""Soak test: measure capacity, then hold 70% of it for 10 minutes; memory must stay flat, errors zero.

Starts ``infermesh serve`` (audit log on, so the writer and PostgreSQL are part of the soak) in a
child process, measures its closed-loop Decide capacity, then offers ``--load`` x capacity with
the open-loop generator of ``infermesh bench load`` in slices, every decision followed by its
outcome (so pending outcomes do not pile up as a fake leak). After each slice it samples the
server's RSS (all its processes). RSS growth is reported from the end of the first slice (warm-up:
imports, caches, connection pools) to the end. The last line is one JSON object.

    .venv/bin/python scripts/soak.py                       # 10 minutes, the real thing
    .venv/bin/python scripts/soak.py --duration 25 --ci    # the shortened CI version

Exit status 1 if any request failed or RSS grew by more than ``--max-growth-mb``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children, MiB."""
    import psutil  # type: ignore[import-untyped]

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may just have exited
            total += p.memory_info().rss
    return total / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "deploy" / "demo" / "infermesh.yaml"))
    ap.add_argument("--duration", type=float, default=600.0, help="seconds at the soak rate (default 600)")
    ap.add_argument("--load", type=float, default=0.7, help="fraction of measured capacity (default 0.7)")
    ap.add_argument("--slice", type=float, default=30.0, help="seconds between RSS samples")
    ap.add_argument("--processes", type=int, default=2, help="client processes")
    ap.add_argument("--capacity-s", type=float, default=5.0, help="seconds of the capacity measurement")
    ap.add_argument("--max-growth-mb", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--ci", action="store_true", help="short slices for a short run")
    args = ap.parse_args(argv)
    if args.ci:
        args.slice = min(args.slice, max(4.0, args.duration / 5))
        args.capacity_s = min(args.capacity_s, 3.0)

    from decision.bench_load import bench_config, capacity, demo_requests, open_loop, running_server

    requests = demo_requests(args.config)
    with tempfile.TemporaryDirectory(prefix="infermesh-soak-") as tmp:
        config = bench_config(args.config, Path(tmp), audit=True)
        env = {"INFERMESH_DATA_DIR": str(Path(tmp) / "data")}
        with running_server(config, workers=args.workers, env=env) as (target, proc, _):
            cap = capacity(target, duration_s=args.capacity_s, processes=args.processes, requests=requests,
                           outcomes=True)  # the soak reports every outcome too
            rate = max(1.0, cap["rps"] * args.load)
            print(f"capacity {cap['rps']:.0f} decisions/s (with outcome reports); soaking at {rate:.0f}/s "
                  f"({args.load:.0%}) for "
                  f"{args.duration:.0f} s, RSS every {args.slice:.0f} s", flush=True)
            samples: list[float] = [rss_mb(proc.pid)]
            errors = completed = late = denied = 0
            by_code: dict[str, int] = {}
            p99s: list[float] = []
            started = time.monotonic()
            while time.monotonic() - started < args.duration - 0.5:
                left = args.duration - (time.monotonic() - started)
                r = open_loop(target, rate=rate, duration_s=min(args.slice, left), processes=args.processes,
                              requests=requests, outcomes=1.0, seed=len(samples))
                errors += r["errors"] + r["dropped"]
                completed += r["completed"]
                late += r["late"]
                denied += r["denied"]
                for k, v in r["errors_by_code"].items():
                    by_code[k] = by_code.get(k, 0) + v
                p99s.append(r["p99_ms"])
                samples.append(rss_mb(proc.pid))
                print(f"  t={time.monotonic() - started:5.0f}s  achieved {r['achieved_rps']:.0f}/s  "
                      f"p99 {r['p99_ms']:.1f} ms  errors {r['errors']}  RSS {samples[-1]:.1f} MiB", flush=True)
    base = samples[1] if len(samples) > 2 else samples[0]
    growth = samples[-1] - base
    ok = errors == 0 and growth <= args.max_growth_mb
    print(f"soak {'passed' if ok else 'FAILED'}: {completed} decisions, {errors} errors, RSS {base:.1f} -> "
          f"{samples[-1]:.1f} MiB ({growth:+.1f} MiB after warm-up; limit {args.max_growth_mb:.0f})")
    print(json.dumps({"capacity_rps": round(cap["rps"], 1), "rate_rps": round(rate, 1),
                      "duration_s": args.duration, "completed": completed, "denied": denied, "errors": errors,
                      "errors_by_code": by_code, "late": late, "rss_mb": [round(x, 1) for x in samples],
                      "rss_growth_mb": round(growth, 1), "max_p99_ms": max(p99s) if p99s else None,
                      "pid": os.getpid(), "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
