"""Alembic, configured in code: ``upgrade(url)`` brings a database to the head revision."""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def sqlalchemy_url(url: str) -> str:
    """A libpq URL as a SQLAlchemy URL with the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise ValueError(f"not a PostgreSQL URL: {url!r}")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def script_heads_and_revisions() -> tuple[set[str], set[str]]:
    """This release's head revisions, and every revision it knows (no database needed)."""
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    return set(script.get_heads()), {r.revision for r in script.walk_revisions()}


# pg_advisory_lock key: replicas starting together on a fresh database migrate one at a time.
MIGRATION_LOCK = 0x1F3E_5A17


def upgrade(url: str, revision: str = "heads") -> None:
    """Run every migration up to ``revision`` (default: all heads), one process at a time."""
    with psycopg.connect(url, autocommit=True) as lock:
        lock.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            command.upgrade(alembic_config(url), revision)
        finally:
            lock.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
