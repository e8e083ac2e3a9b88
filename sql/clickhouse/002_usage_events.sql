-- Raw, enriched usage events. batch_id ties every row to the Postgres batch that
-- wrote it: a replayed batch first checks for its rows, so nothing is inserted twice.
-- Empty string means "none" for team_id, project_id and user_id.
CREATE TABLE IF NOT EXISTS tally.usage_events
(
    event_id             UUID,
    occurred_at          DateTime('UTC'),
    ingested_at          DateTime('UTC'),
    tenant_id            String,
    tenant_known         UInt8,
    team_id              String,
    project_id           String,
    user_id              String,
    source               String,
    request_id           String,
    provider             String,
    model                String,
    status               String,
    input_tokens         UInt64,
    cached_input_tokens  UInt64,
    cache_write_tokens   UInt64,
    output_tokens        UInt64,
    reasoning_tokens     UInt64,
    latency_ms           UInt64,
    cost                 Decimal(38, 12),
    cost_status          String,
    price_effective_from DateTime('UTC'),
    reported_cost        Nullable(Decimal(38, 12)),
    cost_mismatch        UInt8,
    over_quota           UInt8,
    currency             String,
    src_partition        UInt32,
    src_offset           UInt64,
    batch_id             UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, occurred_at, event_id);
