-- Policy decisions per bucket of occurred_at and (tenant, policy, decision,
-- enforcement), computed in the pipeline like the usage rollups. Each batch writes
-- its own rows (batch_id): read with GROUP BY ... sum(decisions).
CREATE TABLE IF NOT EXISTS tally.policy_decisions_1m
(
    bucket         DateTime('UTC'),
    tenant_id      String,
    policy_id      String,
    decision       String,
    enforcement    String,
    decisions      UInt64,
    evaluation_ms  UInt64,
    batch_id       UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, bucket, policy_id, decision, enforcement);

CREATE TABLE IF NOT EXISTS tally.policy_decisions_1h
(
    bucket         DateTime('UTC'),
    tenant_id      String,
    policy_id      String,
    decision       String,
    enforcement    String,
    decisions      UInt64,
    evaluation_ms  UInt64,
    batch_id       UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, bucket, policy_id, decision, enforcement);

CREATE TABLE IF NOT EXISTS tally.policy_decisions_1d
(
    bucket         DateTime('UTC'),
    tenant_id      String,
    policy_id      String,
    decision       String,
    enforcement    String,
    decisions      UInt64,
    evaluation_ms  UInt64,
    batch_id       UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, bucket, policy_id, decision, enforcement);
