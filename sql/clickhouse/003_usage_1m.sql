-- Usage rollup per 1m bucket of the event's occurred_at, computed in the pipeline
-- (no materialized view: an 18.16 MV insert can fail after the source insert).
-- Each batch writes its own rows (batch_id), so read it with GROUP BY ... sum(...).
CREATE TABLE IF NOT EXISTS tally.usage_1m
(
    bucket               DateTime('UTC'),
    tenant_id            String,
    team_id              String,
    project_id           String,
    provider             String,
    model                String,
    status               String,
    requests             UInt64,
    input_tokens         UInt64,
    cached_input_tokens  UInt64,
    cache_write_tokens   UInt64,
    output_tokens        UInt64,
    reasoning_tokens     UInt64,
    cost                 Decimal(38, 12),
    unpriced_requests    UInt64,
    batch_id             UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, bucket, team_id, project_id, provider, model, status);
