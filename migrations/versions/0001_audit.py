"""The audit log: decision events (partitioned by day), outcomes, bundles, learner versions, API keys.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = """
-- Append-only decision events, one partition per UTC day (audit.partitions creates them).
-- The trace is zlib-compressed JSON (audit.codec.decompress_trace); the hash chain runs per
-- (day, chain_id) in seq order (audit.codec).
CREATE TABLE decision_events (
    decision_id                 text             NOT NULL,
    decided_at                  timestamptz      NOT NULL,
    chain_id                    text             NOT NULL,
    seq                         bigint           NOT NULL,
    status                      text             NOT NULL CHECK (status IN ('routed', 'denied', 'quota_denied')),
    request_id                  text             NOT NULL,
    tenant                      text             NOT NULL,
    user_tier                   text             NOT NULL,
    model                       text             NOT NULL,
    endpoint_id                 text,
    site_id                     text,
    region                      text,
    tier                        text,
    gpu_type                    text,
    propensity                  double precision,
    policy_revision             text             NOT NULL,
    learner                     text             NOT NULL,
    expected_ttft_ms            double precision,
    expected_cost_per_1k_tokens double precision,
    deny_rules                  text[]           NOT NULL DEFAULT '{}',
    reason                      text             NOT NULL,
    decision_us                 double precision,
    event_version               integer          NOT NULL,
    trace_z                     bytea            NOT NULL,
    prev_hash                   text             NOT NULL,
    hash                        text             NOT NULL,
    PRIMARY KEY (decision_id, decided_at)
) PARTITION BY RANGE (decided_at);

CREATE INDEX decision_events_time ON decision_events (decided_at DESC, decision_id DESC);
CREATE INDEX decision_events_tenant ON decision_events (tenant, decided_at DESC);
CREATE INDEX decision_events_route ON decision_events (endpoint_id, decided_at DESC);
CREATE INDEX decision_events_site ON decision_events (site_id, decided_at DESC);
CREATE INDEX decision_events_region_tier ON decision_events (region, tier, decided_at DESC);
CREATE INDEX decision_events_model ON decision_events (model, decided_at DESC);
CREATE INDEX decision_events_deny_rules ON decision_events USING gin (deny_rules);
CREATE INDEX decision_events_chain ON decision_events (chain_id, seq);

-- Outcomes, joined by decision_id; idempotent on it.
CREATE TABLE outcomes (
    decision_id   text             PRIMARY KEY,
    status        text             NOT NULL CHECK (status IN ('ok', 'error', 'timeout', 'cancelled')),
    ttft_ms       double precision NOT NULL,
    latency_ms    double precision NOT NULL,
    input_tokens  bigint           NOT NULL,
    output_tokens bigint           NOT NULL,
    error         text             NOT NULL DEFAULT '',
    reward        double precision,
    reported_at   timestamptz      NOT NULL,
    event_version integer          NOT NULL
);
CREATE INDEX outcomes_reported_at ON outcomes (reported_at);

CREATE TABLE policy_bundles (
    revision    text        PRIMARY KEY,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    source      text        NOT NULL DEFAULT '',
    manifest    jsonb       NOT NULL DEFAULT '{}'
);

CREATE TABLE learner_versions (
    learner     text        NOT NULL,
    revision    text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    params      jsonb       NOT NULL DEFAULT '{}',
    state       bytea,
    PRIMARY KEY (learner, revision)
);

-- Auditors' API keys: only a SHA-256 of the key is stored.
CREATE TABLE api_keys (
    key_id      text        PRIMARY KEY,
    key_hash    text        NOT NULL UNIQUE,
    name        text        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('auditor', 'admin')),
    tenant      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Every API access, itself logged.
CREATE TABLE api_access_log (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    key_id      text,
    role        text,
    method      text        NOT NULL,
    path        text        NOT NULL,
    query       text        NOT NULL DEFAULT '',
    status      integer     NOT NULL,
    client      text        NOT NULL DEFAULT ''
);
CREATE INDEX api_access_log_at ON api_access_log (at);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS api_access_log;
DROP TABLE IF EXISTS api_keys;
DROP TABLE IF EXISTS learner_versions;
DROP TABLE IF EXISTS policy_bundles;
DROP TABLE IF EXISTS outcomes;
DROP TABLE IF EXISTS decision_events;
"""


def _statements(script: str) -> list[str]:
    lines = [ln for ln in script.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def upgrade() -> None:
    for statement in _statements(UPGRADE):
        op.execute(statement)


def downgrade() -> None:
    for statement in _statements(DOWNGRADE):
        op.execute(statement)
