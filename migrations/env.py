"""Alembic environment of the InferMesh schema (configured in code by :mod:`audit.migrate`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config
_configured = config.get_main_option("sqlalchemy.url")
if not _configured:
    raise RuntimeError("sqlalchemy.url is not set (use audit.migrate.upgrade(url))")
url: str = _configured


def run_offline() -> None:
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        # A downgrade is one transaction (audit.migrate.downgrade): one that a revision refuses part
        # way (0007 with data only it allows) then leaves the database as it was, not half taken down.
        whole = bool(config.attributes.get("one_transaction", False))
        context.configure(connection=connection, transaction_per_migration=not whole)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
