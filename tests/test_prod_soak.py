"""The shortened soak (scripts/soak.py --ci): ~25 s at 70% of measured capacity, audit log on."""

from __future__ import annotations

import json
import subprocess

from tests.test_prod_support import PYTHON, ROOT


def test_short_soak_has_no_errors_and_bounded_memory_growth(pg_url: str) -> None:
    env = {"INFERMESH_DATABASE_URL": pg_url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([PYTHON, str(ROOT / "scripts" / "soak.py"), "--duration", "24", "--ci",
                          "--max-growth-mb", "40"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip(), f"soak printed nothing (exit {out.returncode}): {out.stderr[-3000:]}"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["completed"] > 0, out.stdout
    assert report["errors"] == 0, report
    assert report["rss_growth_mb"] <= 40, report
    assert out.returncode == 0, out.stdout
