"""Shared fixtures: the demo fleet, a throwaway PostgreSQL database, a Redis URL.

Tests run against real servers. PostgreSQL: ``INFERMESH_TEST_DATABASE_URL`` names an admin
connection (default: the machine's own server on 127.0.0.1:5432); each test session gets its own
database there, dropped at the end. Redis: ``INFERMESH_TEST_REDIS_URL`` (default 127.0.0.1:6379).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit.database import scratch_database
from decision.fleet import Fleet, load_fleet

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("INFERMESH_SHARED", ROOT.parent / "shared"))
ADMIN_URL = os.environ.get("INFERMESH_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("INFERMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def demo_fleet() -> Fleet:
    return load_fleet(ROOT / "deploy" / "demo" / "fleet.yaml")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared data folder {SHARED} not present")
    return SHARED


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, empty database for this test session (migrations are the caller's business)."""
    with scratch_database(ADMIN_URL, "infermesh_test") as url:
        yield url


@pytest.fixture()
def fresh_pg_url() -> Iterator[str]:
    """A fresh, empty database for one test."""
    with scratch_database(ADMIN_URL, "infermesh_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL
