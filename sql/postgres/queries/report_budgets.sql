-- tally report: budget periods overlapping [$1, $2) (timestamps, NULL: open) of
-- tenant $3 (NULL: every tenant), each with the amount of the budget version in
-- force for the period (migration 0007), highest use first.
WITH spend AS (
    SELECT s.budget_id, b.scope, b.tenant_id, b.team_id, b.period, s.period_start,
           CASE b.period WHEN 'day' THEN s.period_start + 1
                ELSE (s.period_start + interval '1 month')::date END AS period_end,
           s.spent, b.amount AS base_amount, b.effective_from AS base_from
    FROM tally.budget_spend s
    JOIN tally.budgets b USING (budget_id)
    WHERE ($3::text IS NULL OR b.tenant_id = $3)
)
SELECT sp.budget_id, sp.scope, sp.tenant_id, sp.team_id, sp.period, sp.period_start,
       sp.period_end, sp.spent, v.amount, round(100 * sp.spent / v.amount, 2) AS used_pct
FROM spend sp
LEFT JOIN LATERAL (
    SELECT a.amount
    FROM (
        SELECT sp.base_amount AS amount, sp.base_from AS effective_from
        UNION ALL
        SELECT x.amount, x.effective_from FROM tally.budget_versions x WHERE x.budget_id = sp.budget_id
    ) a
    WHERE a.effective_from IS NULL OR a.effective_from <= sp.period_start
    ORDER BY a.effective_from DESC NULLS LAST
    LIMIT 1
) v ON true
WHERE ($1::timestamptz IS NULL OR (sp.period_end::timestamp AT TIME ZONE 'UTC') > $1)
  AND ($2::timestamptz IS NULL OR (sp.period_start::timestamp AT TIME ZONE 'UTC') < $2)
ORDER BY used_pct DESC NULLS LAST, sp.budget_id, sp.period_start
