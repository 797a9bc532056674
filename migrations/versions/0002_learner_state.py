"""Learner state: snapshots by learner name and version, and replica deltas of linear models.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = """
-- Snapshots of a learner's learned state (JSON: ridge statistics, generator state). Restored on
-- start; outcomes reported after ``watermark`` are replayed from the audit log on top of it.
-- ``delta_marks`` maps replica id -> the last delta seq already folded into ``state``.
CREATE TABLE learner_snapshots (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    learner     text        NOT NULL,
    version     text        NOT NULL,
    replica     text        NOT NULL DEFAULT '',
    taken_at    timestamptz NOT NULL DEFAULT now(),
    watermark   timestamptz NOT NULL,
    n_updates   bigint      NOT NULL,
    delta_marks jsonb       NOT NULL DEFAULT '{}',
    state       jsonb       NOT NULL
);
CREATE INDEX learner_snapshots_latest ON learner_snapshots (learner, version, id DESC);

-- Additive increments (dA, db, dn) of a linear learner's sufficient statistics, one row per
-- replica sync; numbered per replica so a reader never skips a late-committing row.
CREATE TABLE learner_deltas (
    learner     text        NOT NULL,
    version     text        NOT NULL,
    replica     text        NOT NULL,
    seq         bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    n_features  integer     NOT NULL,
    dn          bigint      NOT NULL,
    da          bytea       NOT NULL,
    db          bytea       NOT NULL,
    PRIMARY KEY (learner, version, replica, seq)
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS learner_deltas;
DROP TABLE IF EXISTS learner_snapshots;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
