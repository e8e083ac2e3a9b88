-- Requests that had no price in force (counted, not dropped).
SELECT tenant_id, provider, model, count() AS requests
FROM tally.usage_events
WHERE cost_status = 'unpriced'
GROUP BY tenant_id, provider, model
ORDER BY requests DESC
