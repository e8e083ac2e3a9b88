-- tally report: dead letters by source topic and error class, recorded in
-- [$1, $2) (NULL: open). Dead letters carry no tenant (a poison message may
-- have none), so the report does not filter them by tenant.
SELECT topic, error_class, count(*)::bigint
FROM tally.dead_letters
WHERE ($1::timestamptz IS NULL OR recorded_at >= $1)
  AND ($2::timestamptz IS NULL OR recorded_at < $2)
GROUP BY topic, error_class
ORDER BY count(*) DESC, topic, error_class
