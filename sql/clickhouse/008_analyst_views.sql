-- Analyst views: what `tally report` reads from ClickHouse, and the interface for
-- ad-hoc queries (sql/clickhouse/queries/). `tally migrate` installs them in
-- clickhouse.database (every `tally.` below becomes that database) and re-creates
-- them on every run (a view holds no data), so a changed definition reaches
-- databases migrated before. Every view is grouped by the hour bucket of the
-- event's occurred_at: filter on `bucket` and sum the measures.

-- Usage and exact cost (Decimal(38, 12)) per hour, tenant, team, project, model.
CREATE VIEW IF NOT EXISTS tally.spend_hourly AS
SELECT bucket, tenant_id, team_id, project_id, provider, model,
       sum(requests) AS requests,
       sum(input_tokens + cached_input_tokens + cache_write_tokens + output_tokens + reasoning_tokens) AS tokens,
       sum(cost) AS cost,
       sum(unpriced_requests) AS unpriced_requests
FROM tally.usage_1h
GROUP BY bucket, tenant_id, team_id, project_id, provider, model;

-- Requests that had no price in force (counted, not dropped), per hour.
CREATE VIEW IF NOT EXISTS tally.unpriced_usage_hourly AS
SELECT toStartOfHour(occurred_at) AS bucket, tenant_id, provider, model, count() AS requests
FROM tally.usage_events
WHERE cost_status = 'unpriced'
GROUP BY bucket, tenant_id, provider, model;

-- Policy decisions per hour, tenant, policy, decision and enforcement.
CREATE VIEW IF NOT EXISTS tally.policy_decisions_hourly AS
SELECT bucket, tenant_id, policy_id, decision, enforcement,
       sum(decisions) AS decisions,
       sum(evaluation_ms) AS evaluation_ms
FROM tally.policy_decisions_1h
GROUP BY bucket, tenant_id, policy_id, decision, enforcement;

-- Audit events (leaves of the tenants' logs) per hour and tenant.
CREATE VIEW IF NOT EXISTS tally.audit_events_hourly AS
SELECT toStartOfHour(occurred_at) AS bucket, tenant_id,
       count() AS events,
       sum(personal_data) AS personal_data_events
FROM tally.audit_events
GROUP BY bucket, tenant_id;
