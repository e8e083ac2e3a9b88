-- tally report: violations by rule whose window overlaps [$1, $2) (NULL: open;
-- a window of one instant counts when the instant is in the range), of tenant
-- $3 (NULL: every tenant); how many were raised and published.
SELECT rule, count(*)::bigint, count(published_at)::bigint
FROM tally.violations
WHERE ($2::timestamptz IS NULL OR window_start < $2)
  AND ($1::timestamptz IS NULL OR window_end > $1 OR window_start >= $1)
  AND ($3::text IS NULL OR tenant_id = $3)
GROUP BY rule
ORDER BY rule
