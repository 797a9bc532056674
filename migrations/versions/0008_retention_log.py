"""A log of retention runs: which days were dropped, when, and the cutoff that follows.

The cutoff is what lets the rest of the audit log tell a day retention dropped from a day whose
rows are missing: the writer does not recreate a dropped day's partition when a spooled batch of
that day is replayed late (its rows are expired, and counted), and ``audit verify --checkpoint``
reports a head on such a day as retired even when retention dropped every partition there was.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE audit_retention (
    id bigserial PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    cutoff date NOT NULL,              -- days before this one are gone
    dropped_days date[] NOT NULL
);
"""

DOWNGRADE = "DROP TABLE audit_retention;"


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
