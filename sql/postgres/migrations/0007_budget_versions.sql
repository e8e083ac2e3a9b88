-- Effective-dated budgets (`tally budgets import`, docs/operations.md).
-- The tally.budgets row holds a budget's identity and its first version:
-- effective_from NULL means in force from the beginning (what `tally seed`
-- writes). Later versions live in tally.budget_versions. The version in force
-- for a budget period is the one with the greatest effective_from on or before
-- the period's first day; spend of periods before the first version is not
-- counted towards the budget.
ALTER TABLE tally.budgets ADD COLUMN effective_from date;

CREATE TABLE tally.budget_versions (
    budget_id       text NOT NULL REFERENCES tally.budgets (budget_id),
    effective_from  date NOT NULL,
    amount          numeric NOT NULL CHECK (amount > 0),
    thresholds_pct  numeric[] NOT NULL,
    PRIMARY KEY (budget_id, effective_from)
);
