"""Alembic, configured in code: ``upgrade(url)`` brings a database to the head revision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


class UnknownRevision(RuntimeError):
    """The database is at a schema revision this release does not know (a newer release migrated it).

    Alembic cannot upgrade or downgrade from a revision it has no script for; it says "Can't locate
    revision identified by ...". This names what is stored and what this release knows instead.

    Parameters
    ----------
    have : set of str
        The revisions ``alembic_version`` holds.
    heads : set of str
        This release's head revisions.
    """

    def __init__(self, have: set[str], heads: set[str]) -> None:
        super().__init__(f"schema revision {', '.join(sorted(have))} is not one this infermesh knows (it "
                         f"reads {', '.join(sorted(heads))}): a newer release wrote it")
        self.have = have
        self.heads = heads


def stored_revisions(conn: psycopg.Connection[Any]) -> set[str]:
    """The revisions ``alembic_version`` holds; empty when no migration was ever applied."""
    row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return set()
    return {str(r[0]) for r in conn.execute("SELECT version_num FROM alembic_version").fetchall()}


@contextlib.contextmanager
def _migrating(url: str) -> Iterator[None]:
    """Hold the migration lock, having checked that the stored revision is one this release knows."""
    with psycopg.connect(url, autocommit=True) as lock:
        lock.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            heads, known = script_heads_and_revisions()
            have = stored_revisions(lock)
            if have - known:
                raise UnknownRevision(have, heads)
            yield
        finally:
            lock.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def upgrade(url: str, revision: str = "heads") -> None:
    """Run every migration up to ``revision`` (default: all heads), one process at a time.

    Raises
    ------
    UnknownRevision
        The database is at a revision a newer release wrote; nothing is changed.
    """
    with _migrating(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Undo migrations down to ``revision``, under the same lock as :func:`upgrade`.

    Raises
    ------
    UnknownRevision
        The database is at a revision a newer release wrote (only that release can undo it).
    RuntimeError
        A revision refused to go down (0007, while ``outcome_conflicts`` holds links only it allows);
        the whole downgrade is one transaction, so nothing was changed.
    """
    cfg = alembic_config(url)
    cfg.attributes["one_transaction"] = True  # a revision refusing to go down leaves the others up too
    # Unlocked, a replica starting meanwhile would upgrade what is being taken down.
    with _migrating(url):
        command.downgrade(cfg, revision)
