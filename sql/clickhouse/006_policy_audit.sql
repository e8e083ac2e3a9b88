-- Raw policy decisions and audit events.
CREATE TABLE IF NOT EXISTS tally.policy_decisions
(
    event_id        UUID,
    occurred_at     DateTime('UTC'),
    tenant_id       String,
    team_id         String,
    project_id      String,
    user_id         String,
    source          String,
    decision_id     String,
    request_id      String,
    policy_id       String,
    policy_version  String,
    decision        String,
    enforcement     String,
    severity        String,
    rule_ids        Array(String),
    reason          String,
    evaluation_ms   UInt64,
    batch_id        UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, occurred_at, event_id);

CREATE TABLE IF NOT EXISTS tally.audit_events
(
    event_id       UUID,
    occurred_at    DateTime('UTC'),
    tenant_id      String,
    team_id        String,
    project_id     String,
    user_id        String,
    source         String,
    actor_type     String,
    actor_id       String,
    action         String,
    resource_type  String,
    resource_id    String,
    outcome        String,
    ip             String,
    user_agent     String,
    details        String,
    personal_data  UInt8,
    chain_hash     FixedString(64),
    batch_id       UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, occurred_at, event_id);
