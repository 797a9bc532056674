"""A second, different outcome for a decision that already has one is kept, not dropped.

Two replicas can each accept an outcome for the same decision (neither has it pending, neither
finds one in the log yet), or a client can report twice across a writer restart. ``outcomes``
keeps the first; the other used to vanish through ``ON CONFLICT DO NOTHING``, leaving a gap in
its writer's outcome chain. It now goes to ``outcome_conflicts`` at its chain position, so no
reported outcome is lost and ``audit verify`` walks both tables as one chain set.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE outcome_conflicts (LIKE outcomes INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
CREATE UNIQUE INDEX outcome_conflicts_link ON outcome_conflicts (chain_id, seq);
CREATE INDEX outcome_conflicts_decision ON outcome_conflicts (decision_id);
CREATE INDEX outcome_conflicts_reported_at ON outcome_conflicts (reported_at);
"""

DOWNGRADE = """
DROP TABLE outcome_conflicts;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
