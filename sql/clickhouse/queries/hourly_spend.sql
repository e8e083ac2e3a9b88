-- Hourly spend per tenant.
SELECT bucket, tenant_id, sum(requests) AS requests, sum(cost) AS total_cost
FROM tally.usage_1h
GROUP BY bucket, tenant_id
ORDER BY bucket, tenant_id
