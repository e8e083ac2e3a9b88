-- Spend by tenant and model over the whole data set, from the daily rollup.
SELECT tenant_id, provider, model, sum(requests) AS requests,
       sum(input_tokens + cached_input_tokens + cache_write_tokens + output_tokens + reasoning_tokens) AS tokens,
       sum(cost) AS total_cost
FROM tally.usage_1d
GROUP BY tenant_id, provider, model
ORDER BY total_cost DESC, tenant_id, provider, model
LIMIT 20
