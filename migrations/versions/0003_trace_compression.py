"""Traces may be stored as raw JSON, compressed by PostgreSQL (lz4 where the server has it).

The writer used to zlib-compress every trace on the service's own interpreter; compressing in
the database backend takes that work off the request process. Rows already stored keep their
zlib bytes: readers tell the two apart by the first byte (``{`` for JSON, ``x`` for zlib).

Only ``decision_events`` itself is altered: day partitions created after this revision inherit
lz4; those that already existed keep the server's default (pglz). No later revision sets lz4 on
them, on purpose: ``SET COMPRESSION`` affects only values written afterwards, and those partitions
get few. On a database that passed this revision earlier they are past days (written to only by a
late spool replay); on one upgraded now, today and the ``audit.partitions_ahead_days`` days ahead
created before it. Their traces in pglz are stored and read alike. Against that, the ``ALTER
TABLE`` takes an ACCESS EXCLUSIVE lock on each partition at the service's start (waiting behind an
auditor's long export, the writer's inserts waiting behind it), and a new head revision makes
every older release's readers refuse the log.

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
