"""A second outcome's chain link is unique per day, not per writer.

Outcome chains run per (UTC day, chain id) and restart at seq 1 each day, so a long-lived
writer's second outcomes on two days can share ``(chain_id, seq)``. Migration 0005 made that pair
unique: the later one was dropped as if it were a replay, leaving a hole that ``audit verify``
reported. ``reported_at`` pins the day (and a replay of the same link has the same one), as
``decision_duplicates`` does with ``decided_at`` (migration 0006).

Writers from before this revision name ``(chain_id, seq)`` as their conflict target and fail
against this index; upgrade them together (the service migrates on start).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UPGRADE = """
DROP INDEX outcome_conflicts_link;
CREATE UNIQUE INDEX outcome_conflicts_link ON outcome_conflicts (chain_id, seq, reported_at);
"""

DOWNGRADE = """
DROP INDEX outcome_conflicts_link;
CREATE UNIQUE INDEX outcome_conflicts_link ON outcome_conflicts (chain_id, seq);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
