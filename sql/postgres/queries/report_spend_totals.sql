-- tally report: spend_daily totals over the days [$1, $2) (NULL: open) of
-- tenant $3 (NULL: every tenant); compared with the ClickHouse spend section.
SELECT coalesce(sum(requests), 0)::bigint,
       coalesce(sum(cost), 0),
       coalesce(sum(unpriced_requests), 0)::bigint
FROM tally.spend_daily
WHERE ($1::date IS NULL OR day >= $1)
  AND ($2::date IS NULL OR day < $2)
  AND ($3::text IS NULL OR tenant_id = $3)
