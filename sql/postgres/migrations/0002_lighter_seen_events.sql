-- seen_events is written once per event: keep its indexes cheap. Owned ids are
-- found through the primary key (INSERT ... RETURNING, and event_id = ANY on a
-- replay), so the batch_id index goes; occurred_at only serves pruning and grows
-- with insertion order, so a BRIN index replaces the B-tree.
DROP INDEX IF EXISTS tally.seen_events_batch;
DROP INDEX IF EXISTS tally.seen_events_occurred_at;
CREATE INDEX seen_events_occurred_at_brin ON tally.seen_events USING brin (occurred_at);
