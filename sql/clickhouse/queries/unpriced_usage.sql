-- Requests that had no price in force (counted, not dropped). Runs in
-- clickhouse.database: the views carry no database name.
SELECT tenant_id, provider, model, sum(requests) AS requests
FROM unpriced_usage_hourly
GROUP BY tenant_id, provider, model
ORDER BY requests DESC, tenant_id, provider, model
