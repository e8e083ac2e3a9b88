-- Spend by tenant and model over the whole data set (add a WHERE on bucket for
-- a range). Runs in clickhouse.database: the views carry no database name.
SELECT tenant_id, provider, model, sum(requests) AS requests, sum(tokens) AS tokens,
       sum(cost) AS total_cost
FROM spend_hourly
GROUP BY tenant_id, provider, model
ORDER BY total_cost DESC, tenant_id, provider, model
LIMIT 20
