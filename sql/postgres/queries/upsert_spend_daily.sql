-- Adds one batch's daily spend deltas ($1..$13 are parallel arrays).
INSERT INTO tally.spend_daily AS s
    (day, tenant_id, team_id, provider, model, requests, input_tokens, cached_input_tokens,
     cache_write_tokens, output_tokens, reasoning_tokens, cost, unpriced_requests)
SELECT * FROM UNNEST($1::date[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
                     $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::numeric[], $13::bigint[])
ON CONFLICT (day, tenant_id, team_id, provider, model) DO UPDATE SET
    requests            = s.requests + EXCLUDED.requests,
    input_tokens        = s.input_tokens + EXCLUDED.input_tokens,
    cached_input_tokens = s.cached_input_tokens + EXCLUDED.cached_input_tokens,
    cache_write_tokens  = s.cache_write_tokens + EXCLUDED.cache_write_tokens,
    output_tokens       = s.output_tokens + EXCLUDED.output_tokens,
    reasoning_tokens    = s.reasoning_tokens + EXCLUDED.reasoning_tokens,
    cost                = s.cost + EXCLUDED.cost,
    unpriced_requests   = s.unpriced_requests + EXCLUDED.unpriced_requests
