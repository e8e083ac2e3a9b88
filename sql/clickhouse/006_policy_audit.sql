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

-- user_id, actor_id (of users) and ip hold keyed pseudonyms, never the values sent.
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
    -- The Merkle log (docs/audit-log.md): position in the tenant's tree, the
    -- event time at full precision, and the pseudonym key version. Together with
    -- the columns above these are exactly the leaf's fields.
    leaf_index             UInt64,
    occurred_at_us         Int64,
    pseudonym_key_version  UInt32,
    batch_id       UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, occurred_at, event_id);
