"""Outcomes get hash chains of their own (audit.codec), so an altered or deleted outcome row is
detected like a decision row.

Chains run per (UTC day reported, writer chain id) in ``seq`` order. Rows stored before this
revision keep empty chain columns: ``audit verify`` counts them as unchained instead of failing.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE outcomes
    ADD COLUMN chain_id  text,
    ADD COLUMN seq       bigint,
    ADD COLUMN prev_hash text,
    ADD COLUMN hash      text;
CREATE INDEX outcomes_chain ON outcomes (chain_id, seq) WHERE chain_id IS NOT NULL;
"""

DOWNGRADE = """
DROP INDEX IF EXISTS outcomes_chain;
ALTER TABLE outcomes DROP COLUMN hash, DROP COLUMN prev_hash, DROP COLUMN seq, DROP COLUMN chain_id;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
