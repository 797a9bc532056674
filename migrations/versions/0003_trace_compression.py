"""Traces may be stored as raw JSON, compressed by PostgreSQL (lz4 where the server has it).

The writer used to zlib-compress every trace on the service's own interpreter; compressing in
the database backend takes that work off the request process. Rows already stored keep their
zlib bytes: readers tell the two apart by the first byte (``{`` for JSON, ``x`` for zlib).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# lz4 only exists in servers built with it; pglz (the default) otherwise.
UPGRADE = """
DO $$
BEGIN
    ALTER TABLE decision_events ALTER COLUMN trace_z SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available in this server; traces use pglz';
END $$;
"""

DOWNGRADE = """
ALTER TABLE decision_events ALTER COLUMN trace_z SET COMPRESSION default;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
