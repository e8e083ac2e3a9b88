-- The policy-decision and audit-event streams (docs/architecture.md, docs/audit-log.md).

-- Event-time window counts of the once-per-window rules (deny_rate,
-- failed_action_burst), updated under a row lock by each batch's commit.
CREATE TABLE tally.rule_windows (
    rule          text NOT NULL,
    tenant_id     text NOT NULL,
    -- the policy id (deny_rate) or '<actor type>:<actor id>' (failed_action_burst)
    subject       text NOT NULL,
    window_start  timestamptz NOT NULL,
    window_secs   integer NOT NULL,
    events        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (rule, tenant_id, subject, window_start, window_secs)
);

-- Who may access personal data of which resource types (`*`: all), for the
-- personal_data_access rule. Actor ids as the emitting service sends them; tally
-- pseudonymises them in memory when it loads the table.
CREATE TABLE tally.audit_grants (
    tenant_id      text NOT NULL,
    actor_id       text NOT NULL,
    resource_type  text NOT NULL,
    PRIMARY KEY (tenant_id, actor_id, resource_type)
);

-- One append-only Merkle tree per tenant (RFC 6962). Leaf indexes are reserved
-- by a batch once, after its claim (`next_index`), and merged into the tree in
-- index order when the batches that hold them have committed (`tree_size`,
-- `compact`: the roots of the perfect subtrees, 32 bytes each, largest first).
CREATE TABLE tally.audit_trees (
    tenant_id   text PRIMARY KEY,
    next_index  bigint NOT NULL DEFAULT 0,
    tree_size   bigint NOT NULL DEFAULT 0,
    compact     bytea NOT NULL DEFAULT ''::bytea,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (tree_size <= next_index)
);

-- Leaves between their reservation and their merge into the tree. `leaf_hash` is
-- set by the commit of the batch that reserved them; a replay finds its leaves by
-- batch id and reuses their indexes.
CREATE TABLE tally.audit_leaves (
    tenant_id   text NOT NULL,
    leaf_index  bigint NOT NULL,
    batch_id    bigint NOT NULL,
    event_key   uuid NOT NULL,
    leaf_hash   bytea,
    PRIMARY KEY (tenant_id, leaf_index)
);
CREATE INDEX audit_leaves_batch ON tally.audit_leaves (batch_id);

-- Signed checkpoints (C2SP tlog-checkpoint in a signed note), published to the
-- checkpoint topic by the checkpoint relay.
CREATE TABLE tally.audit_checkpoints (
    checkpoint_id  bigserial PRIMARY KEY,
    tenant_id      text NOT NULL,
    tree_size      bigint NOT NULL,
    root           bytea NOT NULL,
    signed_note    text NOT NULL,
    signed_at      timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz
);
CREATE INDEX audit_checkpoints_latest ON tally.audit_checkpoints (tenant_id, checkpoint_id DESC);
CREATE INDEX audit_checkpoints_unpublished ON tally.audit_checkpoints (checkpoint_id) WHERE published_at IS NULL;

-- seen_events is shared by the streams; each prunes only its own keys (found
-- through their batches), below its own partitions' dedup cutoffs.
CREATE INDEX batches_by_topic ON tally.batches (group_id, topic, batch_id);
