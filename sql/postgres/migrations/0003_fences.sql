-- Fences that close the exactly-once holes found in review (issue 6).

-- Ownership epochs. Taking a partition (after its advisory lock) bumps the
-- epoch; claims, commits and every ClickHouse insert check that the epoch is
-- still the one the batch was started under, so a stale owner cannot write.
CREATE TABLE tally.partition_owners (
    group_id   text NOT NULL,
    topic      text NOT NULL,
    partition  integer NOT NULL,
    epoch      bigint NOT NULL,
    owner      text NOT NULL,
    taken_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- What the first attempt of a batch decided, so that a replay decides the same:
-- the owner epoch of the latest attempt, how many attempts ran, the reference
-- snapshot it enriched with, and the dedup clock and cutoff it applied.
ALTER TABLE tally.batches ADD COLUMN attempts integer NOT NULL DEFAULT 1;
ALTER TABLE tally.batches ADD COLUMN owner_epoch bigint;
ALTER TABLE tally.batches ADD COLUMN reference_version text;
ALTER TABLE tally.batches ADD COLUMN clock_at timestamptz;
ALTER TABLE tally.batches ADD COLUMN dedup_cutoff timestamptz;

-- The dedup cutoff each partition has applied so far (never moves back). Pruning
-- of seen_events stays below the smallest one.
ALTER TABLE tally.consumer_offsets ADD COLUMN dedup_cutoff timestamptz;

-- Reference snapshots (tenants, prices, budgets) by content hash.
CREATE TABLE tally.reference_snapshots (
    version     text PRIMARY KEY,
    body        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- seen_events.event_id now holds the tenant-scoped dedup key
-- (UUID v5 of tenant and event id), and fingerprint the event's content hash:
-- a re-send with the same key and another payload is a conflict, dead-lettered.
-- Rows written before this migration (bare event ids, no fingerprint) age out
-- within the look-back.
ALTER TABLE tally.seen_events ADD COLUMN fingerprint bigint;
