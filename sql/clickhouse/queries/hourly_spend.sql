-- Hourly spend per tenant. Runs in clickhouse.database (clickhouse-client
-- --database DB, or ?database=DB over HTTP): the views carry no database name.
SELECT bucket, tenant_id, sum(requests) AS requests, sum(cost) AS total_cost
FROM spend_hourly
GROUP BY bucket, tenant_id
ORDER BY bucket, tenant_id
