"""A decision submitted again keeps its chain link in ``decision_duplicates``.

The writer chains every event before PostgreSQL sees it. A decision submitted a second time (a
client or replica resending it, a batch re-sent after its commit was in doubt but chained anew)
got the next seq of its writer's chain; ``ON CONFLICT (decision_id, decided_at) DO NOTHING`` then
dropped the row, and ``audit verify`` reported the hole as tampering. The row now goes here, at its
chain position, and ``audit verify`` and checkpoints walk ``decision_events`` and this table as one
chain set. The auditors' reads (``audit.repository``) use ``decision_events`` only, so a decision
is still listed once. (A replay of the very link already stored has the same hash and is skipped.)

Not partitioned: rows are rare, so retention deletes them by ``decided_at`` (the day of the
decision they repeat, hence of their chain) when it drops that day's partition.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE decision_duplicates (LIKE decision_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
-- One row per chain link. Chains run per (UTC day, chain id), so (chain_id, seq) alone repeats
-- across the days of a long-lived writer; decided_at pins the day (and a replay hits the same key).
CREATE UNIQUE INDEX decision_duplicates_link ON decision_duplicates (chain_id, seq, decided_at);
CREATE INDEX decision_duplicates_decided_at ON decision_duplicates (decided_at);
"""

DOWNGRADE = """
DROP TABLE decision_duplicates;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
