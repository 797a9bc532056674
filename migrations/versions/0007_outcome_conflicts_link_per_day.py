"""A second outcome's chain link is unique per day, not per writer.

Outcome chains run per (UTC day, chain id) and restart at seq 1 each day, so a long-lived
writer's second outcomes on two days can share ``(chain_id, seq)``. Migration 0005 made that pair
unique: the later one was dropped as if it were a replay, leaving a hole that ``audit verify``
reported. ``reported_at`` pins the day (and a replay of the same link has the same one), as
``decision_duplicates`` does with ``decided_at`` (migration 0006).

Writers from before this revision name ``(chain_id, seq)`` as their conflict target and fail
against this index; upgrade them together (the service migrates on start).

The downgrade refuses, changing nothing, once two days share a ``(chain_id, seq)``: revision 0006
holds one row per pair, and dropping either would cut a link out of its day's outcome chain.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
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


# One (chain_id, seq) on several days: the pairs 0006's index cannot hold, and the first of them.
CLASHES = """
SELECT count(*) OVER (), chain_id, seq, array_agg(DISTINCT (reported_at AT TIME ZONE 'UTC')::date)
FROM outcome_conflicts GROUP BY chain_id, seq HAVING count(*) > 1 ORDER BY min(reported_at) LIMIT 1
"""


def downgrade() -> None:
    clash = op.get_bind().execute(sa.text(CLASHES)).first()
    if clash is not None:
        pairs, chain_id, seq, reported = clash
        days = " and ".join(d.isoformat() for d in sorted(reported))
        raise RuntimeError(
            f"cannot downgrade below revision 0007: outcome_conflicts holds {pairs} (chain_id, seq) pair(s) on "
            f"more than one day (the first: chain {chain_id} seq {seq}, reported {days}); revision 0006 keeps "
            "one row per (chain_id, seq), and dropping the others would cut links out of their days' outcome "
            "chains (audit verify would fail). Nothing was changed: stay at 0007 or later")
    op.execute(DOWNGRADE)
