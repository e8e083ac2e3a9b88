-- A topic can be deleted and created again under the same name, and its offsets
-- then start again at 0. Each topic name has an epoch (its incarnation as far as
-- tally knows), bumped by `tally reset-offsets` and by `tally migrate` when it
-- creates a topic that had offsets of record. Dead letters carry the epoch in
-- their key, so those of two incarnations never collide.
CREATE TABLE tally.topic_epochs (
    topic       text PRIMARY KEY,
    epoch       integer NOT NULL CHECK (epoch >= 0),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    reason      text NOT NULL
);

ALTER TABLE tally.dead_letters ADD COLUMN topic_epoch integer NOT NULL DEFAULT 0;
ALTER TABLE tally.dead_letters DROP CONSTRAINT dead_letters_pkey;
ALTER TABLE tally.dead_letters ADD PRIMARY KEY (topic, topic_epoch, partition, "offset");
