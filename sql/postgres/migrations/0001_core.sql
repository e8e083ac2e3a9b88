-- tally core schema: reference data, spend, budgets, violations (outbox) and the
-- pipeline's own exactly-once progress. Money is NUMERIC, never float.
CREATE SCHEMA IF NOT EXISTS tally;

CREATE TABLE tally.tenants (
    tenant_id            text PRIMARY KEY,
    name                 text NOT NULL,
    requests_per_minute  bigint CHECK (requests_per_minute IS NULL OR requests_per_minute > 0),
    tokens_per_minute    bigint CHECK (tokens_per_minute IS NULL OR tokens_per_minute > 0),
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tally.teams (
    tenant_id  text NOT NULL REFERENCES tally.tenants (tenant_id),
    team_id    text NOT NULL,
    name       text NOT NULL,
    PRIMARY KEY (tenant_id, team_id)
);

CREATE TABLE tally.projects (
    tenant_id   text NOT NULL REFERENCES tally.tenants (tenant_id),
    project_id  text NOT NULL,
    name        text NOT NULL,
    PRIMARY KEY (tenant_id, project_id)
);

-- Price book: prices per 1M tokens, one row per (provider, model) version.
-- At most 6 decimals per price so that every cost is exact at scale 12.
CREATE TABLE tally.prices (
    provider            text NOT NULL,
    model               text NOT NULL,
    effective_from      timestamptz NOT NULL,
    currency            char(3) NOT NULL DEFAULT 'USD',
    input_per_m         numeric NOT NULL CHECK (input_per_m >= 0 AND input_per_m = round(input_per_m, 6)),
    cached_input_per_m  numeric NOT NULL CHECK (cached_input_per_m >= 0 AND cached_input_per_m = round(cached_input_per_m, 6)),
    cache_write_per_m   numeric NOT NULL CHECK (cache_write_per_m >= 0 AND cache_write_per_m = round(cache_write_per_m, 6)),
    output_per_m        numeric NOT NULL CHECK (output_per_m >= 0 AND output_per_m = round(output_per_m, 6)),
    reasoning_per_m     numeric NOT NULL CHECK (reasoning_per_m >= 0 AND reasoning_per_m = round(reasoning_per_m, 6)),
    PRIMARY KEY (provider, model, effective_from)
);

CREATE TABLE tally.budgets (
    budget_id       text PRIMARY KEY,
    scope           text NOT NULL CHECK (scope IN ('tenant', 'team')),
    tenant_id       text NOT NULL,
    team_id         text,
    period          text NOT NULL CHECK (period IN ('day', 'month')),
    amount          numeric NOT NULL CHECK (amount > 0),
    thresholds_pct  numeric[] NOT NULL DEFAULT '{50,80,100}',
    CHECK ((scope = 'team') = (team_id IS NOT NULL))
);

-- Spend per budget and period, advanced in the same transaction as the offsets.
CREATE TABLE tally.budget_spend (
    budget_id     text NOT NULL REFERENCES tally.budgets (budget_id),
    period_start  date NOT NULL,
    spent         numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (budget_id, period_start)
);

-- team_id '' means "no team" so the key stays a plain primary key.
CREATE TABLE tally.spend_daily (
    day                  date NOT NULL,
    tenant_id            text NOT NULL,
    team_id              text NOT NULL DEFAULT '',
    provider             text NOT NULL,
    model                text NOT NULL,
    requests             bigint NOT NULL DEFAULT 0,
    input_tokens         bigint NOT NULL DEFAULT 0,
    cached_input_tokens  bigint NOT NULL DEFAULT 0,
    cache_write_tokens   bigint NOT NULL DEFAULT 0,
    output_tokens        bigint NOT NULL DEFAULT 0,
    reasoning_tokens     bigint NOT NULL DEFAULT 0,
    cost                 numeric NOT NULL DEFAULT 0,
    unpriced_requests    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant_id, team_id, provider, model)
);

-- Requests and tokens per tenant and event-time minute, for quota violations.
CREATE TABLE tally.quota_usage (
    tenant_id  text NOT NULL,
    minute     timestamptz NOT NULL,
    requests   bigint NOT NULL DEFAULT 0,
    tokens     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, minute)
);

-- Violations, and the outbox the relay publishes from (published_at IS NULL).
CREATE TABLE tally.violations (
    violation_id        uuid PRIMARY KEY,
    rule                text NOT NULL,
    severity            text NOT NULL,
    tenant_id           text NOT NULL,
    subject_type        text NOT NULL,
    subject_id          text NOT NULL,
    window_start        timestamptz NOT NULL,
    window_end          timestamptz NOT NULL,
    observed            numeric NOT NULL,
    threshold           numeric NOT NULL,
    evidence_event_ids  text[] NOT NULL DEFAULT '{}',
    detected_at         timestamptz NOT NULL,
    message             text NOT NULL,
    published_at        timestamptz
);
CREATE INDEX violations_unpublished ON tally.violations (detected_at) WHERE published_at IS NULL;

-- The offset of record: where each partition resumes. Kafka's committed offsets
-- are only a copy for lag tooling.
CREATE TABLE tally.consumer_offsets (
    group_id     text NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint NOT NULL,
    -- newest message timestamp committed; bounds seen_events pruning
    last_message_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Batches: a deterministic offset range per partition. 'pending' between the
-- claim and the final commit; a pending batch is replayed exactly after a crash.
CREATE TABLE tally.batches (
    batch_id      bigserial PRIMARY KEY,
    group_id      text NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    first_offset  bigint NOT NULL,
    last_offset   bigint NOT NULL,
    state         text NOT NULL CHECK (state IN ('pending', 'done')),
    events        integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    done_at       timestamptz
);
CREATE UNIQUE INDEX batches_one_pending ON tally.batches (group_id, topic, partition) WHERE state = 'pending';

-- Event ids already counted, within the dedup look-back (pruned by occurred_at).
CREATE TABLE tally.seen_events (
    event_id     uuid PRIMARY KEY,
    occurred_at  timestamptz NOT NULL,
    batch_id     bigint NOT NULL
);
CREATE INDEX seen_events_occurred_at ON tally.seen_events (occurred_at);
CREATE INDEX seen_events_batch ON tally.seen_events (batch_id);

-- Every message sent to the dead-letter topic, exactly once per source offset.
CREATE TABLE tally.dead_letters (
    topic          text NOT NULL,
    partition      integer NOT NULL,
    "offset"       bigint NOT NULL,
    error_class    text NOT NULL,
    error_message  text NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);

-- Outbox relay: topic end offsets noted before a publish attempt, so a crashed
-- attempt can be reconciled by reading the topic instead of publishing twice.
CREATE TABLE tally.relay_attempts (
    attempt_id     bigserial PRIMARY KEY,
    topic          text NOT NULL,
    end_offsets    bigint[] NOT NULL,
    violation_ids  uuid[] NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
