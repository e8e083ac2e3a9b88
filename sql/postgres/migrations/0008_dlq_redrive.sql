-- `tally dlq redrive` (consumers/src/redrive/): which dead letters were fed back
-- to their input topic, so a second run does not re-produce them (unless --again),
-- and a run that died between producing and recording is reconciled from the topic.

CREATE TABLE tally.dlq_redrive_runs (
    run_id        bigserial PRIMARY KEY,
    dlq_topic     text NOT NULL,
    target_topic  text NOT NULL,
    classes       text[] NOT NULL,
    again         boolean NOT NULL,
    -- The input topic's end offsets (index = partition) before the run produced
    -- anything: its sends are at or after these.
    target_start  bigint[] NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    produced      bigint NOT NULL DEFAULT 0
);

-- One row per dead letter redriven (the DLQ message), `sending` from before it
-- is produced until the broker acknowledged it, then `sent` with where it landed.
CREATE TABLE tally.dlq_redrives (
    dlq_topic         text NOT NULL,
    dlq_partition     integer NOT NULL,
    dlq_offset        bigint NOT NULL,
    error_class       text NOT NULL,
    source_topic      text NOT NULL,
    source_partition  integer NOT NULL,
    source_offset     bigint NOT NULL,
    target_topic      text NOT NULL,
    run_id            bigint NOT NULL REFERENCES tally.dlq_redrive_runs (run_id),
    state             text NOT NULL CHECK (state IN ('sending', 'sent')),
    -- A send of this row's run can no longer land after this (producer timeout).
    settle_after      timestamptz NOT NULL,
    target_partition  integer,
    target_offset     bigint,
    redrives          integer NOT NULL DEFAULT 1,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset),
    CHECK (state = 'sending' OR target_offset IS NOT NULL)
);
-- Copies of one dead letter (the DLQ is at least once) share their source.
CREATE INDEX dlq_redrives_source ON tally.dlq_redrives (source_topic, source_partition, source_offset);
-- A letter whose source is a redriven message was dead-lettered again.
CREATE INDEX dlq_redrives_target ON tally.dlq_redrives (target_topic, target_partition, target_offset);
CREATE INDEX dlq_redrives_sending ON tally.dlq_redrives (dlq_topic) WHERE state = 'sending';
