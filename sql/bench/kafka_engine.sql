-- The peer `tally-bench` measures tally against: ClickHouse's own Kafka table engine,
-- set up the way a ClickHouse user would on 18.16 (../shared facts: the server needs
-- <kafka><auto_offset_reset>smallest</auto_offset_reset> and a large
-- receive_message_max_bytes in its config). Placeholders: {db} {brokers} {topic} {group}.
--
-- What this pipeline does NOT do, unlike tally: it dedups nothing (a re-sent event counts
-- twice), prices nothing (cost 0, every request unpriced: no Postgres reference data),
-- dead-letters nothing (a row that fails a view stops that view), keeps no spend, quota
-- or budget state and raises no violations; it commits Kafka offsets after a block is
-- written, so a crash in between writes that block again.
CREATE DATABASE IF NOT EXISTS {db};

-- The topic as a table: one consumer, blocks of up to 100k rows (the faster setting
-- measured on this machine; the default block size was ~20% slower).
CREATE TABLE {db}.usage_queue
(
    event_id            String,
    occurred_at         String,
    tenant_id           String,
    team_id             Nullable(String),
    project_id          Nullable(String),
    user_id             Nullable(String),
    source              String,
    request_id          String,
    provider            String,
    model               String,
    input_tokens        Int64,
    cached_input_tokens Int64,
    cache_write_tokens  Int64,
    output_tokens       Int64,
    reasoning_tokens    Int64,
    latency_ms          Int64,
    status              String,
    reported_cost       Nullable(String),
    currency            String
)
ENGINE = Kafka SETTINGS
    kafka_broker_list = '{brokers}',
    kafka_topic_list = '{topic}',
    kafka_group_name = '{group}',
    kafka_format = 'JSONEachRow',
    kafka_max_block_size = 100000;

-- The raw table: the columns of tally's usage_events.
CREATE TABLE {db}.usage_events
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

-- Rollups as a ClickHouse user builds them: SummingMergeTree fed by views over the queue.
CREATE TABLE {db}.usage_1m
(
    bucket              DateTime('UTC'),
    tenant_id           String,
    team_id             String,
    project_id          String,
    provider            String,
    model               String,
    status              String,
    requests            UInt64,
    input_tokens        UInt64,
    cached_input_tokens UInt64,
    cache_write_tokens  UInt64,
    output_tokens       UInt64,
    reasoning_tokens    UInt64,
    cost                Decimal(38, 12),
    unpriced_requests   UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, bucket, team_id, project_id, provider, model, status);

CREATE TABLE {db}.usage_1h AS {db}.usage_1m;

CREATE TABLE {db}.usage_1d AS {db}.usage_1m;

-- Every SELECT casts to the exact target types (18.16 fails the insert otherwise).
CREATE MATERIALIZED VIEW {db}.usage_events_mv TO {db}.usage_events AS
SELECT
    toUUID(event_id) AS event_id,
    parseDateTimeBestEffort(occurred_at) AS occurred_at,
    now() AS ingested_at,
    tenant_id,
    toUInt8(1) AS tenant_known,
    ifNull(team_id, '') AS team_id,
    ifNull(project_id, '') AS project_id,
    ifNull(user_id, '') AS user_id,
    source,
    request_id,
    provider,
    model,
    status,
    toUInt64(input_tokens) AS input_tokens,
    toUInt64(cached_input_tokens) AS cached_input_tokens,
    toUInt64(cache_write_tokens) AS cache_write_tokens,
    toUInt64(output_tokens) AS output_tokens,
    toUInt64(reasoning_tokens) AS reasoning_tokens,
    toUInt64(latency_ms) AS latency_ms,
    toDecimal128(0, 12) AS cost,
    'unpriced' AS cost_status,
    toDateTime(0, 'UTC') AS price_effective_from,
    if(isNull(reported_cost), NULL, toDecimal128(ifNull(reported_cost, '0'), 12)) AS reported_cost,
    toUInt8(0) AS cost_mismatch,
    toUInt8(0) AS over_quota,
    currency,
    toUInt32(0) AS src_partition,
    toUInt64(0) AS src_offset,
    toUInt64(0) AS batch_id
FROM {db}.usage_queue;

CREATE MATERIALIZED VIEW {db}.usage_1m_mv TO {db}.usage_1m AS
SELECT
    toStartOfMinute(parseDateTimeBestEffort(occurred_at)) AS bucket,
    tenant_id,
    ifNull(team_id, '') AS team_id,
    ifNull(project_id, '') AS project_id,
    provider,
    model,
    status,
    toUInt64(count()) AS requests,
    toUInt64(sum(input_tokens)) AS input_tokens,
    toUInt64(sum(cached_input_tokens)) AS cached_input_tokens,
    toUInt64(sum(cache_write_tokens)) AS cache_write_tokens,
    toUInt64(sum(output_tokens)) AS output_tokens,
    toUInt64(sum(reasoning_tokens)) AS reasoning_tokens,
    toDecimal128(0, 12) AS cost,
    toUInt64(count()) AS unpriced_requests
FROM {db}.usage_queue
GROUP BY bucket, tenant_id, team_id, project_id, provider, model, status;

CREATE MATERIALIZED VIEW {db}.usage_1h_mv TO {db}.usage_1h AS
SELECT
    toStartOfHour(parseDateTimeBestEffort(occurred_at)) AS bucket,
    tenant_id,
    ifNull(team_id, '') AS team_id,
    ifNull(project_id, '') AS project_id,
    provider,
    model,
    status,
    toUInt64(count()) AS requests,
    toUInt64(sum(input_tokens)) AS input_tokens,
    toUInt64(sum(cached_input_tokens)) AS cached_input_tokens,
    toUInt64(sum(cache_write_tokens)) AS cache_write_tokens,
    toUInt64(sum(output_tokens)) AS output_tokens,
    toUInt64(sum(reasoning_tokens)) AS reasoning_tokens,
    toDecimal128(0, 12) AS cost,
    toUInt64(count()) AS unpriced_requests
FROM {db}.usage_queue
GROUP BY bucket, tenant_id, team_id, project_id, provider, model, status;

CREATE MATERIALIZED VIEW {db}.usage_1d_mv TO {db}.usage_1d AS
SELECT
    toStartOfDay(parseDateTimeBestEffort(occurred_at)) AS bucket,
    tenant_id,
    ifNull(team_id, '') AS team_id,
    ifNull(project_id, '') AS project_id,
    provider,
    model,
    status,
    toUInt64(count()) AS requests,
    toUInt64(sum(input_tokens)) AS input_tokens,
    toUInt64(sum(cached_input_tokens)) AS cached_input_tokens,
    toUInt64(sum(cache_write_tokens)) AS cache_write_tokens,
    toUInt64(sum(output_tokens)) AS output_tokens,
    toUInt64(sum(reasoning_tokens)) AS reasoning_tokens,
    toDecimal128(0, 12) AS cost,
    toUInt64(count()) AS unpriced_requests
FROM {db}.usage_queue
GROUP BY bucket, tenant_id, team_id, project_id, provider, model, status
